//! `s3://BUCKET[/PREFIX]` sources: every object under the prefix, listed page by page with
//! ListObjectsV2 and fetched with GET into DEST at its path below the prefix (`PREFIX/a/b` to
//! `DEST/a/b`). AWS S3 is addressed virtual-host style; a store named by `AWS_ENDPOINT_URL`
//! (MinIO, Ceph RGW, R2, ...) path style. Requests are SigV4-signed with the access key from the
//! environment, or sent unsigned without one (public buckets).
//!
//! Restart-safe for a 700 GB model: each object is written under `DEST/.s3-partial/` (named by
//! key, ETag and size) and renamed into place when whole; a later run skips objects already there
//! at their listed size and resumes partial ones with a ranged GET. Every GET carries `If-Match`
//! with the listed ETag, so bytes of two versions are never spliced. 5xx, throttling and
//! connection errors are retried with exponential backoff, a bounded number of times in a row
//! without progress; an interrupted body resumes where it stopped.

use std::fmt;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use reqwest::{Response, StatusCode, Url};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::sigv4::{self, Credentials};
use super::{DownloadError, DownloadSummary, Progress, StreamError, stream_body};

/// Where partial objects are written, below DEST; no key may use it.
const PARTIAL_DIR: &str = ".s3-partial";
/// How much of an error response is read for its code and message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Objects fetched at once: one S3 connection rarely fills a node's link.
const DEFAULT_CONCURRENCY: usize = 4;

/// A parsed `s3://BUCKET[/PREFIX]`. The prefix names a directory: it is empty (the whole bucket)
/// or ends with `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Source {
    pub bucket: String,
    pub prefix: String,
}

impl S3Source {
    pub fn parse(source: &str) -> Result<Self, DownloadError> {
        let bad = || DownloadError::BadSource(source.into());
        let rest = source.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let valid = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && edge(bucket.bytes().next())
            && edge(bucket.bytes().last());
        if !valid {
            return Err(bad());
        }
        let mut prefix = prefix.to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(S3Source {
            bucket: bucket.into(),
            prefix,
        })
    }

