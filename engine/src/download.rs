//! Fetching a checkpoint into a local directory before the engine starts (the operator runs
//! this as an init container for `hf://` and `s3://` sources).
//!
//! - `hf://ORG/NAME[@REVISION]`: the repository's file list from the Hub API, then each file an
//!   engine needs.
//! - `s3://BUCKET[/PREFIX]`: every object under the prefix, from S3 or an S3-compatible store
//!   ([`s3`] says how).
//!
//! Either way each file is streamed to disk under a temporary name and renamed when complete, so
//! a restarted download never mistakes a partial file for a whole one and skips files already
//! fetched. Progress (bytes, rate, ETA) is logged as it goes, by one [`Progress`] for both.

mod s3;
mod sigv4;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Deserialize;
use thiserror::Error;
use tokio::io::{AsyncWrite, AsyncWriteExt};

pub use s3::{RetryPolicy, S3Options, S3Source, download_s3};
pub use sigv4::Credentials;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error(
        "unsupported model source {0:?}: expected hf://ORG/NAME[@REVISION] or s3://BUCKET[/PREFIX]"
    )]
    BadSource(String),
    #[error("{url}: HTTP {status}{hint}")]
    Http {
        url: String,
        status: u16,
        hint: String,
    },
    #[error("{url}: {source}")]
    Request { url: String, source: reqwest::Error },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the repository lists no config.json or safetensors files")]
    NothingToFetch,
    /// An S3 request answered with an error status.
    #[error("{target}: HTTP {status} {code}: {message}{hint}")]
    S3 {
        /// `s3://BUCKET/KEY` of the object, or `s3://BUCKET/PREFIX` of the listing.
        target: String,
        status: u16,
        /// S3's error code (`NoSuchBucket`, `AccessDenied`, ...), or the status's reason.
        code: String,
        message: String,
        /// What to check, naming the environment variable involved.
        hint: String,
    },
    #[error("{target}: network error: {cause}")]
    Network { target: String, cause: String },
    #[error("{last} (gave up after {})", attempts_phrase(*.attempts))]
    GaveUp {
        attempts: u32,
        last: Box<DownloadError>,
    },
    #[error(
        "{0}: no objects under this prefix (the prefix is a directory: s3://BUCKET/models/v32 \
         fetches the keys that start with models/v32/; keys are case-sensitive)"
    )]
    S3EmptyPrefix(String),
    #[error("{target}: {reason}; refusing to download")]
    S3UnsafeKey {
        target: String,
        reason: &'static str,
    },
    #[error("{target}: {detail}")]
    S3BadResponse { target: String, detail: String },
    #[error("{target} changed while it was being downloaded ({detail}); run the download again")]
    S3Changed { target: String, detail: String },
    #[error("{0}")]
    S3Config(String),
}

fn attempts_phrase(n: u32) -> String {
    if n == 1 {
        "1 attempt".into()
    } else {
        format!("{n} attempts")
    }
}

/// What one run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownloadSummary {
    /// Files the source holds: for s3://, the objects under the prefix less directory markers.
    pub files: usize,
    /// Files this run fetched, wholly or the rest of a partial one.
    pub fetched: usize,
    /// Files already complete, left alone.
    pub skipped: usize,
    /// Bytes this run received.
    pub bytes: u64,
}

/// How often [`Progress`] logs.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// The progress of one run, shared by its concurrent transfers: bytes received, rate, and an ETA
/// from the run's total when the source tells it upfront (s3://), else from the current file's
/// length (hf://).
pub(crate) struct Progress {
    started: Instant,
    total: Option<u64>,
    files: usize,
    state: Mutex<ProgressState>,
}

struct ProgressState {
    bytes: u64,
    files_done: usize,
    last_log: Instant,
}

impl Progress {
    pub(crate) fn new(total: Option<u64>, files: usize) -> Self {
        let now = Instant::now();
        Progress {
            started: now,
            total,
            files,
            state: Mutex::new(ProgressState {
                bytes: 0,
                files_done: 0,
                last_log: now,
            }),
        }
    }

