//! The HTTP side of a worker rank of an expert-parallel group. A worker computes for rank 0 and
//! serves no API, so it needs no tokenizer: probes and metrics answer, and every other route is
//! a 503 that points at rank 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::ApiError;
use crate::metrics::Metrics;

struct WorkerState {
    metrics: Metrics,
    /// Set once this rank has joined its group.
    joined: Arc<AtomicBool>,
}

/// `/health`, `/ready` (once `joined` is set) and `/metrics` of a worker rank.
pub fn worker_router(metrics: Metrics, joined: Arc<AtomicBool>) -> Router {
    Router::new()
        .route("/health", get(|| async { (StatusCode::OK, "ok") }))
        .route("/ready", get(ready))
        .route("/metrics", get(render_metrics))
        .fallback(not_here)
        .with_state(Arc::new(WorkerState { metrics, joined }))
}

async fn ready(State(s): State<Arc<WorkerState>>) -> Response {
    if s.joined.load(Ordering::Acquire) {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::unavailable("this worker rank has not joined its group yet").into_response()
    }
}

async fn render_metrics(State(s): State<Arc<WorkerState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn not_here() -> Response {
    ApiError::unavailable(
        "this is a worker rank of an expert-parallel group; send requests to rank 0",
    )
    .into_response()
}
