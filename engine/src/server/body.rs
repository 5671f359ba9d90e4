//! Request bodies under a byte budget derived from `max_model_len`, read before any parsing:
//! a request cannot make the server buffer, parse or tokenize more than its prompt could
//! ever be worth.

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, StatusCode, header};
use http_body_util::BodyExt;

use super::ApiError;
use super::serve::BodyTimeout;

/// Per-request limits of the API handlers. The defaults follow `max_model_len`.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    /// Body bytes allowed per token of `max_model_len`. A token is a few bytes of text, and
    /// JSON escapes (`\u4e2d`) can take six bytes for one. Default 32.
    pub body_bytes_per_token: usize,
    /// Body bytes allowed on top, for the JSON structure, sampling fields and tool
    /// definitions. Default 1 MiB.
    pub body_overhead_bytes: usize,
    /// The smallest body limit, whatever `max_model_len`. Default 1 MiB.
    pub min_body_bytes: usize,
    /// Longest stop string, in bytes. Default 4096.
    pub max_stop_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            body_bytes_per_token: 32,
            body_overhead_bytes: 1 << 20,
            min_body_bytes: 1 << 20,
            max_stop_bytes: 4096,
        }
    }
}

impl RequestLimits {
    /// The largest request body accepted by a server of `max_model_len` tokens.
    pub fn body_limit(&self, max_model_len: usize) -> usize {
        max_model_len
            .saturating_mul(self.body_bytes_per_token)
            .saturating_add(self.body_overhead_bytes)
            .max(self.min_body_bytes)
    }
}

/// Bytes past the limit still read (and dropped) before answering 413, so a client that
/// sends its whole body before reading the answer gets the 413 rather than a reset.
const DISCARD_PAST_LIMIT: usize = 16 << 20;

fn too_large(limit: usize) -> ApiError {
    ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        code: Some("request_too_large"),
        ..ApiError::invalid(
            format!(
                "the request body is larger than this server's limit of {limit} bytes \
                 (set by its maximum context length)"
            ),
            None,
        )
    }
}

/// Reads a whole request body of at most `limit` bytes.
pub(super) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit.saturating_add(DISCARD_PAST_LIMIT) as u64) {
        return Err(too_large(limit));
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n.min(limit as u64) as usize));
    let mut seen = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| body_error(&e))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen <= limit {
            buf.extend_from_slice(&data);
        } else if seen > limit.saturating_add(DISCARD_PAST_LIMIT) {
            break;
        } else {
            buf = Vec::new();
        }
    }
    if seen > limit {
        return Err(too_large(limit));
    }
    Ok(Bytes::from(buf))
}

fn body_error(e: &axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<BodyTimeout>() {
            return ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                code: Some("request_timeout"),
                ..ApiError::invalid(t.to_string(), None)
            };
        }
        source = err.source();
    }
    ApiError::invalid(format!("could not read the request body: {e}"), None)
}