    /// `n` more bytes of `file`, of which `file_left` remain after them.
    pub(crate) fn advance(&self, file: &str, n: u64, file_left: Option<u64>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.bytes = st.bytes.saturating_add(n);
        if st.last_log.elapsed() < PROGRESS_EVERY {
            return;
        }
        st.last_log = Instant::now();
        let rate = st.bytes as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let left = self.total.map(|t| t.saturating_sub(st.bytes)).or(file_left);
        let eta = left.map(|l| (l as f64 / rate.max(1.0)).round());
        tracing::info!(
            file = %file,
            bytes = st.bytes,
            total = ?self.total,
            rate_mb_s = format!("{:.1}", rate / 1e6),
            eta_s = ?eta,
            "downloading {}/{}", st.files_done + 1, self.files
        );
    }

    pub(crate) fn file_done(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.files_done += 1;
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// Why [`stream_body`] stopped early.
pub(crate) enum StreamError {
    /// The connection failed mid-body: what was written stays valid, a retry resumes after it.
    Net(reqwest::Error),
    Io(std::io::Error),
}

/// Streams a response body into `out` chunk by chunk (never a whole file in memory), counting
/// it in `progress`. Returns the bytes written, also when it stopped early.
pub(crate) async fn stream_body<W: AsyncWrite + Unpin>(
    resp: reqwest::Response,
    out: &mut W,
    progress: &Progress,
    file: &str,
    expected: Option<u64>,
) -> (u64, Result<(), StreamError>) {
    let mut stream = resp.bytes_stream();
    let mut got = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return (got, Err(StreamError::Net(e))),
        };
        if let Err(e) = out.write_all(&chunk).await {
            return (got, Err(StreamError::Io(e)));
        }
        got += chunk.len() as u64;
        progress.advance(
            file,
            chunk.len() as u64,
            expected.map(|t| t.saturating_sub(got)),
        );
    }
    (got, Ok(()))
}

/// Downloads the model at `source` into `dest`, configured by the environment: for hf://,
/// `HF_ENDPOINT` (e.g. a mirror) and `HF_TOKEN`; for s3://, what [`S3Options::from_env`] reads.
pub async fn download(source: &str, dest: &Path) -> Result<DownloadSummary, DownloadError> {
    if source.starts_with("s3://") {
        let src = S3Source::parse(source)?;
        return download_s3(&src, &S3Options::from_env()?, dest).await;
    }
    download_from(&endpoint(), token(), source, dest).await
}

/// A parsed `hf://ORG/NAME[@REVISION]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSource {
    pub repo: String,
    pub revision: String,
}

