//! Controller tests against the in-process API server double.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::Api;

use super::*;
use crate::api::{CONDITION_AVAILABLE, CONDITION_PROGRESSING, GroupFailurePolicy, GroupState};
use crate::autoscale::scrape::Reading;
use crate::fixtures::{FakeApiServer, NS};

async fn reconcile_once(fake: &FakeApiServer, ctx: &Arc<Context>, name: &str) -> Result<Action> {
    let dsd = fake.deployment(name);
    reconcile(Arc::new(dsd), ctx.clone()).await
}

fn cond(dsd: &DeepSeekDeployment, type_: &str) -> (String, String) {
    let c = status::find(dsd.status.as_ref(), type_).unwrap_or_else(|| panic!("condition {type_}"));
    (c.status.clone(), c.reason.clone())
}

fn events(fake: &FakeApiServer, from: usize) -> Vec<String> {
    fake.calls()
        .into_iter()
        .skip(from)
        .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
        .map(|c| c.path)
        .collect()
}

/// Reconciles, lets the fake StatefulSet controller start every pod, and reconciles again
/// until nothing is written.
async fn converge(fake: &FakeApiServer, ctx: &Arc<Context>, name: &str) {
    for _ in 0..10 {
        let before = fake.calls().len();
        reconcile_once(fake, ctx, name).await.expect("reconcile");
        fake.run_statefulsets();
        if fake.writes_since(before).is_empty() {
            return;
        }
    }
    panic!("did not converge in 10 reconciles");
}

fn setup(dsd: DeepSeekDeployment) -> (FakeApiServer, Arc<Context>) {
    let fake = FakeApiServer::default();
    fake.insert(&dsd);
    let ctx = fake.context();
    (fake, ctx)
}

#[tokio::test]
async fn a_new_deployment_gets_its_config_services_groups_and_budgets() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();

    assert_eq!(fake.names::<ConfigMap>(), ["tiny-engine"]);
    assert_eq!(fake.names::<Service>(), ["tiny", "tiny-g0", "tiny-g1"]);
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0", "tiny-g1"]);
    assert_eq!(fake.names::<PodDisruptionBudget>(), ["tiny-g0", "tiny-g1"]);
    let applies = fake
        .calls()
        .iter()
        .filter(|c| c.method == Method::PATCH && c.query.contains("fieldManager=deepseek-operator"))
        .count();
    assert_eq!(
        applies,
        1 + 2 * 3 + 1 + 1,
        "config map, 3 per group, serving service, status"
    );
    let dsd = fake.deployment("tiny");
    assert_eq!(
        cond(&dsd, CONDITION_PROGRESSING),
        ("True".into(), "ScalingUp".into())
    );
    assert_eq!(
        cond(&dsd, CONDITION_AVAILABLE),
        ("False".into(), "MinimumGroupsUnavailable".into())
    );
    assert_eq!(events(&fake, 0).len(), 1, "one GroupsCreated Event");
}

#[tokio::test]
async fn a_deployment_converges_to_available_with_every_group_ready() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    converge(&fake, &ctx, "tiny").await;

    let dsd = fake.deployment("tiny");
    let st = dsd.status.as_ref().unwrap();
    assert_eq!(
        (
            st.replicas,
            st.ready_replicas,
            st.updated_replicas,
            st.desired_replicas
        ),
        (2, 2, 2, 2)
    );
    assert_eq!(st.pods_per_group, 2);
    assert_eq!(st.observed_generation, Some(1));
    assert!(
        st.groups
            .iter()
            .all(|g| g.state == GroupState::Ready && g.ready_pods == 2)
    );
    assert_eq!(
        cond(&dsd, CONDITION_AVAILABLE),
        ("True".into(), "MinimumGroupsAvailable".into())
    );
    assert_eq!(
        cond(&dsd, CONDITION_PROGRESSING),
        ("False".into(), "Converged".into())
    );
    assert_eq!(
        cond(&dsd, CONDITION_DEGRADED),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(
        fake.names::<Pod>(),
        ["tiny-g0-0", "tiny-g0-1", "tiny-g1-0", "tiny-g1-1"]
    );
}

