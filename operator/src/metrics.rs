//! The operator's own Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and
//! `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::Error;

/// Counters and timings of reconciles, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    /// Registry the metrics below belong to; `/metrics` encodes it.
    pub registry: Registry,
    /// `deepseek_operator_reconciliations_total`: reconciles started.
    pub reconciliations: IntCounterVec,
    /// `deepseek_operator_reconcile_errors_total{error}`: failed reconciles by error kind.
    pub failures: IntCounterVec,
    /// `deepseek_operator_reconcile_duration_seconds`: time per reconcile.
    pub duration: HistogramVec,
    /// `deepseek_operator_leader`: 1 while this replica holds the leader lease.
    pub leader: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(Registry::new())
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: Registry) -> Self {
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "deepseek_operator_reconciliations_total",
                "Reconciles of DeepSeekDeployments started",
            ),
            &[],
        )
        .expect("valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "deepseek_operator_reconcile_errors_total",
                "Reconciles of DeepSeekDeployments that failed, by error kind",
            ),
            &["error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "deepseek_operator_reconcile_duration_seconds",
                "Time taken by one reconcile of a DeepSeekDeployment",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &[],
        )
        .expect("valid metric");
        let leader = IntGauge::new(
            "deepseek_operator_leader",
            "1 while this operator replica holds the leader lease",
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
        }
    }

    /// Counts a reconcile and returns a timer that records its duration when dropped.
    pub fn reconcile_started(&self) -> prometheus::HistogramTimer {
        self.reconciliations.with_label_values::<&str>(&[]).inc();
        self.duration.with_label_values::<&str>(&[]).start_timer()
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, error: &Error) {
        self.failures
            .with_label_values(&[error.metric_label()])
            .inc();
    }

    /// The registry in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("text format is UTF-8")
    }
}

/// State behind the HTTP endpoints.
#[derive(Clone)]
pub struct Health {
    /// Metrics to serve.
    pub metrics: Arc<Metrics>,
    /// Set once the operator has checked the API server and the CRD.
    pub ready: Arc<AtomicBool>,
}

/// The HTTP routes: `/metrics`, `/healthz` (the process answers), `/readyz` (startup checks
/// passed; true on standby replicas too, since they are healthy).
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(health)
}

async fn metrics_handler(State(h): State<Health>) -> String {
    h.metrics.encode()
}

async fn ready_handler(State(h): State<Health>) -> (StatusCode, &'static str) {
    if h.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting")
    }
}

/// Serves [`router`] on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_carry_the_operator_prefix_and_unit_suffixes() {
        let m = Metrics::default();
        let _t = m.reconcile_started();
        m.reconcile_failed(&Error::InvalidSpec("x".into()));
        drop(_t);
        let text = m.encode();
        assert!(text.contains("deepseek_operator_reconciliations_total 1"));
        assert!(
            text.contains("deepseek_operator_reconcile_errors_total{error=\"invalid_spec\"} 1")
        );
        assert!(text.contains("deepseek_operator_reconcile_duration_seconds_count 1"));
        assert!(text.contains("deepseek_operator_leader 0"));
    }
}
