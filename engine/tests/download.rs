//! `download` against local stand-ins: for hf://, a fake Hub API (the file list, per-file fetch,
//! skipping files already present, the errors a user sees); for s3://, moto's standalone S3
//! server (listing past 1000 keys, signed and unsigned requests, restarts, the credential and
//! bucket errors) and a raw fake store for what moto cannot be made to do (cut bodies, replaced
//! objects, 5xx, refused connections, hostile keys).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use deepseek_engine::download::download_from;
use serde_json::json;

#[derive(Default)]
struct Hub {
    fetches: AtomicUsize,
}

async fn serve_hub(hub: Arc<Hub>) -> String {
    let app = Router::new()
        .route(
            "/api/models/{org}/{name}/revision/{rev}",
            get(|Path((org, name, rev)): Path<(String, String, String)>, headers: HeaderMap| async move {
                if name == "private" && headers.get("authorization").is_none() {
                    return Err(StatusCode::UNAUTHORIZED);
                }
                if org != "acme" || rev != "v1" {
                    return Err(StatusCode::NOT_FOUND);
                }
                Ok(axum::Json(json!({ "siblings": [
                    { "rfilename": "config.json" }, { "rfilename": "model.safetensors" },
                    { "rfilename": "README.md" }, { "rfilename": "inference/model.py" }
                ]})))
            }),
        )
        .route(
            "/{org}/{name}/resolve/{rev}/{file}",
            get(|State(hub): State<Arc<Hub>>, Path((_, _, _, file)): Path<(String, String, String, String)>| async move {
                hub.fetches.fetch_add(1, Ordering::SeqCst);
                match file.as_str() {
                    "config.json" => Ok("{\"model_type\":\"deepseek_v32\"}".to_string()),
                    "model.safetensors" => Ok("weights".repeat(1000)),
                    _ => Err(StatusCode::NOT_FOUND),
                }
            }),
        )
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_hub_model_is_fetched_once_with_only_the_files_an_engine_needs() {
    let hub = Arc::new(Hub::default());
    let url = serve_hub(hub.clone()).await;
    let dest = tempfile::tempdir().unwrap();
    let first = download_from(&url, None, "hf://acme/model@v1", dest.path())
        .await
        .unwrap();
    assert_eq!((first.files, first.fetched, first.skipped), (2, 2, 0));
    assert_eq!(first.bytes, 7000 + 29);
    assert_eq!(
        std::fs::read_to_string(dest.path().join("model.safetensors"))
            .unwrap()
            .len(),
        7000
    );
    assert!(dest.path().join("config.json").exists());
    assert!(!dest.path().join("README.md").exists());
    assert!(!dest.path().join("model.safetensors.part").exists());
    assert_eq!(hub.fetches.load(Ordering::SeqCst), 2);
    // A second run (a restarted init container) fetches nothing again.
    let again = download_from(&url, None, "hf://acme/model@v1", dest.path())
        .await
        .unwrap();
    assert_eq!((again.fetched, again.skipped, again.bytes), (0, 2, 0));
    assert_eq!(hub.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn errors_name_the_url_and_hint_at_the_fix() {
    let url = serve_hub(Arc::new(Hub::default())).await;
    let dest = tempfile::tempdir().unwrap();
    let e = download_from(&url, None, "hf://acme/private@v1", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("401") && e.contains("HF_TOKEN"), "{e}");
    let e = download_from(&url, None, "hf://acme/model@nope", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("404") && e.contains("revision"), "{e}");
    let e = download_from(&url, None, "hf://just-a-name", dest.path())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("hf://ORG/NAME"), "{e}");
}

// ---- s3:// ----

use std::sync::Mutex;
use std::time::{Duration, Instant};

use deepseek_engine::download::{
    Credentials, DownloadSummary, RetryPolicy, S3Options, S3Source, download_s3,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A bound on one whole download in these tests, never what makes one pass.
const BOUND: Duration = Duration::from_secs(300);

fn fast_retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        first_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

fn options(endpoint: &str, credentials: Option<Credentials>, attempts: u32) -> S3Options {
    S3Options {
        endpoint: Some(reqwest::Url::parse(endpoint).unwrap()),
        region: "us-east-1".into(),
        credentials,
        retry: fast_retries(attempts),
        concurrency: 4,
    }
}

async fn s3_download(
    source: &str,
    opts: &S3Options,
    dest: &std::path::Path,
) -> Result<DownloadSummary, String> {
    let src = S3Source::parse(source).unwrap();
    tokio::time::timeout(BOUND, download_s3(&src, opts, dest))
        .await
        .expect("the download finishes within the bound")
        .map_err(|e| e.to_string())
}

/// Deterministic bytes that differ per seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// moto's standalone server on a free loopback port, stopped on drop.
struct Moto {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// `None`, with the reason printed, where moto's server is not installed.
    async fn start() -> Option<Moto> {
        let probe = std::process::Command::new("python3")
            .args(["-c", "import moto.server, flask, flask_cors"])
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            Ok(out) => {
                eprintln!(
                    "SKIPPED: moto's S3 server is not installed (python3 -m pip install \
                     'moto[server]'): {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or_default()
                );
                return None;
            }
            Err(e) => {
                eprintln!("SKIPPED: no python3 to run moto's S3 server: {e}");
                return None;
            }
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = std::process::Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("python3 starts");
        // The process is up once its port accepts; bounded, and a crash ends the wait.
        let deadline = Instant::now() + Duration::from_secs(120);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "moto exited with {status}: {}",
                    std::fs::read_to_string(log.path()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "moto did not listen within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        })
    }

    /// An IAM call. The Authorization header only routes it to IAM: moto checks nothing
    /// before [`Moto::require_signatures`].
    async fn iam(&self, params: &[(&str, &str)]) -> String {
        let mut form: Vec<(&str, &str)> = vec![("Version", "2010-05-08")];
        form.extend_from_slice(params);
        let resp = self
            .http
            .post(&self.url)
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIASETUP/20260101/us-east-1/iam/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .form(&form)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{params:?}: {}", resp.status());
        resp.text().await.unwrap()
    }

    /// A user allowed everything on S3, and its access key.
    async fn user_with_s3_access(&self) -> Credentials {
        self.iam(&[("Action", "CreateUser"), ("UserName", "reader")])
            .await;
        let xml = self
            .iam(&[("Action", "CreateAccessKey"), ("UserName", "reader")])
            .await;
        let doc = roxmltree::Document::parse(&xml).unwrap();
        let field = |name: &str| {
            doc.descendants()
                .find(|n| n.has_tag_name(name))
                .and_then(|n| n.text())
                .unwrap()
                .to_string()
        };
        let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"*"}]}"#;
        self.iam(&[
            ("Action", "PutUserPolicy"),
            ("UserName", "reader"),
            ("PolicyName", "s3"),
            ("PolicyDocument", policy),
        ])
        .await;
        Credentials {
            access_key_id: field("AccessKeyId"),
            secret_access_key: field("SecretAccessKey"),
            session_token: None,
        }
    }

    async fn put(&self, path: &str, content_type: &str, body: Vec<u8>) {
        let resp = self
            .http
            .put(format!("{}/{path}", self.url))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    }

    async fn create_bucket(&self, bucket: &str) {
        self.put(bucket, "application/octet-stream", Vec::new())
            .await;
    }

    async fn put_objects(&self, bucket: &str, objects: &[(String, Vec<u8>)]) {
        let puts = objects.iter().map(|(key, body)| {
            let path = format!(
                "{bucket}/{}",
                percent_encoding::utf8_percent_encode(key, KEY_CHARS)
            );
            async move {
                self.put(&path, "application/octet-stream", body.clone())
                    .await
            }
        });
        futures::stream::iter(puts)
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }

    /// From here on moto checks every request's signature against its IAM users.
    async fn require_signatures(&self) {
        let resp = self
            .http
            .post(format!("{}/moto-api/reset-auth", self.url))
            .header("content-type", "text/plain")
            .body("0")
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
    }
}

/// Escapes what a URL path cannot hold as is; `/` stays a separator.
const KEY_CHARS: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn assert_mirrored(dest: &std::path::Path, objects: &[(String, Vec<u8>)], prefix: &str) {
    for (key, body) in objects {
        let rel = key.strip_prefix(prefix).unwrap();
        let got = std::fs::read(dest.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert!(
            got == *body,
            "{rel}: {} bytes, expected {}",
            got.len(),
            body.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_prefix_past_1000_keys_is_mirrored_and_a_restart_fetches_only_what_is_missing() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let creds = moto.user_with_s3_access().await;
    moto.create_bucket("models").await;
    let prefix = "deepseek/v32/";
    let mut objects: Vec<(String, Vec<u8>)> = (0..1005)
        .map(|i| {
            (
                format!("{prefix}shards/part-{i:04}.bin"),
                format!("object {i}").into_bytes(),
            )
        })
        .collect();
    objects.push((
        format!("{prefix}model-00001-of-00001.safetensors"),
        pattern(1, 3 << 20),
    ));
    objects.push((
        format!("{prefix}nested/dir two/é+1 (copy).json"),
        b"{\"nested\":true}".to_vec(),
    ));
    objects.push((format!("{prefix}empty.txt"), Vec::new()));
    moto.put_objects("models", &objects).await;
    // Outside the prefix (a sibling that shares its first characters) and a directory marker:
    // neither becomes a file.
    moto.put_objects(
        "models",
        &[
            ("deepseek/v32-old/config.json".into(), b"old".to_vec()),
            (format!("{prefix}markers/"), Vec::new()),
        ],
    )
    .await;
    // Signed, but moto does not check signatures here: its check compares against the query
    // and path as its web layer decodes them, so it rejects any signed request that needs
    // escaping (a prefix's `/`, a continuation token's `=`), boto3's as well. Signatures over
    // escaped keys and queries are checked against the reference signer in the unit tests, and
    // moto checks plain ones in the next test.
    let dest = tempfile::tempdir().unwrap();
    let opts = options(&moto.url, Some(creds), 3);
    let source = "s3://models/deepseek/v32";
    let total: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
    let first = s3_download(source, &opts, dest.path()).await.unwrap();
    assert_eq!(
        first,
        DownloadSummary {
            files: objects.len(),
            fetched: objects.len(),
            skipped: 0,
            bytes: total
        }
    );
    assert_mirrored(dest.path(), &objects, prefix);
    assert!(!dest.path().join("markers").exists());
    assert!(!dest.path().join(".s3-partial").exists());
    let entries = std::fs::read_dir(dest.path()).unwrap().count();
    assert_eq!(
        entries, 4,
        "shards, nested, the safetensors, empty.txt, nothing else"
    );

    // A restart after losing one file and with another cut short fetches just those two.
    std::fs::remove_file(dest.path().join("shards/part-0007.bin")).unwrap();
    let big = dest.path().join("model-00001-of-00001.safetensors");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&big)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let again = s3_download(source, &opts, dest.path()).await.unwrap();
    assert_eq!(
        again,
        DownloadSummary {
            files: objects.len(),
            fetched: 2,
            skipped: objects.len() - 2,
            bytes: (3 << 20) + "object 7".len() as u64
        }
    );
    assert_mirrored(dest.path(), &objects, prefix);

    let third = s3_download(source, &opts, dest.path()).await.unwrap();
    assert_eq!(
        (third.fetched, third.skipped, third.bytes),
        (0, objects.len(), 0)
    );

    let e = s3_download("s3://models/deepseek/nothing-here", &opts, dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://models/deepseek/nothing-here/: no objects under this prefix"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_accepts_our_signatures_and_s3_errors_name_the_bucket_and_the_credential_variable() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    let creds = moto.user_with_s3_access().await;
    moto.create_bucket("models").await;
    let objects = vec![
        ("config.json".to_string(), b"{}".to_vec()),
        ("weights/model.safetensors".to_string(), pattern(6, 100_000)),
    ];
    moto.put_objects("models", &objects).await;
    moto.require_signatures().await;

    // The whole bucket, so that no request needs escaping (see the test above).
    let ok = options(&moto.url, Some(creds.clone()), 2);
    let dest = tempfile::tempdir().unwrap();
    let fine = s3_download("s3://models", &ok, dest.path()).await.unwrap();
    assert_eq!(fine.fetched, 2);
    assert_mirrored(dest.path(), &objects, "");

    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://no-such-bucket", &ok, dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://no-such-bucket/: HTTP 404 NoSuchBucket")
            && e.contains("no bucket no-such-bucket at AWS_ENDPOINT_URL="),
        "{e}"
    );

    let wrong_secret = Credentials {
        secret_access_key: "not-the-secret".into(),
        ..creds.clone()
    };
    let e = s3_download(
        "s3://models",
        &options(&moto.url, Some(wrong_secret), 2),
        dest.path(),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("403 SignatureDoesNotMatch")
            && e.contains(&format!(
                "AWS_SECRET_ACCESS_KEY is not the secret of AWS_ACCESS_KEY_ID={}",
                creds.access_key_id
            )),
        "{e}"
    );

    let unknown_key = Credentials {
        access_key_id: "AKIAUNKNOWNKEY000000".into(),
        ..creds.clone()
    };
    let e = s3_download(
        "s3://models",
        &options(&moto.url, Some(unknown_key), 2),
        dest.path(),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("403 InvalidAccessKeyId")
            && e.contains("AWS_ACCESS_KEY_ID=AKIAUNKNOWNKEY000000 is not a key"),
        "{e}"
    );
    assert!(!e.contains("not-the-secret") && !e.contains(&creds.secret_access_key));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_bucket_downloads_unsigned_and_a_private_one_says_which_variables_to_set() {
    let Some(moto) = Moto::start().await else {
        return;
    };
    moto.create_bucket("public").await;
    moto.create_bucket("private").await;
    let policy = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":"*","Action":["s3:GetObject","s3:ListBucket"],"Resource":["arn:aws:s3:::public","arn:aws:s3:::public/*"]}]}"#;
    moto.put("public?policy", "application/json", policy.into())
        .await;
    let objects = vec![
        ("m/config.json".to_string(), b"{}".to_vec()),
        ("m/w/model.safetensors".to_string(), pattern(2, 200_000)),
    ];
    moto.put_objects("public", &objects).await;
    moto.put_objects("private", &objects).await;

    let dest = tempfile::tempdir().unwrap();
    let anonymous = options(&moto.url, None, 2);
    let got = s3_download("s3://public/m", &anonymous, dest.path())
        .await
        .unwrap();
    assert_eq!(got.fetched, 2);
    assert_mirrored(dest.path(), &objects, "m/");

    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://private/m", &anonymous, dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://private/m/")
            && e.contains("HTTP 403")
            && e.contains("sent unsigned: AWS_ACCESS_KEY_ID is not set"),
        "{e}"
    );
}

/// What the raw fake store saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    range: Option<String>,
    if_match: Option<String>,
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Closes the connection after this many body bytes, under a full Content-Length.
    cut_after: Option<usize>,
}

impl Reply {
    fn ok(body: Vec<u8>, etag: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![("ETag".into(), etag.into())],
            body,
            cut_after: None,
        }
    }

    /// `body` from the Range's start, as S3 answers it.
    fn range(body: &[u8], range: &str) -> Reply {
        let start: usize = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .unwrap()
            .parse()
            .unwrap();
        Reply {
            status: 206,
            headers: vec![(
                "Content-Range".into(),
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )],
            body: body[start..].to_vec(),
            cut_after: None,
        }
    }

    fn error(status: u16, code: &str) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: format!("<Error><Code>{code}</Code><Message>{code} here</Message></Error>")
                .into_bytes(),
            cut_after: None,
        }
    }
}

fn list_xml(objects: &[(&str, usize, &str)]) -> Reply {
    let contents: String = objects
        .iter()
        .map(|(key, size, etag)| {
            format!(
                "<Contents><Key>{}</Key><Size>{size}</Size><ETag>{}</ETag></Contents>",
                percent_encoding::utf8_percent_encode(key, KEY_CHARS),
                etag.replace('"', "&quot;")
            )
        })
        .collect();
    Reply {
        status: 200,
        headers: vec![],
        body: format!(
            "<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>\
             {contents}</ListBucketResult>"
        )
        .into_bytes(),
        cut_after: None,
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

/// A store over raw HTTP/1.1, one request a connection, so a test decides exactly where a body
/// stops.
async fn serve_fake_s3(handler: Handler) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (handler, log) = (handler.clone(), log.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let mut lines = head.split("\r\n");
                let path = lines.next().unwrap().split(' ').nth(1).unwrap().to_string();
                let header = |name: &str| {
                    head.split("\r\n").skip(1).find_map(|l| {
                        l.split_once(':')
                            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.trim().to_string())
                    })
                };
                let req = Seen {
                    path,
                    range: header("range"),
                    if_match: header("if-match"),
                };
                log.lock().unwrap().push(req.clone());
                let reply = handler(&req);
                let mut out = format!(
                    "HTTP/1.1 {} Fake\r\nConnection: close\r\nContent-Length: {}\r\n",
                    reply.status,
                    reply.body.len()
                );
                for (k, v) in &reply.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let body = &reply.body[..reply.cut_after.unwrap_or(reply.body.len())];
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.write_all(body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn object_requests(seen: &Mutex<Vec<Seen>>) -> Vec<Seen> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|s| !s.path.contains('?'))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_body_cut_mid_object_resumes_with_a_range_of_the_same_version() {
    let body = pattern(3, 300_000);
    let served = body.clone();
    let (url, seen) = serve_fake_s3(Arc::new(move |req: &Seen| {
        if req.path.starts_with("/bucket?") {
            return list_xml(&[("m/big.bin", 300_000, "\"v1\"")]);
        }
        match &req.range {
            None => Reply {
                cut_after: Some(100_000),
                ..Reply::ok(served.clone(), "\"v1\"")
            },
            Some(r) => Reply::range(&served, r),
        }
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    let got = s3_download("s3://bucket/m", &options(&url, None, 3), dest.path())
        .await
        .unwrap();
    assert_eq!((got.fetched, got.bytes), (1, 300_000));
    assert!(std::fs::read(dest.path().join("big.bin")).unwrap() == body);
    let gets = object_requests(&seen);
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(gets[0].range, None);
    assert_eq!(gets[1].range.as_deref(), Some("bytes=100000-"));
    assert!(
        gets.iter().all(|g| g.if_match.as_deref() == Some("\"v1\"")),
        "{gets:?}"
    );
}

#[tokio::test]
async fn a_partial_of_a_replaced_object_is_not_spliced_onto_the_new_version() {
    let v1 = pattern(4, 50_000);
    let v2 = pattern(5, 50_000);
    let version = Arc::new(Mutex::new(1));
    let (a, b, ver) = (v1.clone(), v2.clone(), version.clone());
    let (url, seen) = serve_fake_s3(Arc::new(move |req: &Seen| {
        let current = *ver.lock().unwrap();
        let etag = format!("\"v{current}\"");
        if req.path.starts_with("/bucket?") {
            return list_xml(&[("m/w.bin", 50_000, &etag)]);
        }
        if req.if_match.as_deref() != Some(etag.as_str()) {
            return Reply::error(412, "PreconditionFailed");
        }
        match current {
            1 => Reply {
                cut_after: Some(20_000),
                ..Reply::ok(a.clone(), &etag)
            },
            _ => match &req.range {
                None => Reply::ok(b.clone(), &etag),
                Some(r) => Reply::range(&b, r),
            },
        }
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    // One attempt: the cut body ends the run with 20 000 bytes of v1 on disk.
    let e = s3_download("s3://bucket/m", &options(&url, None, 1), dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://bucket/m/w.bin: network error") && e.contains("gave up after 1 attempt)"),
        "{e}"
    );
    *version.lock().unwrap() = 2;
    let got = s3_download("s3://bucket/m", &options(&url, None, 1), dest.path())
        .await
        .unwrap();
    assert_eq!(got.bytes, 50_000);
    assert!(std::fs::read(dest.path().join("w.bin")).unwrap() == v2);
    let last = object_requests(&seen).pop().unwrap();
    assert_eq!(
        (last.range, last.if_match.as_deref()),
        (None, Some("\"v2\""))
    );
    assert!(!dest.path().join(".s3-partial").exists());
}

#[tokio::test]
async fn an_object_replaced_during_the_run_is_reported_not_mixed() {
    let (url, _) = serve_fake_s3(Arc::new(|req: &Seen| {
        if req.path.starts_with("/bucket?") {
            return list_xml(&[("m/a.bin", 10, "\"old\"")]);
        }
        Reply::error(412, "PreconditionFailed")
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://bucket/m", &options(&url, None, 3), dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://bucket/m/a.bin changed while it was being downloaded")
            && e.contains("run the download again"),
        "{e}"
    );
}

#[tokio::test]
async fn server_errors_are_retried_a_bounded_number_of_times_and_name_the_object() {
    let list_calls = Arc::new(AtomicUsize::new(0));
    let calls = list_calls.clone();
    let (url, seen) = serve_fake_s3(Arc::new(move |req: &Seen| {
        if req.path.starts_with("/bucket?") {
            // The listing recovers after two failures; the object never does.
            if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                return Reply::error(500, "InternalError");
            }
            return list_xml(&[("m/x.bin", 10, "\"e\"")]);
        }
        Reply::error(503, "SlowDown")
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://bucket/m", &options(&url, None, 4), dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://bucket/m/x.bin: HTTP 503 SlowDown: SlowDown here")
            && e.contains("gave up after 4 attempts"),
        "{e}"
    );
    assert_eq!(list_calls.load(Ordering::SeqCst), 3);
    assert_eq!(object_requests(&seen).len(), 4);
}

#[tokio::test]
async fn a_store_that_is_not_listening_is_a_network_error_naming_the_prefix() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dest = tempfile::tempdir().unwrap();
    let e = s3_download(
        "s3://bucket/models/v32",
        &options(&format!("http://127.0.0.1:{port}"), None, 2),
        dest.path(),
    )
    .await
    .unwrap_err();
    assert!(
        e.contains("s3://bucket/models/v32/: network error")
            && e.to_lowercase().contains("connect")
            && e.contains("gave up after 2 attempts"),
        "{e}"
    );
}

#[tokio::test]
async fn keys_that_would_escape_the_destination_refuse_the_whole_download() {
    let (url, seen) = serve_fake_s3(Arc::new(|req: &Seen| {
        if req.path.starts_with("/bucket?") {
            return list_xml(&[
                ("m/ok.bin", 1, "\"a\""),
                ("m/../../etc/cron.d/x", 1, "\"b\""),
            ]);
        }
        Reply::ok(b"x".to_vec(), "\"a\"")
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://bucket/m", &options(&url, None, 2), dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://bucket/m/../../etc/cron.d/x") && e.contains("refusing to download"),
        "{e}"
    );
    assert!(object_requests(&seen).is_empty());
}

#[tokio::test]
async fn a_bucket_in_another_region_says_which_region_to_set() {
    let (url, _) = serve_fake_s3(Arc::new(|_: &Seen| Reply {
        headers: vec![("x-amz-bucket-region".into(), "eu-west-1".into())],
        ..Reply::error(301, "PermanentRedirect")
    }))
    .await;
    let dest = tempfile::tempdir().unwrap();
    let e = s3_download("s3://bucket/m", &options(&url, None, 2), dest.path())
        .await
        .unwrap_err();
    assert!(
        e.contains("s3://bucket/m/: HTTP 301 PermanentRedirect")
            && e.contains("the bucket is in region eu-west-1: set AWS_REGION=eu-west-1"),
        "{e}"
    );
}