#[tokio::test]
async fn reconciling_a_converged_deployment_again_writes_nothing() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    converge(&fake, &ctx, "tiny").await;
    let before = fake.calls().len();
    let action = reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(
        fake.writes_since(before).len(),
        0,
        "{:?}",
        fake.writes_since(before)
    );
    assert_eq!(action, Action::requeue(RESYNC));
}

#[tokio::test]
async fn a_changed_object_is_put_back_on_the_next_reconcile() {
    let (fake, ctx) = setup(DeepSeekDeployment::test());
    converge(&fake, &ctx, "tiny").await;
    let mut sts: StatefulSet = fake.get("tiny-g0").unwrap();
    sts.spec.replicas = Some(5);
    fake.insert(&sts);
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    let sts: StatefulSet = fake.get("tiny-g0").unwrap();
    assert_eq!(sts.spec.replicas, Some(2));
}

/// A scale-in from outside (a user, an HPA or KEDA lowering `spec.replicas`) drains like the
/// built-in autoscaler: the idlest group leaves the serving Service, waits a poll for the
/// endpoints to drop it, and is deleted once idle; one group at a time, highest first on ties.
#[tokio::test]
async fn scaling_down_drains_and_deletes_the_highest_idle_groups_one_at_a_time() {
    let fake = FakeApiServer::default();
    fake.insert(&DeepSeekDeployment::test().with_replicas(3));
    let reader = Arc::new(ScriptedReader::default());
    let ctx = Arc::new(
        Arc::try_unwrap(fake.context())
            .ok()
            .unwrap()
            .with_reader(reader.clone()),
    );
    let t0 = Timestamp::from_second(1_900_000_000).unwrap();
    let at = |s: i64| t0 + jiff::SignedDuration::from_secs(s);
    ctx.set_clock(Some(at(0)));
    converge(&fake, &ctx, "tiny").await;
    assert!(
        fake.deployment("tiny")
            .status
            .unwrap()
            .autoscaling
            .is_none(),
        "no autoscaling block without a drain"
    );
    *reader.0.lock().unwrap() = (0..3).map(|g| (g, reading(0.1, 0.0, 0.0))).collect();
    fake.insert(&fake.deployment("tiny").edited(|s| s.replicas = 1));

    let deleted = |before| -> Vec<String> {
        fake.writes_since(before)
            .into_iter()
            .filter(|c| c.method == Method::DELETE && c.path.contains("statefulsets"))
            .map(|c| c.path.rsplit('/').next().unwrap().to_string())
            .collect()
    };
    // Group 2 leaves the Service first and is kept for one poll.
    ctx.set_clock(Some(at(10)));
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(deleted(before).is_empty());
    let leader: Pod = fake.get("tiny-g2-0").unwrap();
    assert_eq!(
        leader.metadata.labels.unwrap()[render::SERVING_LABEL],
        "false"
    );
    let st = fake.deployment("tiny").status.unwrap();
    assert_eq!(st.desired_replicas, 1);
    assert_eq!(st.groups[2].state, GroupState::Draining);
    assert_eq!(
        st.autoscaling.and_then(|a| a.draining).map(|d| d.index),
        Some(2)
    );
    assert_eq!(
        cond(&fake.deployment("tiny"), CONDITION_PROGRESSING).0,
        "True"
    );

    // Still idle: deleted; then group 1 goes the same way.
    ctx.set_clock(Some(at(25)));
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(deleted(before), ["tiny-g2"]);
    ctx.set_clock(Some(at(40)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    ctx.set_clock(Some(at(55)));
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(deleted(before), ["tiny-g1"]);
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0"]);
    assert_eq!(fake.names::<Service>(), ["tiny", "tiny-g0"]);
    assert_eq!(fake.names::<PodDisruptionBudget>(), ["tiny-g0"]);

    converge(&fake, &ctx, "tiny").await;
    let st = fake.deployment("tiny").status.unwrap();
    assert_eq!((st.replicas, st.ready_replicas), (1, 1));
    assert!(
        st.autoscaling.is_none(),
        "the drain block goes with the drain"
    );
    assert_eq!(fake.names::<Pod>(), ["tiny-g0-0", "tiny-g0-1"]);
}

/// Without readable engine metrics a group that must go is not cut off mid-request: it leaves
/// the Service and is deleted when the drain timeout passes.
#[tokio::test]
async fn an_outside_scale_in_without_engine_metrics_waits_for_the_drain_timeout() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    let t0 = Timestamp::from_second(1_900_000_000).unwrap();
    let at = |s: i64| t0 + jiff::SignedDuration::from_secs(s);
    ctx.set_clock(Some(at(0)));
    converge(&fake, &ctx, "tiny").await;
    fake.insert(&fake.deployment("tiny").edited(|s| {
        s.replicas = 1;
        s.autoscaling.drain_timeout_seconds = 120;
    }));
    ctx.set_clock(Some(at(10)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    ctx.set_clock(Some(at(100)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0", "tiny-g1"]);
    ctx.set_clock(Some(at(131)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0"]);
}

#[tokio::test]
async fn a_restarted_pod_gets_its_whole_group_recreated() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    converge(&fake, &ctx, "tiny").await;
    fake.edit_pod("tiny-g1-1", |p| {
        p.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .restart_count = 1;
    });
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();

    let pod_deletes: Vec<String> = fake
        .writes_since(before)
        .into_iter()
        .filter(|c| c.method == Method::DELETE && c.path.ends_with("/pods"))
        .map(|c| percent(&c.query))
        .collect();
    assert_eq!(pod_deletes.len(), 1);
    assert!(
        pod_deletes[0].contains("serving.deepseek.dev/group=1"),
        "{}",
        pod_deletes[0]
    );
    assert_eq!(
        fake.names::<Pod>(),
        ["tiny-g0-0", "tiny-g0-1"],
        "group 0 untouched, group 1 gone"
    );
    let dsd = fake.deployment("tiny");
    assert_eq!(
        cond(&dsd, CONDITION_DEGRADED),
        ("True".into(), "GroupRecreated".into())
    );
    assert_eq!(
        dsd.status.as_ref().unwrap().groups[1].state,
        GroupState::Recreating
    );
    assert_eq!(events(&fake, before).len(), 1);

    converge(&fake, &ctx, "tiny").await;
    let dsd = fake.deployment("tiny");
    assert_eq!(
        cond(&dsd, CONDITION_DEGRADED),
        ("False".into(), "AsExpected".into())
    );
    assert_eq!(dsd.status.unwrap().ready_replicas, 2);
}

fn percent(q: &str) -> String {
    q.replace("%2F", "/")
        .replace("%3D", "=")
        .replace("%2C", ",")
}

#[tokio::test]
async fn with_failure_policy_none_a_failed_group_is_reported_but_left_alone() {
    let mut dsd = DeepSeekDeployment::test();
    dsd.spec.group_failure_policy = GroupFailurePolicy::None;
    let (fake, ctx) = setup(dsd);
    converge(&fake, &ctx, "tiny").await;
    fake.edit_pod("tiny-g0-0", |p| {
        p.status.as_mut().unwrap().phase = Some("Failed".into())
    });
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(
        fake.writes_since(before)
            .iter()
            .all(|c| c.method != Method::DELETE)
    );
    let dsd = fake.deployment("tiny");
    assert_eq!(
        cond(&dsd, CONDITION_DEGRADED),
        ("True".into(), "GroupFailed".into())
    );
    assert_eq!(dsd.status.unwrap().groups[0].state, GroupState::Failed);
}

#[tokio::test]
async fn a_template_change_rolls_one_group_at_a_time() {
    let (fake, ctx) = setup(DeepSeekDeployment::test().with_replicas(2));
    converge(&fake, &ctx, "tiny").await;
    let old_rev = fake
        .deployment("tiny")
        .status
        .unwrap()
        .update_revision
        .unwrap();
    fake.insert(
        &fake
            .deployment("tiny")
            .edited(|s| s.engine.max_num_seqs = 64),
    );

    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    let st = fake.deployment("tiny").status.unwrap();
    assert_ne!(st.update_revision.as_deref(), Some(old_rev.as_str()));
    assert_eq!(
        fake.names::<Pod>(),
        ["tiny-g1-0", "tiny-g1-1"],
        "only group 0 restarts first"
    );
    assert_eq!(st.groups[0].state, GroupState::Updating);
    assert_eq!(st.groups[1].state, GroupState::Ready);
    assert_eq!(
        cond(&fake.deployment("tiny"), CONDITION_PROGRESSING).1,
        "RollingUpdate"
    );

    // Group 0 comes back on the new template; only then is group 1 restarted.
    fake.run_statefulsets();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(fake.names::<Pod>(), ["tiny-g0-0", "tiny-g0-1"]);

    converge(&fake, &ctx, "tiny").await;
    let dsd = fake.deployment("tiny");
    let st = dsd.status.as_ref().unwrap();
    assert_eq!((st.ready_replicas, st.updated_replicas), (2, 2));
    assert_eq!(st.observed_generation, Some(2));
    assert_eq!(
        cond(&dsd, CONDITION_PROGRESSING),
        ("False".into(), "Converged".into())
    );
    let pod: Pod = fake.get("tiny-g1-0").unwrap();
    assert_eq!(
        pod.metadata.labels.unwrap()[render::REVISION_LABEL],
        *st.update_revision.as_ref().unwrap()
    );
}

#[tokio::test]
async fn an_invalid_spec_becomes_a_degraded_condition_and_one_event() {
    let mut dsd = DeepSeekDeployment::test();
    dsd.spec.engine.extra_args = vec!["--port=9000".into()];
    let (fake, ctx) = setup(dsd);
    let action = reconcile_once(&fake, &ctx, "tiny")
        .await
        .expect("a bad spec is not an error");
    assert_eq!(action, Action::requeue(RESYNC));
    assert!(fake.names::<StatefulSet>().is_empty());
    let dsd = fake.deployment("tiny");
    let c = status::find(dsd.status.as_ref(), CONDITION_DEGRADED).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "InvalidSpec")
    );
    assert!(
        c.message
            .contains("spec.engine.extraArgs[0]: --port is set by the operator"),
        "{}",
        c.message
    );
    assert_eq!(events(&fake, 0).len(), 1);

    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(
        fake.writes_since(before).is_empty(),
        "no second Event or status write"
    );
}

#[tokio::test]
async fn an_api_failure_is_shown_in_status_counted_and_retried_with_backoff() {
    let (fake, ctx) = setup(DeepSeekDeployment::test());
    fake.fail_writes_to(Some("/statefulsets/"));
    let dsd = Arc::new(fake.deployment("tiny"));
    let err = reconcile(dsd.clone(), ctx.clone()).await.unwrap_err();
    assert_eq!(err.metric_label(), "kube_api");
    let c = status::find(fake.deployment("tiny").status.as_ref(), CONDITION_DEGRADED)
        .cloned()
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "ReconcileError")
    );

    assert_eq!(
        error_policy(dsd.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(dsd.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(10))
    );
    assert!(
        ctx.metrics
            .encode()
            .contains("deepseek_operator_reconcile_errors_total{error=\"kube_api\"} 2")
    );

    fake.fail_writes_to(None);
    converge(&fake, &ctx, "tiny").await;
    assert_eq!(
        cond(&fake.deployment("tiny"), CONDITION_DEGRADED).1,
        "AsExpected"
    );
    assert_eq!(
        error_policy(dsd, &err, ctx.clone()),
        Action::requeue(Duration::from_secs(5)),
        "success resets the backoff"
    );
}

#[test]
fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
    let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
}

#[test]
fn subset_comparison_ignores_fields_the_server_added() {
    use serde_json::json;
    let want = json!({"a": 1, "l": [{"x": 1}]});
    assert!(is_subset(
        &want,
        &json!({"a": 1, "b": 2, "l": [{"x": 1, "y": 2}]})
    ));
    assert!(!is_subset(&want, &json!({"a": 2, "l": [{"x": 1}]})));
    assert!(!is_subset(
        &want,
        &json!({"a": 1, "l": [{"x": 1}, {"x": 2}]})
    ));
    assert!(!is_subset(&want, &json!({"l": [{"x": 1}]})));
}

#[tokio::test]
async fn only_one_of_two_operator_replicas_holds_the_lease() {
    let fake = FakeApiServer::default();
    let api: Api<Lease> = Api::namespaced(fake.client(), NS);
    let cfg = |id: &str| leader::LeaseConfig {
        name: "deepseek-operator-leader".into(),
        namespace: NS.into(),
        identity: id.into(),
        lease_duration: Duration::from_secs(15),
        renew_every: Duration::from_secs(5),
    };
    let t0 = Timestamp::from_second(1_900_000_000).unwrap();
    let at = |s: i64| t0 + jiff::SignedDuration::from_secs(s);
    assert!(
        leader::try_acquire_or_renew(&api, &cfg("a"), at(0))
            .await
            .unwrap()
    );
    assert!(
        !leader::try_acquire_or_renew(&api, &cfg("b"), at(1))
            .await
            .unwrap()
    );
    assert!(
        leader::try_acquire_or_renew(&api, &cfg("a"), at(5))
            .await
            .unwrap()
    );
    assert!(
        !leader::try_acquire_or_renew(&api, &cfg("b"), at(19))
            .await
            .unwrap()
    );
    // a stops renewing; after the lease duration b takes over and a is refused.
    assert!(
        leader::try_acquire_or_renew(&api, &cfg("b"), at(21))
            .await
            .unwrap()
    );
    assert!(
        !leader::try_acquire_or_renew(&api, &cfg("a"), at(22))
            .await
            .unwrap()
    );
    let lease: Lease = fake.get("deepseek-operator-leader").unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));

    leader::release(&api, &cfg("b")).await.unwrap();
    assert!(
        leader::try_acquire_or_renew(&api, &cfg("a"), at(23))
            .await
            .unwrap(),
        "a released lease is free at once"
    );
}