    fn object(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

impl fmt::Display for S3Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// How transient failures (5xx, 429, connection errors) are retried: up to `attempts` tries in
/// a row that make no progress, waiting `first_delay`, then twice as long each time up to
/// `max_delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `failures`-th failure in a row (1-based).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32
            .checked_shl(failures.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.first_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// An S3-compatible store's address, addressed path style; `None` for AWS S3.
    pub endpoint: Option<Url>,
    pub region: String,
    /// `None` sends requests unsigned.
    pub credentials: Option<Credentials>,
    pub retry: RetryPolicy,
    /// Objects fetched at once (at least 1).
    pub concurrency: usize,
}

impl S3Options {
    /// From the variables the credentials Secret provides: `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY` and optionally `AWS_SESSION_TOKEN` (none of them: unsigned);
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`, default `us-east-1`); `AWS_ENDPOINT_URL_S3` or
    /// `AWS_ENDPOINT_URL` for an S3-compatible store.
    pub fn from_env() -> Result<Self, DownloadError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`S3Options::from_env`] over any lookup. Values are trimmed (a Secret made from a file
    /// often ends in a newline) and empty ones count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, DownloadError> {
        let var = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let region = var("AWS_REGION")
            .or_else(|| var("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        if !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(DownloadError::S3Config(format!(
                "AWS_REGION={region:?}: expected a region name such as us-east-1"
            )));
        }
        let endpoint = match ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
            .into_iter()
            .find_map(|name| var(name).map(|v| (name, v)))
        {
            Some((name, value)) => Some(parse_endpoint(name, &value)?),
            None => None,
        };
        let credentials = match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(access_key_id), Some(secret_access_key)) => Some(Credentials {
                access_key_id,
                secret_access_key,
                session_token: var("AWS_SESSION_TOKEN"),
            }),
            (None, None) => None,
            (Some(_), None) => {
                return Err(DownloadError::S3Config(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: the credentials \
                     Secret needs both"
                        .into(),
                ));
            }
            (None, Some(_)) => {
                return Err(DownloadError::S3Config(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: the credentials \
                     Secret needs both"
                        .into(),
                ));
            }
        };
        Ok(S3Options {
            endpoint,
            region,
            credentials,
            retry: RetryPolicy::default(),
            concurrency: DEFAULT_CONCURRENCY,
        })
    }
}

fn parse_endpoint(name: &str, value: &str) -> Result<Url, DownloadError> {
    let bad = || {
        DownloadError::S3Config(format!(
            "{name}={value:?}: expected http(s)://HOST[:PORT], e.g. http://minio.storage:9000"
        ))
    };
    let url = Url::parse(value).map_err(|_| bad())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || url.query().is_some()
        || !url.username().is_empty()
    {
        return Err(bad());
    }
    Ok(url)
}

/// Where `key` goes below DEST: the key less the prefix. `Ok(None)` for a directory marker (a
/// key ending in `/`). Refused when it could land outside DEST (an empty, `.` or `..` segment;
/// S3 keys are arbitrary strings) or inside the partial-download directory.
fn relative_path(prefix: &str, key: &str) -> Result<Option<String>, &'static str> {
    let rel = key
        .strip_prefix(prefix)
        .ok_or("the store listed a key outside the requested prefix")?;
    if rel.is_empty() || rel.ends_with('/') {
        return Ok(None);
    }
    if rel.contains('\0')
        || rel
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(
            "the key has an empty, '.' or '..' path segment, which would write outside the \
             destination directory",
        );
    }
    if rel.split('/').next() == Some(PARTIAL_DIR) {
        return Err("the key's first directory is .s3-partial, which partial downloads use");
    }
    Ok(Some(rel.to_string()))
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListedObject {
    key: String,
    size: u64,
    etag: Option<String>,
}

/// One ListObjectsV2 page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListPage {
    objects: Vec<ListedObject>,
    /// The token for the next page, when the listing is truncated.
    next: Option<String>,
}

/// Parses a ListObjectsV2 response. Keys come URL-encoded when the response says
/// `EncodingType` `url` (asked for, so any byte in a key survives XML).
fn parse_list_page(xml: &str) -> Result<ListPage, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable listing: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "ListBucketResult" {
        return Err(format!(
            "expected a ListBucketResult, got <{}>",
            root.tag_name().name()
        ));
    }
    let text = |node: roxmltree::Node<'_, '_>, name: &str| {
        node.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
            .map(|c| c.text().unwrap_or_default().to_string())
    };
    let url_encoded = text(root, "EncodingType").is_some_and(|e| e.eq_ignore_ascii_case("url"));
    let mut objects = Vec::new();
    for node in root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "Contents")
    {
        let raw = text(node, "Key").ok_or("an object without a Key")?;
        let key = if url_encoded {
            percent_encoding::percent_decode_str(&raw)
                .decode_utf8()
                .map_err(|_| format!("key {raw:?} is not UTF-8"))?
                .into_owned()
        } else {
            raw
        };
        let size = text(node, "Size")
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("object {key:?} has no readable Size"))?;
        let etag = text(node, "ETag").filter(|e| !e.is_empty());
        objects.push(ListedObject { key, size, etag });
    }
    let truncated = text(root, "IsTruncated").is_some_and(|t| t.trim() == "true");
    let next = text(root, "NextContinuationToken").filter(|t| !t.is_empty());
    if truncated && next.is_none() {
        return Err("a truncated listing without a NextContinuationToken".into());
    }
    Ok(ListPage {
        objects,
        next: next.filter(|_| truncated),
    })
}

/// S3's `<Error><Code>..</Code><Message>..</Message></Error>`, and the `<Region>` some errors
/// carry.
fn parse_error(body: &str) -> (Option<String>, Option<String>, Option<String>) {
    let Ok(doc) = roxmltree::Document::parse(body) else {
        return (None, None, None);
    };
    let root = doc.root_element();
    let text = |name: &str| {
        root.children()
            .find(|c| c.is_element() && c.tag_name().name() == name)
            .and_then(|c| c.text())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    };
    (text("Code"), text("Message"), text("Region"))
}

/// An error's description with its causes, which reqwest keeps in its source chain.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

struct Client<'a> {
    http: reqwest::Client,
    src: &'a S3Source,
    opts: &'a S3Options,
}

/// A listed object and its path below DEST.
struct Planned {
    obj: ListedObject,
    rel: String,
}

impl<'a> Client<'a> {
    fn new(src: &'a S3Source, opts: &'a S3Options) -> Result<Self, DownloadError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("deepseek-engine/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            // A redirect means the wrong region or endpoint; following it would drop the
            // signature, so it is reported instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DownloadError::Network {
                target: src.to_string(),
                cause: chain(&e),
            })?;
        Ok(Client { http, src, opts })
    }

    /// `https://BUCKET.s3.REGION.amazonaws.com` (a bucket with dots, which breaks the TLS
    /// wildcard, path style on `s3.REGION`), or the endpoint path style.
    fn bucket_url(&self) -> (String, bool) {
        match &self.opts.endpoint {
            Some(ep) => {
                let base = ep.as_str().trim_end_matches('/');
                (format!("{base}/{}", self.src.bucket), true)
            }
            None => {
                let domain = if self.opts.region.starts_with("cn-") {
                    "amazonaws.com.cn"
                } else {
                    "amazonaws.com"
                };
                let region = &self.opts.region;
                if self.src.bucket.contains('.') {
                    (
                        format!("https://s3.{region}.{domain}/{}", self.src.bucket),
                        true,
                    )
                } else {
                    (
                        format!("https://{}.s3.{region}.{domain}", self.src.bucket),
                        false,
                    )
                }
            }
        }
    }

    fn url(&self, s: &str) -> Result<Url, DownloadError> {
        Url::parse(s).map_err(|e| DownloadError::S3Config(format!("{s}: not a valid URL: {e}")))
    }

    fn list_url(&self, token: Option<&str>) -> Result<Url, DownloadError> {
        let (base, path_style) = self.bucket_url();
        let mut q = String::from("list-type=2&encoding-type=url");
        if !self.src.prefix.is_empty() {
            q.push_str("&prefix=");
            q.push_str(&sigv4::encode(&self.src.prefix));
        }
        if let Some(t) = token {
            q.push_str("&continuation-token=");
            q.push_str(&sigv4::encode(t));
        }
        let slash = if path_style { "" } else { "/" };
        self.url(&format!("{base}{slash}?{q}"))
    }

    fn object_url(&self, key: &str) -> Result<Url, DownloadError> {
        let (base, _) = self.bucket_url();
        self.url(&format!("{base}/{}", sigv4::encode_path(key)))
    }

    /// A GET of `url`, signed when there are credentials, with `extra` headers unsigned.
    fn get(&self, url: &Url, extra: &[(&'static str, String)]) -> reqwest::RequestBuilder {
        let mut rb = self.http.get(url.clone());
        for (k, v) in extra {
            rb = rb.header(*k, v);
        }
        if let Some(creds) = &self.opts.credentials {
            for (k, v) in sigv4::s3_get_headers(url, creds, &self.opts.region, SystemTime::now()) {
                rb = rb.header(k, v);
            }
        }
        rb
    }

    fn network(&self, target: &str, e: reqwest::Error) -> DownloadError {
        DownloadError::Network {
            target: target.into(),
            cause: chain(&e.without_url()),
        }
    }

    /// Counts a failure; past the policy's bound returns `last` as the error, else waits.
    async fn backoff(&self, failures: &mut u32, last: DownloadError) -> Result<(), DownloadError> {
        *failures += 1;
        let policy = &self.opts.retry;
        if *failures >= policy.attempts.max(1) {
            return Err(DownloadError::GaveUp {
                attempts: *failures,
                last: Box::new(last),
            });
        }
        let delay = policy.delay(*failures);
        tracing::warn!(error = %last, attempt = *failures, retry_in_ms = delay.as_millis() as u64, "S3 request failed; retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// The error an S3 response stands for, with a hint naming what to check.
    async fn error(&self, target: &str, mut resp: Response) -> DownloadError {
        let status = resp.status();
        let header_region = resp
            .headers()
            .get("x-amz-bucket-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut body = Vec::new();
        while body.len() < ERROR_BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(c)) => body.extend_from_slice(&c),
                _ => break,
            }
        }
        let (code, message, body_region) = parse_error(&String::from_utf8_lossy(&body));
        let code = code.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("error")
                .replace(' ', "")
        });
        let hint = self.hint(status, &code, header_region.or(body_region));
        DownloadError::S3 {
            target: target.into(),
            status: status.as_u16(),
            message: message.unwrap_or_else(|| "the response carries no message".into()),
            code,
            hint,
        }
    }

    fn hint(&self, status: StatusCode, code: &str, region: Option<String>) -> String {
        let key_id = self.opts.credentials.as_ref().map(|c| &c.access_key_id);
        let where_ = match &self.opts.endpoint {
            Some(ep) => format!("at AWS_ENDPOINT_URL={ep}"),
            None => format!("in AWS S3 region {}", self.opts.region),
        };
        let wrong_region = status.is_redirection()
            || matches!(
                code,
                "PermanentRedirect"
                    | "AuthorizationHeaderMalformed"
                    | "IllegalLocationConstraintException"
            );
        if wrong_region {
            return match region {
                Some(r) => format!(" (the bucket is in region {r}: set AWS_REGION={r})"),
                None => " (set AWS_REGION to the bucket's region, or AWS_ENDPOINT_URL)".into(),
            };
        }
        match (code, key_id) {
            ("NoSuchBucket", _) => format!(
                " (no bucket {} {where_}: check the bucket name, AWS_ENDPOINT_URL and AWS_REGION)",
                self.src.bucket
            ),
            ("NoSuchKey", _) => {
                " (the object was listed but is gone: run the download again)".into()
            }
            ("RequestTimeTooSkewed", _) => {
                " (this machine's clock is more than 15 minutes off the store's)".into()
            }
            ("InvalidAccessKeyId", Some(id)) => format!(
                " (AWS_ACCESS_KEY_ID={id} is not a key {where_}: check the credentials Secret)"
            ),
            ("SignatureDoesNotMatch", Some(id)) => format!(
                " (AWS_SECRET_ACCESS_KEY is not the secret of AWS_ACCESS_KEY_ID={id}: check the \
                 credentials Secret)"
            ),
            ("InvalidToken" | "ExpiredToken" | "TokenRefreshRequired", Some(_)) => {
                " (AWS_SESSION_TOKEN is invalid or expired: refresh the credentials Secret)".into()
            }
            (_, Some(id)) if status == StatusCode::FORBIDDEN => format!(
                " (signed with AWS_ACCESS_KEY_ID={id}, which needs s3:ListBucket on the bucket \
                 and s3:GetObject on its objects)"
            ),
            (_, None) if status == StatusCode::FORBIDDEN || status == StatusCode::UNAUTHORIZED => {
                " (sent unsigned: AWS_ACCESS_KEY_ID is not set; a private bucket needs \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the credentials Secret)"
                    .into()
            }
            _ if status == StatusCode::NOT_FOUND => {
                format!(" (nothing answers for bucket {} {where_})", self.src.bucket)
            }
            _ => String::new(),
        }
    }

    /// Every object under the prefix, following continuation tokens.
    async fn list(&self) -> Result<Vec<ListedObject>, DownloadError> {
        let target = self.src.to_string();
        let mut token: Option<String> = None;
        let mut objects = Vec::new();
        loop {
            let url = self.list_url(token.as_deref())?;
            let mut failures = 0;
            let body = loop {
                let resp = match self.get(&url, &[]).send().await {
                    Ok(r) => r,
                    Err(e) => {
                        self.backoff(&mut failures, self.network(&target, e))
                            .await?;
                        continue;
                    }
                };
                if retryable(resp.status()) {
                    let e = self.error(&target, resp).await;
                    self.backoff(&mut failures, e).await?;
                    continue;
                }
                if !resp.status().is_success() {
                    return Err(self.error(&target, resp).await);
                }
                match resp.text().await {
                    Ok(body) => break body,
                    Err(e) => {
                        self.backoff(&mut failures, self.network(&target, e))
                            .await?
                    }
                }
            };
            let page = parse_list_page(&body).map_err(|detail| DownloadError::S3BadResponse {
                target: target.clone(),
                detail,
            })?;
            objects.extend(page.objects);
            match page.next {
                Some(next) if token.as_ref() == Some(&next) => {
                    return Err(DownloadError::S3BadResponse {
                        target,
                        detail: "the listing repeated its continuation token".into(),
                    });
                }
                Some(next) => token = Some(next),
                None => return Ok(objects),
            }
        }
    }

    /// Fetches one object into its partial file (resuming what is there) and renames it into
    /// place.
    async fn fetch(
        &self,
        item: &Planned,
        dest: &Path,
        progress: &Progress,
    ) -> Result<(), DownloadError> {
        let target = self.src.object(&item.obj.key);
        let size = item.obj.size;
        let part = partial_path(dest, &item.obj);
        let path = dest.join(&item.rel);
        for dir in [part.parent(), path.parent()].into_iter().flatten() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| io(dir, e))?;
        }
        let url = self.object_url(&item.obj.key)?;
        let changed = |detail: String| DownloadError::S3Changed {
            target: target.clone(),
            detail,
        };
        let mut failures = 0;
        loop {
            let have = match tokio::fs::metadata(&part).await {
                Ok(m) => m.len().min(size),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(io(&part, e)),
            };
            if have == size {
                // Whole already (a run that stopped before the rename), or an empty object.
                if size == 0 {
                    tokio::fs::File::create(&part)
                        .await
                        .map_err(|e| io(&part, e))?;
                }
                break;
            }
            // If-Match ties the bytes to the listed version, so a replaced object is never
            // spliced onto a partial of the old one.
            let mut extra = Vec::new();
            if let Some(etag) = &item.obj.etag {
                extra.push(("if-match", etag.clone()));
            }
            if have > 0 {
                extra.push(("range", format!("bytes={have}-")));
            }
            let resp = match self.get(&url, &extra).send().await {
                Ok(r) => r,
                Err(e) => {
                    self.backoff(&mut failures, self.network(&target, e))
                        .await?;
                    continue;
                }
            };
            let offset = match resp.status() {
                StatusCode::PARTIAL_CONTENT if have > 0 => {
                    let range = resp
                        .headers()
                        .get(reqwest::header::CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    if range != format!("bytes {have}-{}/{size}", size - 1) {
                        return Err(changed(format!(
                            "asked for bytes {have}- of {size}, got Content-Range {range:?}"
                        )));
                    }
                    have
                }
                StatusCode::OK => {
                    if let Some(len) = resp.content_length()
                        && len != size
                    {
                        return Err(changed(format!("listed at {size} bytes, now {len}")));
                    }
                    0
                }
                StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE => {
                    return Err(changed(format!(
                        "it is no longer the listed version (ETag {}, {size} bytes)",
                        item.obj.etag.as_deref().unwrap_or("none")
                    )));
                }
                s if retryable(s) => {
                    let e = self.error(&target, resp).await;
                    self.backoff(&mut failures, e).await?;
                    continue;
                }
                _ => return Err(self.error(&target, resp).await),
            };
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&part)
                .await
                .map_err(|e| io(&part, e))?;
            file.set_len(offset).await.map_err(|e| io(&part, e))?;
            let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
            out.seek(SeekFrom::Start(offset))
                .await
                .map_err(|e| io(&part, e))?;
            let (n, streamed) =
                stream_body(resp, &mut out, progress, &item.rel, Some(size - offset)).await;
            out.flush().await.map_err(|e| io(&part, e))?;
            drop(out);
            if n > 0 {
                // Progress resets the bound: it counts failures in a row that fetched nothing.
                failures = 0;
            }
            let got = offset + n;
            match streamed {
                Ok(()) if got == size => break,
                Ok(()) if got > size => {
                    return Err(changed(format!("listed at {size} bytes, sent {got}")));
                }
                Ok(()) => {
                    let e = DownloadError::Network {
                        target: target.clone(),
                        cause: format!("the body ended after {got} of {size} bytes"),
                    };
                    self.backoff(&mut failures, e).await?;
                }
                Err(StreamError::Io(e)) => return Err(io(&part, e)),
                Err(StreamError::Net(e)) => {
                    self.backoff(&mut failures, self.network(&target, e))
                        .await?;
                }
            }
        }
        tokio::fs::rename(&part, &path)
            .await
            .map_err(|e| io(&path, e))?;
        progress.file_done();
        tracing::debug!(object = %target, path = %path.display(), bytes = size, "object downloaded");
        Ok(())
    }
}