impl HubSource {
    pub fn parse(source: &str) -> Result<Self, DownloadError> {
        let rest = source
            .strip_prefix("hf://")
            .ok_or_else(|| DownloadError::BadSource(source.into()))?;
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v),
            Some(_) => return Err(DownloadError::BadSource(source.into())),
            None => (rest, "main"),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let valid = |s: &str| {
            !s.starts_with('.')
                && !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        if parts.len() != 2 || !parts.iter().all(|p| valid(p)) {
            return Err(DownloadError::BadSource(source.into()));
        }
        Ok(HubSource {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }
}

/// Files an engine needs from a repository: config, tokenizer and weights (no other formats).
pub fn wanted(file: &str) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    file == name
        && (name.ends_with(".safetensors")
            || matches!(
                name,
                "config.json"
                    | "model.safetensors.index.json"
                    | "tokenizer.json"
                    | "tokenizer_config.json"
                    | "generation_config.json"
            ))
}

#[derive(Deserialize)]
struct RepoInfo {
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
}

fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .unwrap_or_else(|_| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_string()
}

fn token() -> Option<String> {
    ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
}

fn http_error(url: &str, status: reqwest::StatusCode) -> DownloadError {
    let hint = match status.as_u16() {
        401 | 403 => {
            " (set HF_TOKEN from the credentials Secret for gated or private models)".into()
        }
        404 => " (check the repository name and revision)".into(),
        _ => String::new(),
    };
    DownloadError::Http {
        url: url.to_string(),
        status: status.as_u16(),
        hint,
    }
}

/// Downloads the hf:// model at `source` from the Hub at `endpoint` into `dest`.
pub async fn download_from(
    endpoint: &str,
    token: Option<String>,
    source: &str,
    dest: &Path,
) -> Result<DownloadSummary, DownloadError> {
    let endpoint = endpoint.trim_end_matches('/');
    let src = HubSource::parse(source)?;
    tokio::fs::create_dir_all(dest)
        .await
        .map_err(|e| DownloadError::Io {
            path: dest.into(),
            source: e,
        })?;
    let client = reqwest::Client::builder()
        .user_agent(concat!("deepseek-engine/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DownloadError::Request {
            url: endpoint.to_string(),
            source: e,
        })?;
    let auth = |rb: reqwest::RequestBuilder| match &token {
        Some(t) => rb.bearer_auth(t),
        None => rb,
    };
    let api = format!(
        "{endpoint}/api/models/{}/revision/{}",
        src.repo, src.revision
    );
    let resp = auth(client.get(&api))
        .send()
        .await
        .map_err(|e| DownloadError::Request {
            url: api.clone(),
            source: e,
        })?;
    if !resp.status().is_success() {
        return Err(http_error(&api, resp.status()));
    }
    let info: RepoInfo = resp.json().await.map_err(|e| DownloadError::Request {
        url: api.clone(),
        source: e,
    })?;
    let files: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| wanted(f))
        .collect();
    if !files.iter().any(|f| f == "config.json")
        || !files.iter().any(|f| f.ends_with(".safetensors"))
    {
        return Err(DownloadError::NothingToFetch);
    }
    tracing::info!(repo = %src.repo, revision = %src.revision, files = files.len(), dest = %dest.display(), "downloading model");
    let progress = Progress::new(None, files.len());
    let mut summary = DownloadSummary {
        files: files.len(),
        ..DownloadSummary::default()
    };
    for file in &files {
        let path = dest.join(file);
        if tokio::fs::metadata(&path).await.is_ok() {
            tracing::info!(file = %file, "already present; skipping");
            summary.skipped += 1;
            progress.file_done();
            continue;
        }
        let url = format!("{endpoint}/{}/resolve/{}/{}", src.repo, src.revision, file);
        let resp = auth(client.get(&url))
            .send()
            .await
            .map_err(|e| DownloadError::Request {
                url: url.clone(),
                source: e,
            })?;
        if !resp.status().is_success() {
            return Err(http_error(&url, resp.status()));
        }
        let total = resp.content_length();
        let part = dest.join(format!("{file}.part"));
        let io = |e| DownloadError::Io {
            path: part.clone(),
            source: e,
        };
        let mut out = tokio::io::BufWriter::new(tokio::fs::File::create(&part).await.map_err(io)?);
        let (got, streamed) = stream_body(resp, &mut out, &progress, file, total).await;
        match streamed {
            Ok(()) => {}
            Err(StreamError::Net(e)) => {
                return Err(DownloadError::Request {
                    url: url.clone(),
                    source: e,
                });
            }
            Err(StreamError::Io(e)) => return Err(io(e)),
        }
        out.flush().await.map_err(io)?;
        drop(out);
        if let Some(t) = total
            && t != got
        {
            return Err(DownloadError::Http {
                url,
                status: 200,
                hint: format!(" (body ended after {got} of {t} bytes)"),
            });
        }
        tokio::fs::rename(&part, &path).await.map_err(io)?;
        summary.fetched += 1;
        progress.file_done();
    }
    summary.bytes = progress.bytes();
    tracing::info!(
        bytes = summary.bytes,
        secs = format!("{:.1}", progress.elapsed().as_secs_f64()),
        "model downloaded"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_sources_parse_with_and_without_a_revision() {
        assert_eq!(
            HubSource::parse("hf://deepseek-ai/DeepSeek-V3.2@abc123").unwrap(),
            HubSource {
                repo: "deepseek-ai/DeepSeek-V3.2".into(),
                revision: "abc123".into()
            }
        );
        assert_eq!(HubSource::parse("hf://a/b").unwrap().revision, "main");
        for bad in [
            "s3://x/y",
            "hf://a",
            "hf://a/b/c",
            "hf://a/b@",
            "hf://../b",
            "hf://a b/c",
        ] {
            assert!(HubSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn only_config_tokenizer_and_safetensors_files_are_fetched() {
        for f in [
            "config.json",
            "model-00001-of-00163.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ] {
            assert!(wanted(f), "{f}");
        }
        for f in [
            "README.md",
            "pytorch_model.bin",
            "inference/model.py",
            "figures/x.png",
            "original/model.safetensors",
        ] {
            assert!(!wanted(f), "{f}");
        }
    }
}
