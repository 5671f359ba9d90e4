//! Fetching a checkpoint into a local directory before the engine starts (the operator runs
//! this as an init container for `hf://` sources): the repository's file list from the Hub
//! API, then each needed file streamed to `NAME.part` and renamed when complete, so a restarted
//! download never mistakes a partial file for a whole one and skips files already fetched.
//! Progress (bytes, rate, ETA) is logged as it goes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures::StreamExt;
use serde::Deserialize;
use thiserror::Error;
use tokio::io::AsyncWriteExt;

#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("unsupported model source {0:?}: expected hf://ORG/NAME[@REVISION]")]
    BadSource(String),
    #[error(
        "{0}: S3 downloads are not in this build yet; copy the model to a volume and use pvc://CLAIM/PATH or a node path"
    )]
    S3Unsupported(String),
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

/// Downloads the model at `source` into `dest` from the Hub (`HF_ENDPOINT` overrides the
/// address, e.g. for a mirror; `HF_TOKEN` authenticates).
pub async fn download(source: &str, dest: &Path) -> Result<(), DownloadError> {
    download_from(&endpoint(), token(), source, dest).await
}

pub async fn download_from(
    endpoint: &str,
    token: Option<String>,
    source: &str,
    dest: &Path,
) -> Result<(), DownloadError> {
    let endpoint = endpoint.trim_end_matches('/');
    if source.starts_with("s3://") {
        return Err(DownloadError::S3Unsupported(source.into()));
    }
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
    let started = Instant::now();
    let mut done_bytes = 0u64;
    for (i, file) in files.iter().enumerate() {
        let path = dest.join(file);
        if tokio::fs::metadata(&path).await.is_ok() {
            tracing::info!(file = %file, "already present; skipping");
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
        let mut out = tokio::fs::File::create(&part).await.map_err(io)?;
        let mut stream = resp.bytes_stream();
        let mut got = 0u64;
        let mut last_log = Instant::now();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| DownloadError::Request {
                url: url.clone(),
                source: e,
            })?;
            out.write_all(&chunk).await.map_err(io)?;
            got += chunk.len() as u64;
            if last_log.elapsed().as_secs() >= 5 {
                last_log = Instant::now();
                let rate = (done_bytes + got) as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let eta = total.map(|t| t.saturating_sub(got) as f64 / rate.max(1.0));
                tracing::info!(
                    file = %file,
                    bytes = got,
                    total = ?total,
                    rate_mb_s = format!("{:.1}", rate / 1e6),
                    eta_s = ?eta.map(|e| e.round()),
                    "downloading {}/{}", i + 1, files.len()
                );
            }
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
        done_bytes += got;
    }
    tracing::info!(
        bytes = done_bytes,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "model downloaded"
    );
    Ok(())
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