/// The partial file of one version of an object: named by key, ETag and size, so a run resumes
/// only bytes of the version it lists, and a partial of a replaced object is never reused.
fn partial_path(dest: &Path, obj: &ListedObject) -> PathBuf {
    let mut h = Sha256::new();
    h.update(obj.key.as_bytes());
    h.update([0]);
    h.update(obj.etag.as_deref().unwrap_or_default().as_bytes());
    h.update([0]);
    h.update(obj.size.to_le_bytes());
    dest.join(PARTIAL_DIR).join(sigv4::hex(&h.finalize()))
}

fn io(path: &Path, source: std::io::Error) -> DownloadError {
    DownloadError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Downloads every object under `src` into `dest`, keeping paths below the prefix; skips
/// objects already complete, resumes partial ones.
pub async fn download_s3(
    src: &S3Source,
    opts: &S3Options,
    dest: &Path,
) -> Result<DownloadSummary, DownloadError> {
    let client = Client::new(src, opts)?;
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| io(dest, e))?;
    let listed = client.list().await?;
    let mut planned = Vec::new();
    for obj in listed {
        match relative_path(&src.prefix, &obj.key) {
            Ok(Some(rel)) => planned.push(Planned { obj, rel }),
            Ok(None) => {}
            Err(reason) => {
                return Err(DownloadError::S3UnsafeKey {
                    target: src.object(&obj.key),
                    reason,
                });
            }
        }
    }
    if planned.is_empty() {
        return Err(DownloadError::S3EmptyPrefix(src.to_string()));
    }
    let mut summary = DownloadSummary {
        files: planned.len(),
        ..DownloadSummary::default()
    };
    let mut todo = Vec::new();
    let mut to_fetch = 0u64;
    for item in planned {
        let whole = tokio::fs::metadata(dest.join(&item.rel))
            .await
            .is_ok_and(|m| m.is_file() && m.len() == item.obj.size);
        if whole {
            summary.skipped += 1;
            continue;
        }
        let partial = tokio::fs::metadata(partial_path(dest, &item.obj))
            .await
            .map_or(0, |m| m.len())
            .min(item.obj.size);
        to_fetch = to_fetch.saturating_add(item.obj.size - partial);
        todo.push(item);
    }
    let signed = opts.credentials.as_ref().map(|c| c.access_key_id.as_str());
    tracing::info!(
        source = %src,
        endpoint = opts.endpoint.as_ref().map_or("AWS S3", |e| e.as_str()),
        region = %opts.region,
        access_key_id = signed.unwrap_or("(unsigned)"),
        objects = summary.files,
        already_present = summary.skipped,
        to_fetch = todo.len(),
        bytes = to_fetch,
        dest = %dest.display(),
        "downloading model"
    );
    let progress = Progress::new(Some(to_fetch), todo.len());
    let mut fetches =
        futures::stream::iter(todo.iter().map(|item| client.fetch(item, dest, &progress)))
            .buffer_unordered(opts.concurrency.max(1));
    while let Some(done) = fetches.next().await {
        done?;
        summary.fetched += 1;
    }
    drop(fetches);
    summary.bytes = progress.bytes();
    match tokio::fs::remove_dir_all(dest.join(PARTIAL_DIR)).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(io(&dest.join(PARTIAL_DIR), e));
        }
        _ => {}
    }
    let secs = progress.elapsed().as_secs_f64();
    tracing::info!(
        fetched = summary.fetched,
        skipped = summary.skipped,
        bytes = summary.bytes,
        secs = format!("{secs:.1}"),
        rate_mb_s = format!("{:.1}", summary.bytes as f64 / secs.max(1e-3) / 1e6),
        "model downloaded"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_sources_parse_into_a_bucket_and_a_directory_prefix() {
        let s = S3Source::parse("s3://my-bucket/models/v32").unwrap();
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_str()),
            ("my-bucket", "models/v32/")
        );
        assert_eq!(S3Source::parse("s3://b.c-1/m/").unwrap().prefix, "m/");
        assert_eq!(S3Source::parse("s3://bucket").unwrap().prefix, "");
        assert_eq!(S3Source::parse("s3://bucket/").unwrap().prefix, "");
        assert_eq!(
            S3Source::parse("s3://my-bucket/models/v32")
                .unwrap()
                .to_string(),
            "s3://my-bucket/models/v32/"
        );
        for bad in [
            "s3://",
            "s3://ab",
            "s3://Bucket/x",
            "s3://-b-/x",
            "s3://a_b/x",
            "hf://a/b",
        ] {
            assert!(S3Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_map_below_dest_and_escaping_keys_are_refused() {
        let p = "models/v32/";
        assert_eq!(
            relative_path(p, "models/v32/config.json"),
            Ok(Some("config.json".into()))
        );
        assert_eq!(
            relative_path(p, "models/v32/nested/dir/x.bin"),
            Ok(Some("nested/dir/x.bin".into()))
        );
        assert_eq!(relative_path(p, "models/v32/"), Ok(None));
        assert_eq!(relative_path(p, "models/v32/empty-dir/"), Ok(None));
        assert_eq!(relative_path("", "a/b"), Ok(Some("a/b".into())));
        for bad in [
            "models/v32/../../etc/passwd",
            "models/v32/a/../../b",
            "models/v32//etc/passwd",
            "models/v32/./x",
            "models/v32/..",
            "models/v32/a\0b",
            "models/v32/.s3-partial/x",
            "other/x",
        ] {
            assert!(relative_path(p, bad).is_err(), "{bad:?}");
        }
        assert!(relative_path("", "/etc/passwd").is_err());
        assert_eq!(
            relative_path(p, "models/v32/.s3-partial-not/x"),
            Ok(Some(".s3-partial-not/x".into()))
        );
    }

    #[test]
    fn the_environment_gives_credentials_region_and_endpoint() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = S3Options::from_vars(env(&[])).unwrap();
        assert_eq!(o.region, "us-east-1");
        assert!(o.credentials.is_none() && o.endpoint.is_none());

        let o = S3Options::from_vars(env(&[
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE\n"),
            ("AWS_SECRET_ACCESS_KEY", " secret "),
            ("AWS_SESSION_TOKEN", ""),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://minio.storage:9000"),
        ]))
        .unwrap();
        let c = o.credentials.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("AKIAEXAMPLE", "secret")
        );
        assert_eq!(c.session_token, None);
        assert_eq!(o.region, "eu-west-1");
        assert_eq!(o.endpoint.unwrap().as_str(), "http://minio.storage:9000/");

        let o = S3Options::from_vars(env(&[
            ("AWS_REGION", "ap-south-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ENDPOINT_URL", "http://a:1"),
            ("AWS_ENDPOINT_URL_S3", "https://b"),
        ]))
        .unwrap();
        assert_eq!(o.region, "ap-south-1");
        assert_eq!(o.endpoint.unwrap().as_str(), "https://b/");

        for (pairs, needle) in [
            (
                &[("AWS_ACCESS_KEY_ID", "x")][..],
                "AWS_SECRET_ACCESS_KEY is not",
            ),
            (
                &[("AWS_SECRET_ACCESS_KEY", "x")][..],
                "AWS_ACCESS_KEY_ID is not",
            ),
            (
                &[("AWS_ENDPOINT_URL", "minio:9000")][..],
                "AWS_ENDPOINT_URL=",
            ),
            (&[("AWS_ENDPOINT_URL", "ftp://minio")][..], "http(s)://"),
            (&[("AWS_REGION", "us east")][..], "AWS_REGION="),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = pairs;
            let e = S3Options::from_vars(env(pairs)).unwrap_err().to_string();
            assert!(e.contains(needle), "{pairs:?}: {e}");
        }
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=8).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(p.delay(1000), p.max_delay);
    }

    #[test]
    fn listings_parse_keys_sizes_etags_and_the_continuation_token() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>b</Name><Prefix>m/</Prefix><KeyCount>2</KeyCount><MaxKeys>2</MaxKeys>
  <EncodingType>url</EncodingType><IsTruncated>true</IsTruncated>
  <Contents><Key>m/a%20b/%C3%A9.bin</Key><Size>12</Size><ETag>&quot;abc&quot;</ETag></Contents>
  <Contents><Key>m/c%2Bd</Key><Size>0</Size></Contents>
  <NextContinuationToken>1/x+y=</NextContinuationToken>
