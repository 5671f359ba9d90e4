//! The operator's own Prometheus metrics and the HTTP endpoints `/metrics`, `/healthz` and
//! `/readyz`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::Error;
use crate::api::DeepSeekDeploymentStatus;

/// The group counts `deepseek_operator_groups` reports, by its `kind` label.
const GROUP_KINDS: [&str; 4] = ["desired", "current", "ready", "updated"];
/// The status conditions `deepseek_operator_condition` reports, by its `type` label.
const CONDITION_TYPES: [&str; 4] = ["Available", "Progressing", "Degraded", "ScalingLimited"];

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
    /// `deepseek_operator_groups{namespace,deployment,kind}`: engine groups per deployment
    /// (`desired`, `current`, `ready`, `updated`), from the status last computed.
    pub groups: IntGaugeVec,
    /// `deepseek_operator_condition{namespace,deployment,type}`: 1 when the status condition
    /// is `True`, else 0.
    pub condition: IntGaugeVec,
    /// `deepseek_operator_scale_events_total{namespace,deployment,direction}`: the built-in
    /// autoscaler's changes of the group count (`up`, `down`).
    pub scale_events: IntCounterVec,
    /// Deployments (namespace, name) that have series, so deleted ones can be dropped.
    known: Arc<Mutex<BTreeSet<(String, String)>>>,
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
        let groups = IntGaugeVec::new(
            Opts::new(
                "deepseek_operator_groups",
                "Engine groups of a DeepSeekDeployment: desired, current (with pods), ready, updated",
            ),
            &["namespace", "deployment", "kind"],
        )
        .expect("valid metric");
        let condition = IntGaugeVec::new(
            Opts::new(
                "deepseek_operator_condition",
                "1 when the DeepSeekDeployment's status condition of this type is True",
            ),
            &["namespace", "deployment", "type"],
        )
        .expect("valid metric");
        let scale_events = IntCounterVec::new(
            Opts::new(
                "deepseek_operator_scale_events_total",
                "Changes of a DeepSeekDeployment's group count made by the built-in autoscaler",
            ),
            &["namespace", "deployment", "direction"],
        )
        .expect("valid metric");
        for c in [
            Box::new(reconciliations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(leader.clone()),
            Box::new(groups.clone()),
            Box::new(condition.clone()),
            Box::new(scale_events.clone()),
        ] {
            registry.register(c).expect("metric registered once");
        }
        Self {
            registry,
            reconciliations,
            failures,
            duration,
            leader,
            groups,
            condition,
            scale_events,
            known: Default::default(),
        }
    }

    /// Publishes a deployment's group counts and conditions from its status.
    pub fn observe_status(&self, namespace: &str, name: &str, st: &DeepSeekDeploymentStatus) {
        if let Ok(mut k) = self.known.lock() {
            k.insert((namespace.to_string(), name.to_string()));
        }
        let counts = [
            st.desired_replicas,
            st.replicas,
            st.ready_replicas,
            st.updated_replicas,
        ];
        for (kind, v) in GROUP_KINDS.iter().zip(counts) {
            self.groups
                .with_label_values(&[namespace, name, kind])
                .set(v as i64);
        }
        for ty in CONDITION_TYPES {
            let on = st
                .conditions
                .iter()
                .any(|c| c.type_ == ty && c.status == "True");
            self.condition
                .with_label_values(&[namespace, name, ty])
                .set(on as i64);
        }
    }

    /// Counts one change of the group count from `from` to `to` by the autoscaler.
    pub fn scaled(&self, namespace: &str, name: &str, from: i32, to: i32) {
        let direction = if to > from { "up" } else { "down" };
        if from != to {
            self.scale_events
                .with_label_values(&[namespace, name, direction])
                .inc();
        }
    }

    /// Drops the series of every deployment not in `live` (deleted since they were published).
    pub fn retain_deployments(&self, live: &BTreeSet<(String, String)>) {
        let Ok(mut known) = self.known.lock() else {
            return;
        };
        let gone: Vec<(String, String)> = known.difference(live).cloned().collect();
        for (ns, name) in gone {
            for kind in GROUP_KINDS {
                let _ = self.groups.remove_label_values(&[&ns, &name, kind]);
            }
            for ty in CONDITION_TYPES {
                let _ = self.condition.remove_label_values(&[&ns, &name, ty]);
            }
            for dir in ["up", "down"] {
                let _ = self.scale_events.remove_label_values(&[&ns, &name, dir]);
            }
            known.remove(&(ns, name));
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

    #[test]
    fn deployment_gauges_follow_the_status_and_go_away_with_the_deployment() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let m = Metrics::default();
        let cond = |t: &str, s: &str| Condition {
            type_: t.into(),
            status: s.into(),
            reason: "R".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
        };
        let st = DeepSeekDeploymentStatus {
            desired_replicas: 3,
            replicas: 2,
            ready_replicas: 1,
            updated_replicas: 2,
            conditions: vec![cond("Available", "True"), cond("Degraded", "False")],
            ..Default::default()
        };
        m.observe_status("ml", "v32", &st);
        m.scaled("ml", "v32", 2, 3);
        m.scaled("ml", "v32", 3, 3);
        let text = m.encode();
        for line in [
            r#"deepseek_operator_groups{deployment="v32",kind="desired",namespace="ml"} 3"#,
            r#"deepseek_operator_groups{deployment="v32",kind="ready",namespace="ml"} 1"#,
            r#"deepseek_operator_condition{deployment="v32",namespace="ml",type="Available"} 1"#,
            r#"deepseek_operator_condition{deployment="v32",namespace="ml",type="Degraded"} 0"#,
            r#"deepseek_operator_scale_events_total{deployment="v32",direction="up",namespace="ml"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"direction="down""#));
        m.observe_status("ml", "other", &st);
        m.retain_deployments(&BTreeSet::from([("ml".to_string(), "other".to_string())]));
        let text = m.encode();
        assert!(!text.contains(r#"deployment="v32""#), "{text}");
        assert!(text.contains(r#"deployment="other""#));
    }
}