/// Leaders' signals set by the test, by group index.
#[derive(Default)]
struct ScriptedReader(std::sync::Mutex<std::collections::BTreeMap<i32, Reading>>);

impl MetricsReader for ScriptedReader {
    fn read<'a>(
        &'a self,
        req: &'a crate::autoscale::scrape::Request,
    ) -> futures::future::BoxFuture<'a, std::collections::BTreeMap<i32, Reading>> {
        let m = self.0.lock().unwrap().clone();
        let wanted: Vec<i32> = req.targets.iter().map(|t| t.group).collect();
        Box::pin(async move { m.into_iter().filter(|(g, _)| wanted.contains(g)).collect() })
    }
}

fn reading(kv: f64, waiting: f64, running: f64) -> Reading {
    Reading {
        kv_cache_usage: Some(kv),
        requests_waiting: Some(waiting),
        requests_running: Some(running),
        ..Reading::default()
    }
}

#[tokio::test]
async fn the_autoscaler_scales_groups_up_and_drains_the_idlest_one_before_deleting_it() {
    let mut dsd = DeepSeekDeployment::test();
    dsd.spec.autoscaling.enabled = true;
    dsd.spec.autoscaling.max_replicas = 3;
    dsd.spec.autoscaling.scale_down_stabilization_seconds = 0;
    let fake = FakeApiServer::default();
    fake.insert(&dsd);
    let reader = Arc::new(ScriptedReader::default());
    let ctx = Arc::new(
        Arc::try_unwrap(fake.context())
            .ok()
            .unwrap()
            .with_reader(reader.clone()),
    );
    let t0 = Timestamp::from_second(1_900_000_000).unwrap();
    let at = |s: i64| t0 + jiff::SignedDuration::from_secs(s);

    // One ready group under a long queue: the autoscaler asks for two.
    ctx.set_clock(Some(at(0)));
    converge(&fake, &ctx, "tiny").await;
    reader
        .0
        .lock()
        .unwrap()
        .insert(0, reading(0.95, 20.0, 30.0));
    ctx.set_clock(Some(at(15)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    let d = fake.deployment("tiny");
    let st = d.status.clone().unwrap();
    assert_eq!(d.spec.replicas, 1, "the spec stays as written");
    assert_eq!(st.desired_replicas, 2);
    let a = st.autoscaling.clone().unwrap();
    assert_eq!(a.last_scale.as_ref().map(|s| (s.from, s.to)), Some((1, 2)));
    assert!(a.reason.unwrap().contains("queue depth 20.00"));
    assert_eq!(a.kv_cache_usage, Some(0.95));
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0", "tiny-g1"]);
    fake.run_statefulsets();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(
        fake.deployment("tiny").status.unwrap().desired_replicas,
        2,
        "no new decision before the poll interval"
    );

    // Both idle; group 0 still finishes requests, group 1 has none: group 1 drains.
    *reader.0.lock().unwrap() = [(0, reading(0.05, 0.0, 3.0)), (1, reading(0.05, 0.0, 1.0))].into();
    ctx.set_clock(Some(at(30)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    let st = fake.deployment("tiny").status.unwrap();
    assert_eq!(st.desired_replicas, 1);
    assert_eq!(
        st.autoscaling
            .as_ref()
            .unwrap()
            .draining
            .as_ref()
            .map(|d| d.index),
        Some(1)
    );
    assert_eq!(st.groups[1].state, GroupState::Draining);
    let leader: Pod = fake.get("tiny-g1-0").unwrap();
    assert_eq!(
        leader.metadata.labels.unwrap()[render::SERVING_LABEL],
        "false"
    );
    let other: Pod = fake.get("tiny-g0-0").unwrap();
    assert_eq!(
        other.metadata.labels.unwrap()[render::SERVING_LABEL],
        "true"
    );
    assert_eq!(
        fake.names::<StatefulSet>(),
        ["tiny-g0", "tiny-g1"],
        "kept while draining"
    );
    let svc: Service = fake.get("tiny").unwrap();
    assert_eq!(
        svc.spec.unwrap().selector.unwrap()[render::SERVING_LABEL],
        "true"
    );

    // Still one request in flight: the group stays.
    ctx.set_clock(Some(at(45)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0", "tiny-g1"]);

    // Drained: deleted.
    reader.0.lock().unwrap().insert(1, reading(0.0, 0.0, 0.0));
    ctx.set_clock(Some(at(60)));
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert_eq!(fake.names::<StatefulSet>(), ["tiny-g0"]);
    assert!(
        events(&fake, before).len() >= 2,
        "GroupDrained and GroupsDeleted Events"
    );
    fake.run_statefulsets();
    ctx.set_clock(Some(at(75)));
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    let st = fake.deployment("tiny").status.unwrap();
    assert_eq!(
        (st.desired_replicas, st.replicas, st.ready_replicas),
        (1, 1, 1)
    );
    assert!(st.autoscaling.unwrap().draining.is_none());
    assert_eq!(fake.names::<Pod>(), ["tiny-g0-0", "tiny-g0-1"]);

    // The operator's own metrics tell the same story: one scale-up, one scale-down, one group
    // ready of one desired; and they go when the deployment does.
    let text = ctx.metrics.encode();
    for line in [
        r#"deepseek_operator_scale_events_total{deployment="tiny",direction="up",namespace="ns"} 1"#,
        r#"deepseek_operator_scale_events_total{deployment="tiny",direction="down",namespace="ns"} 1"#,
        r#"deepseek_operator_groups{deployment="tiny",kind="desired",namespace="ns"} 1"#,
        r#"deepseek_operator_groups{deployment="tiny",kind="ready",namespace="ns"} 1"#,
        r#"deepseek_operator_condition{deployment="tiny",namespace="ns",type="Available"} 1"#,
    ] {
        let line = line.replace("\"ns\"", &format!("{NS:?}"));
        assert!(text.contains(&line), "missing {line} in\n{text}");
    }
    ctx.forget_deleted(&Default::default());
    assert!(!ctx.metrics.encode().contains(r#"deployment="tiny""#));
}

const POOLS: &str = "/apis/inference.networking.k8s.io/v1/namespaces/serving/inferencepools";

fn pool_condition(fake: &FakeApiServer) -> Option<(String, String)> {
    let dsd = fake.deployment("tiny");
    status::find(
        dsd.status.as_ref(),
        crate::api::CONDITION_INFERENCE_POOL_READY,
    )
    .map(|c| (c.status.clone(), c.reason.clone()))
}

fn with_pool() -> DeepSeekDeployment {
    DeepSeekDeployment::test().edited(|s| {
        s.inference_pool = Some(
            serde_json::from_value(serde_json::json!({"endpointPicker": {"name": "tiny-epp"}}))
                .unwrap(),
        )
    })
}

fn pools(fake: &FakeApiServer) -> Vec<String> {
    fake.calls()
        .iter()
        .filter(|c| c.path.starts_with(POOLS) && c.method == Method::PATCH)
        .map(|c| c.path.clone())
        .collect()
}

#[tokio::test]
async fn without_the_inference_pool_crd_the_condition_says_so_once_and_the_groups_still_converge() {
    let (fake, ctx) = setup(with_pool());
    fake.not_serving(Some("/apis/inference.networking.k8s.io/"));
    converge(&fake, &ctx, "tiny").await;
    assert_eq!(
        pool_condition(&fake),
        Some(("False".into(), "InferencePoolCRDMissing".into()))
    );
    assert_eq!(
        cond(&fake.deployment("tiny"), CONDITION_AVAILABLE),
        ("True".into(), "MinimumGroupsAvailable".into())
    );
    let warned = fake
        .calls()
        .iter()
        .filter(|c| c.method == Method::POST && c.path.ends_with("/events"))
        .count();
    // GroupsCreated and one InferencePoolCRDMissing; reconciling again adds nothing.
    let before = fake.calls().len();
    let action = reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(events(&fake, before).is_empty());
    assert!(warned >= 2);
    assert!(fake.writes_since(before).is_empty());
    assert_eq!(
        action,
        Action::requeue(PROGRESS_RECHECK),
        "looks again soon"
    );
}

#[tokio::test]
async fn once_the_crd_is_served_the_pool_is_applied_then_left_alone_and_deleted_with_the_field() {
    let (fake, ctx) = setup(with_pool());
    fake.not_serving(Some("/apis/inference.networking.k8s.io/"));
    converge(&fake, &ctx, "tiny").await;
    fake.not_serving(None);
    converge(&fake, &ctx, "tiny").await;
    assert_eq!(
        pool_condition(&fake),
        Some(("True".into(), "InferencePoolApplied".into()))
    );
    assert_eq!(pools(&fake), [format!("{POOLS}/tiny")], "applied once");
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(fake.writes_since(before).is_empty(), "converged: no write");

    // The field removed: the pool is deleted and the condition goes.
    let edited = fake.deployment("tiny").edited(|s| s.inference_pool = None);
    fake.insert(&edited);
    converge(&fake, &ctx, "tiny").await;
    assert_eq!(pool_condition(&fake), None);
    let deletes: Vec<String> = fake
        .calls()
        .iter()
        .filter(|c| c.method == Method::DELETE && c.path.starts_with(POOLS))
        .map(|c| c.path.clone())
        .collect();
    assert_eq!(deletes, [format!("{POOLS}/tiny")]);
    // Without the field and the condition, the pool API is not even asked.
    let before = fake.calls().len();
    reconcile_once(&fake, &ctx, "tiny").await.unwrap();
    assert!(
        fake.calls()[before..]
            .iter()
            .all(|c| !c.path.starts_with(POOLS))
    );
}

#[tokio::test]
async fn a_pool_of_that_name_owned_by_someone_else_is_left_alone() {
    let (fake, ctx) = setup(with_pool());
    {
        let client = fake.client();
        let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
            client,
            NS,
            &render::inference_pool::inference_pool_resource(),
        );
        let mut other = kube::api::DynamicObject::new(
            "tiny",
            &render::inference_pool::inference_pool_resource(),
        );
        other.data = serde_json::json!({"spec": {"selector": {"matchLabels": {"app": "x"}}}});
        api.create(&kube::api::PostParams::default(), &other)
            .await
            .unwrap();
    }
    converge(&fake, &ctx, "tiny").await;
    assert_eq!(
        pool_condition(&fake),
        Some(("False".into(), "InferencePoolConflict".into()))
    );
    assert!(pools(&fake).is_empty(), "never applied over it");
}