</ListBucketResult>"#;
        let page = parse_list_page(xml).unwrap();
        assert_eq!(
            page.objects,
            [
                ListedObject {
                    key: "m/a b/é.bin".into(),
                    size: 12,
                    etag: Some("\"abc\"".into())
                },
                ListedObject {
                    key: "m/c+d".into(),
                    size: 0,
                    etag: None
                }
            ]
        );
        assert_eq!(page.next.as_deref(), Some("1/x+y="));

        let plain = "<ListBucketResult><IsTruncated>false</IsTruncated>\
                     <Contents><Key>a%20b</Key><Size>1</Size></Contents></ListBucketResult>";
        let page = parse_list_page(plain).unwrap();
        assert_eq!(page.objects[0].key, "a%20b");
        assert_eq!(page.next, None);

        for bad in [
            "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>",
            "<ListBucketResult><Contents><Key>a</Key></Contents></ListBucketResult>",
            "<Error><Code>AccessDenied</Code></Error>",
            "not xml",
        ] {
            assert!(parse_list_page(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_bodies_give_their_code_message_and_region() {
        let body = "<Error><Code>AuthorizationHeaderMalformed</Code><Message>wrong region</Message>\
                    <Region>eu-west-1</Region></Error>";
        assert_eq!(
            parse_error(body),
            (
                Some("AuthorizationHeaderMalformed".into()),
                Some("wrong region".into()),
                Some("eu-west-1".into())
            )
        );
        assert_eq!(parse_error(""), (None, None, None));
    }
}
