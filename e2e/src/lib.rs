//! Shared helpers for the end-to-end suite.
//!
//! Two kinds of tests use them. The `controlplane` test binary starts its own control plane
//! ([`controlplane`]: etcd, kube-apiserver and kube-controller-manager built from Go modules)
//! with a node agent ([`node`]) standing in for the kubelet, and runs the operator as a
//! separate process against it. The other tests run against the cluster named by `KUBECONFIG`
//! and skip, printing why, when it is unset or the cluster cannot be reached.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt};

use deepseek_operator::api::DeepSeekDeployment;

pub mod controlplane;
pub mod node;

/// A client for the cluster in `KUBECONFIG`, or the reason the suite is skipped.
pub async fn cluster() -> Result<Client, String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Err("KUBECONFIG is not set; no cluster to test against".into());
    }
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot build a client from KUBECONFIG: {e}"))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| format!("the cluster in KUBECONFIG does not answer: {e}"))?;
    Ok(client)
}

/// Installs or updates the `DeepSeekDeployment` CRD and waits until it is served.
pub async fn install_crd(client: &Client) -> Result<(), kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DeepSeekDeployment::crd();
    let name = crd.metadata.name.clone().expect("CRD name");
    crds.patch(
        &name,
        &PatchParams::apply("deepseek-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let dsds: Api<DeepSeekDeployment> = Api::all(client.clone());
    for _ in 0..60 {
        if dsds.list(&Default::default()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    dsds.list(&Default::default()).await.map(|_| ())
}

/// Polls `check` every second until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The workspace root (the directory holding `charts/`, `deploy/`, `examples/`).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ has a parent")
        .to_path_buf()
}

/// Reads a file under the workspace root, panicking with its path when it cannot.
pub fn read_repo_file(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses one YAML document into JSON, so tests can walk it without typed structs.
pub fn yaml_to_json(text: &str) -> Result<serde_json::Value, String> {
    serde_saphyr::from_str::<serde_json::Value>(text).map_err(|e| e.to_string())
}

/// Splits a multi-document YAML stream on `---` lines and parses every non-empty document.
pub fn yaml_documents(text: &str) -> Result<Vec<serde_json::Value>, String> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let body: String = current
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n");
            if !body.trim().is_empty() {
                docs.push(yaml_to_json(&current)?);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

/// A minimal HTTP/1.1 client over a plain TCP connection: one request, `Connection: close`,
/// whole response read. Enough for probes and one chat request without an HTTP client crate.
pub mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::Duration;

    /// Status code and body of a response.
    #[derive(Debug, Clone)]
    pub struct Response {
        /// HTTP status code.
        pub status: u16,
        /// Body, with any chunked transfer encoding removed.
        pub body: String,
    }

    /// Sends `method path` with an optional JSON body to `addr` (`host:port`).
    pub fn request(
        addr: &str,
        method: &str,
        path: &str,
        json: Option<&str>,
        timeout: Duration,
    ) -> std::io::Result<Response> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let body = json.unwrap_or("");
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if json.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        stream.write_all(head.as_bytes())?;
        stream.write_all(body.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse(&raw).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "malformed HTTP response: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            )
        })
    }

    fn parse(raw: &[u8]) -> Option<Response> {
        let text = String::from_utf8_lossy(raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        let chunked = head.lines().any(|l| {
            l.to_ascii_lowercase()
                .starts_with("transfer-encoding: chunked")
        });
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_string()
        };
        Some(Response { status, body })
    }

    fn dechunk(mut rest: &str) -> Option<String> {
        let mut out = String::new();
        loop {
            let (size, tail) = rest.split_once("\r\n")?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            if size == 0 {
                return Some(out);
            }
            out.push_str(tail.get(..size)?);
            rest = tail.get(size + 2..)?;
        }
    }
}

/// Path of binary `bin` of workspace package `package`, built from the current sources.
///
/// `cargo test --workspace` builds every package's binaries next to the test executables
/// (`target/<profile>/`) before any test runs, so that copy is current and used. When it is
/// missing (only this crate tested), the binary is built here, into a separate target
/// directory: the running `cargo test` may still hold the lock on its own. A copy older than
/// the package's sources is used with a warning (`cargo build -p PACKAGE` refreshes it).
pub fn workspace_binary(package: &str, bin: &str) -> std::path::PathBuf {
    let file = format!("{bin}{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().expect("test executable path");
    // Test executables live in `target/<profile>/deps/`.
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>/deps");
    let beside = profile_dir.join(&file);
    let package_dir = repo_root().join(package.trim_start_matches("deepseek-"));
    let sources =
        newest_mtime(&package_dir.join("src")).max(newest_mtime(&package_dir.join("Cargo.toml")));
    let fresh = |p: &std::path::Path| {
        std::fs::metadata(p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| Some(t) >= sources)
    };
    if beside.exists() {
        if !fresh(&beside) {
            eprintln!(
                "warning: {} is older than {package}'s sources; run `cargo build -p {package}`",
                beside.display()
            );
        }
        return beside;
    }
    let target_dir = profile_dir.join("e2e-bin");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(cargo)
        .current_dir(repo_root())
        .args(["build", "-p", package, "--bin", bin, "--target-dir"])
        .arg(&target_dir)
        .status()
        .expect("running cargo build");
    assert!(status.success(), "cargo build -p {package} failed");
    let built = target_dir.join("debug").join(&file);
    assert!(
        built.exists(),
        "{} is missing after cargo build",
        built.display()
    );
    built
}

/// Newest modification time of a file, or of any file below a directory.
fn newest_mtime(path: &std::path::Path) -> Option<std::time::SystemTime> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return meta.modified().ok();
    }
    std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| newest_mtime(&e.path()))
        .max()
}

/// The field manager of the suite's own server-side applies.
pub const FIELD_MANAGER: &str = "deepseek-e2e";

/// Server-side applies every document of a YAML stream in order, as `kubectl apply
/// --server-side` does: namespaced kinds without a namespace go to `default_namespace`. `edit`
/// may change each document first. Kinds defined by a CRD applied just before are waited for.
pub async fn apply_manifest(
    client: &Client,
    text: &str,
    default_namespace: &str,
    mut edit: impl FnMut(&mut serde_json::Value),
) -> Result<Vec<kube::api::DynamicObject>, String> {
    use kube::ResourceExt;
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    use kube::discovery::{Scope, pinned_kind};

    let mut applied = Vec::new();
    for mut doc in yaml_documents(text)? {
        edit(&mut doc);
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let (group, version) = api_version
            .rsplit_once('/')
            .unwrap_or(("", api_version.as_str()));
        let gvk = GroupVersionKind::gvk(group, version, &kind);
        let found = wait_for(Duration::from_secs(60), || async {
            pinned_kind(client, &gvk).await.ok()
        })
        .await;
        let (resource, caps) =
            found.ok_or_else(|| format!("{api_version} {kind} is not served"))?;
        let obj: DynamicObject = serde_json::from_value(doc).map_err(|e| e.to_string())?;
        let name = obj.name_any();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let ns = obj.namespace().unwrap_or_else(|| default_namespace.into());
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
        };
        let out = api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .map_err(|e| format!("applying {kind} {name}: {e}"))?;
        applied.push(out);
    }
    Ok(applied)
}
