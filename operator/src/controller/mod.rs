//! The controller: watches `DeepSeekDeployment`s and what they own, and reconciles them. All of
//! the operator's I/O with the API server happens here.
//!
//! One reconcile: validate the spec (a refusal becomes a `Degraded` condition and a Warning
//! Event); render the desired objects; list what exists; [`plan::plan`] the group actions;
//! server-side apply what differs (under [`FIELD_MANAGER`]); delete surplus groups, highest
//! index first; delete the pods of failed or outdated groups so their StatefulSets bring them
//! back whole; sync the InferencePool when one is asked for (its failures only reach its
//! condition); write the status only if it changed. Reconciling a converged deployment again
//! writes nothing. Structure after kube-rs's controller-rs sample: `Context`, `reconcile`,
//! `error_policy`, errors counted by [`Error::metric_label`].

pub mod autoscaling;
pub mod inference_pool;
pub mod leader;
pub mod observed;
pub mod plan;
pub mod status;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{Instrument, field, info, info_span, warn};

use crate::api::validate::{self, Violation};
use crate::api::{
    CONDITION_DEGRADED, CONDITION_INFERENCE_POOL_READY, DeepSeekDeployment,
    DeepSeekDeploymentStatus,
};
use crate::autoscale::scrape::{HttpReader, MetricsReader};
use crate::metrics::Metrics;
use crate::render::{self, Desired, hash};
use crate::{Error, Result};
use observed::Observed;
use plan::Plan;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "deepseek-operator";

/// How long a converged deployment waits before it is checked again without any watch event.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a deployment that is still moving is checked again without any watch event.
const PROGRESS_RECHECK: Duration = Duration::from_secs(30);

/// What `reconcile` and `error_policy` need from outside.
pub struct Context {
    /// Client for the API server; the operator's only route to it.
    pub client: Client,
    /// Publishes Kubernetes Events about `DeepSeekDeployment`s.
    pub recorder: Recorder,
    /// Reconcile counters and timings.
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per object, for exponential requeue backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// Reads the group leaders' signals for the autoscaler.
    pub reader: Arc<dyn MetricsReader>,
    /// The autoscaler's memory per deployment (`namespace/name`).
    autoscalers: Mutex<HashMap<String, autoscaling::AutoscalerState>>,
    /// A fixed clock for tests; `None` reads the system clock.
    clock: Mutex<Option<Timestamp>>,
}

impl Context {
    /// Drops the metric series, autoscaler memory and failure counts of deployments that are
    /// not in `live` (namespace, name): they were deleted.
    pub fn forget_deleted(&self, live: &BTreeSet<(String, String)>) {
        self.metrics.retain_deployments(live);
        let keep = |k: &String| {
            k.split_once('/')
                .is_some_and(|(ns, n)| live.contains(&(ns.to_string(), n.to_string())))
        };
        if let Ok(mut m) = self.autoscalers.lock() {
            m.retain(|k, _| keep(k));
        }
        if let Ok(mut m) = self.failures.lock() {
            m.retain(|k, _| keep(k));
        }
    }

    /// A context whose Events are reported as `deepseek-operator` from `instance`.
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: render::MANAGED_BY.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            failures: Mutex::new(HashMap::new()),
            reader: Arc::new(HttpReader),
            autoscalers: Mutex::new(HashMap::new()),
            clock: Mutex::new(None),
        }
    }

    /// With another metrics reader (tests script the leaders' signals with it).
    pub fn with_reader(mut self, reader: Arc<dyn MetricsReader>) -> Self {
        self.reader = reader;
        self
    }

    /// Fixes the clock (`None`: the system clock again).
    pub fn set_clock(&self, now: Option<Timestamp>) {
        *self.clock.lock().expect("clock lock") = now;
    }

    /// The current time.
    pub fn now(&self) -> Timestamp {
        self.clock
            .lock()
            .expect("clock lock")
            .unwrap_or_else(Timestamp::now)
    }

    fn failure_count(&self, key: &str, failed: bool) -> u32 {
        let mut map = self.failures.lock().expect("failure map lock");
        if failed {
            let n = map.entry(key.to_string()).or_insert(0);
            *n += 1;
            *n
        } else {
            map.remove(key);
            0
        }
    }

    async fn publish(
        &self,
        dsd: &DeepSeekDeployment,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &dsd.object_ref(&())).await {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }
}

/// Requeue delay after the `n`th consecutive failure: 5 s doubling up to 5 minutes.
pub fn backoff(n: u32) -> Duration {
    let secs = 5u64.saturating_mul(1u64 << n.saturating_sub(1).min(6));
    Duration::from_secs(secs.min(300))
}

fn key(dsd: &DeepSeekDeployment) -> String {
    format!("{}/{}", dsd.namespace().unwrap_or_default(), dsd.name_any())
}

/// Reconciles one `DeepSeekDeployment`. On failure the error is recorded in the status
/// (`Degraded`, reason `ReconcileError`) before it is returned to the controller.
pub async fn reconcile(dsd: Arc<DeepSeekDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let span = info_span!(
        "reconcile",
        namespace = %dsd.namespace().unwrap_or_default(),
        name = %dsd.name_any(),
        generation = dsd.metadata.generation.unwrap_or_default(),
        groups = field::Empty,
    );
    async move {
        let _timer = ctx.metrics.reconcile_started();
        match apply(&dsd, &ctx, ctx.now()).await {
            Ok(action) => {
                ctx.failure_count(&key(&dsd), false);
                Ok(action)
            }
            Err(e) => {
                warn!(error = %e, "reconcile failed");
                if let Err(write) = record_error(&dsd, &ctx, &e).await {
                    warn!(error = %write, "could not record the error in the status");
                }
                Err(e)
            }
        }
    }
    .instrument(span)
    .await
}

/// Counts the failure and requeues with exponential backoff.
pub fn error_policy(dsd: Arc<DeepSeekDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error);
    let n = ctx.failure_count(&key(&dsd), true);
    let delay = backoff(n);
    warn!(name = %dsd.name_any(), error = %error, attempt = n, delay_s = delay.as_secs(), "requeueing after error");
    Action::requeue(delay)
}

async fn record_error(dsd: &DeepSeekDeployment, ctx: &Context, e: &Error) -> Result<()> {
    let previous = dsd.status.as_ref();
    let message = e.to_string();
    let already = status::find(previous, CONDITION_DEGRADED)
        .is_some_and(|c| c.reason == "ReconcileError" && c.message == message);
    if already {
        return Ok(());
    }
    let st = status::with_error(previous, &message, dsd.metadata.generation, ctx.now());
    write_status(dsd, ctx, &st).await?;
    ctx.publish(dsd, EventType::Warning, "ReconcileError", message)
        .await;
    Ok(())
}

async fn write_status(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    st: &DeepSeekDeploymentStatus,
) -> Result<()> {
    let ns = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<DeepSeekDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({
        "apiVersion": DeepSeekDeployment::api_version(&()),
        "kind": DeepSeekDeployment::kind(&()),
        "status": st,
    });
    api.patch_status(
        &dsd.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

/// Everything the operator made for one deployment, as listed from the API server.
struct Existing {
    statefulsets: Vec<StatefulSet>,
    services: Vec<Service>,
    pdbs: Vec<PodDisruptionBudget>,
    config_maps: Vec<ConfigMap>,
    pods: Vec<Pod>,
}

async fn list_existing(client: &Client, ns: &str, name: &str) -> Result<Existing> {
    let owned = ListParams::default().labels(&render::owned_selector(name));
    let pods = ListParams::default().labels(&render::engine_pods_selector(name));
    Ok(Existing {
        statefulsets: Api::namespaced(client.clone(), ns)
            .list(&owned)
            .await?
            .items,
        services: Api::namespaced(client.clone(), ns)
            .list(&owned)
            .await?
            .items,
        pdbs: Api::namespaced(client.clone(), ns)
            .list(&owned)
            .await?
            .items,
        config_maps: Api::namespaced(client.clone(), ns)
            .list(&owned)
            .await?
            .items,
        pods: Api::namespaced(client.clone(), ns).list(&pods).await?.items,
    })
}

async fn apply(dsd: &DeepSeekDeployment, ctx: &Context, now: Timestamp) -> Result<Action> {
    let ns = dsd
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = dsd.name_any();
    let client = &ctx.client;

    // 1. The spec: a refusal is reported, not retried.
    if let Err(violations) = validate::validate(&name, &dsd.spec) {
        let existing = list_existing(client, &ns, &name).await?;
        let observed = Observed::from_objects(&existing.statefulsets, &existing.pods);
        return refuse(dsd, ctx, &violations, &observed, now).await;
    }

    // 2. Observed state; with autoscaling, the autoscaler chooses the groups.
    let existing = list_existing(client, &ns, &name).await?;
    let observed = Observed::from_objects(&existing.statefulsets, &existing.pods);
    let pods_per_group = dsd.spec.parallelism.pods_per_group();
    let auto = if dsd.spec.autoscaling.enabled {
        Some(autoscaling::step(dsd, ctx, &ns, &name, &observed, pods_per_group, now).await)
    } else {
        autoscaling::external_scale(dsd, ctx, &ns, &name, &observed, pods_per_group, now).await
    };
    let indices: BTreeSet<i32> = match &auto {
        Some(o) => o.indices.clone(),
        None => (0..dsd.spec.replicas.max(0)).collect(),
    };
    let draining = auto.as_ref().and_then(|o| o.draining);
    let index_list: Vec<i32> = indices.iter().copied().collect();
    let desired = render::desired_groups(dsd, &index_list)?;
    let plan = plan::plan_groups(
        &dsd.spec,
        &indices,
        draining,
        &desired.revision,
        desired.pods_per_group,
        &observed,
    );
    tracing::Span::current().record("groups", indices.len());

    // 3. Leader pods in or out of the serving Service, before the Service selects on it.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for (pod, value) in autoscaling::serving_label_changes(&observed, draining) {
        let patch = serde_json::json!({"metadata": {"labels": {autoscaling::LABEL: value}}});
        ignore_not_found(
            pods.patch(&pod, &PatchParams::default(), &Patch::Merge(&patch))
                .await,
        )?;
    }

    // 4. Apply what differs.
    apply_all(client, &ns, &desired, &existing).await?;

    // 5. Group actions.
    execute(dsd, ctx, &ns, &plan, &existing).await?;
    if let Some(o) = &auto {
        for (reason, note) in &o.events {
            ctx.publish(dsd, EventType::Normal, reason, note.clone())
                .await;
        }
    }

    // 6. The InferencePool: its outcome goes into its condition, never into the result.
    let had_pool = status::find(dsd.status.as_ref(), CONDITION_INFERENCE_POOL_READY).is_some();
    let pool = inference_pool::sync(
        client,
        &ns,
        &name,
        dsd.metadata.uid.as_deref(),
        desired.inference_pool.as_ref(),
        had_pool,
    )
    .await;
    publish_pool_events(dsd, ctx, &pool).await;

    // 7. Status.
    let inputs = status::Inputs {
        name: &name,
        generation: dsd.metadata.generation,
        revision: Some(&desired.revision),
        pods_per_group: desired.pods_per_group,
        invalid_spec: None,
        error: None,
        groups: Some(&indices),
        desired: auto.as_ref().map(|o| o.desired),
        autoscaling: auto.as_ref().map(|o| &o.status),
        draining,
        load_progress: auto.as_ref().map(|o| &o.load),
        limited: auto.as_ref().and_then(|o| o.limited.as_deref()),
        inference_pool: pool.report.clone(),
    };
    let st = status::compute(
        &dsd.spec,
        &inputs,
        &observed,
        &plan,
        dsd.status.as_ref(),
        now,
    );
    if dsd.status.as_ref() != Some(&st) {
        write_status(dsd, ctx, &st).await?;
    }
    ctx.metrics.observe_status(&ns, &name, &st);
    if let Some(ev) = auto.as_ref().and_then(|o| o.scaled.as_ref()) {
        ctx.metrics.scaled(&ns, &name, ev.from, ev.to);
    }
    let n = indices.len() as i32;
    let converged = plan.is_empty() && st.ready_replicas == n && st.updated_replicas == n;
    let pool_pending = matches!(&pool.report, status::PoolReport::Synced(p) if !p.is_ready());
    let wait = if converged && !pool_pending {
        RESYNC
    } else {
        PROGRESS_RECHECK
    };
    Ok(Action::requeue(match &auto {
        Some(o) => wait.min(o.requeue),
        None => wait,
    }))
}

/// One Event per change of the pool: created, deleted, or a new reason it is not ready (so a
/// missing CRD is announced once, not at every reconcile).
async fn publish_pool_events(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    pool: &inference_pool::Synced,
) {
    if let Some(name) = &pool.created {
        let note = format!("created InferencePool {name} over the serving pods");
        ctx.publish(dsd, EventType::Normal, "InferencePoolCreated", note)
            .await;
    }
    if !pool.deleted.is_empty() {
        let note = format!("deleted InferencePool {}", pool.deleted.join(", "));
        ctx.publish(dsd, EventType::Normal, "InferencePoolDeleted", note)
            .await;
    }
    if let status::PoolReport::Synced(state) = &pool.report
        && !state.is_ready()
    {
        let previous = status::find(dsd.status.as_ref(), CONDITION_INFERENCE_POOL_READY);
        let message = state.message();
        if !previous.is_some_and(|c| c.reason == state.reason() && c.message == message) {
            warn!(reason = state.reason(), %message, "InferencePool not ready");
            ctx.publish(dsd, EventType::Warning, state.reason(), message)
                .await;
        }
    }
}

async fn refuse(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    violations: &[Violation],
    observed: &Observed,
    now: Timestamp,
) -> Result<Action> {
    let message = validate::summarize(violations);
    warn!(%message, "spec refused");
    let pods_per_group = dsd
        .status
        .as_ref()
        .map(|s| s.pods_per_group)
        .unwrap_or_default();
    let revision = dsd.status.as_ref().and_then(|s| s.update_revision.clone());
    let inputs = status::Inputs {
        name: &dsd.name_any(),
        generation: dsd.metadata.generation,
        revision: revision.as_deref(),
        pods_per_group,
        invalid_spec: Some(&message),
        error: None,
        ..status::Inputs::default()
    };
    let st = status::compute(
        &dsd.spec,
        &inputs,
        observed,
        &Plan::default(),
        dsd.status.as_ref(),
        now,
    );
    let already = status::find(dsd.status.as_ref(), CONDITION_DEGRADED)
        .is_some_and(|c| c.reason == "InvalidSpec" && c.message == message);
    if dsd.status.as_ref() != Some(&st) {
        write_status(dsd, ctx, &st).await?;
    }
    if let Some(ns) = dsd.namespace() {
        ctx.metrics.observe_status(&ns, &dsd.name_any(), &st);
    }
    if !already {
        ctx.publish(dsd, EventType::Warning, "InvalidSpec", message)
            .await;
    }
    // A fixed spec arrives as a watch event; no need to retry sooner.
    Ok(Action::requeue(RESYNC))
}

/// Applies `desired` unless `existing` already carries the same applied hash and every
/// field of `desired` (so a change made by someone else to a field we own is put back).
async fn apply_one<K>(api: &Api<K>, desired: &K, existing: &[K]) -> Result<bool>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = desired
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingField("metadata.name"))?;
    if let Some(current) = existing
        .iter()
        .find(|o| o.meta().name.as_deref() == Some(&name))
        && hash::applied_hash(current).is_some()
        && hash::applied_hash(current) == hash::applied_hash(desired)
        && is_subset(
            &serde_json::to_value(desired)?,
            &serde_json::to_value(current)?,
        )
    {
        return Ok(false);
    }
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await?;
    Ok(true)
}

/// True if every field of `want` is present with the same value in `have` (lists must have the
/// same length and match item by item).
pub fn is_subset(want: &serde_json::Value, have: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (want, have) {
        (Value::Object(w), Value::Object(h)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| is_subset(v, hv))),
        (Value::Array(w), Value::Array(h)) => {
            w.len() == h.len() && w.iter().zip(h).all(|(a, b)| is_subset(a, b))
        }
        (w, h) => w == h,
    }
}

async fn apply_all(
    client: &Client,
    ns: &str,
    desired: &Desired,
    existing: &Existing,
) -> Result<()> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    apply_one(&cms, &desired.config_map, &existing.config_maps).await?;
    for g in &desired.groups {
        apply_one(&svcs, &g.service, &existing.services).await?;
        apply_one(&stss, &g.statefulset, &existing.statefulsets).await?;
        apply_one(&pdbs, &g.pdb, &existing.pdbs).await?;
    }
    apply_one(&svcs, &desired.service, &existing.services).await?;
    Ok(())
}

fn ignore_not_found<T>(r: std::result::Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn execute(
    dsd: &DeepSeekDeployment,
    ctx: &Context,
    ns: &str,
    plan: &Plan,
    existing: &Existing,
) -> Result<()> {
    let client = &ctx.client;
    let name = dsd.name_any();
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let has = |names: Vec<Option<String>>, n: &str| names.iter().any(|x| x.as_deref() == Some(n));

    for &index in &plan.delete {
        let group = render::group_name(&name, index);
        info!(group = %group, "deleting group no longer asked for");
        ignore_not_found(stss.delete(&group, &DeleteParams::background()).await)?;
        if has(
            existing
                .services
                .iter()
                .map(|o| o.metadata.name.clone())
                .collect(),
            &group,
        ) {
            ignore_not_found(svcs.delete(&group, &DeleteParams::background()).await)?;
        }
        if has(
            existing
                .pdbs
                .iter()
                .map(|o| o.metadata.name.clone())
                .collect(),
            &group,
        ) {
            ignore_not_found(pdbs.delete(&group, &DeleteParams::background()).await)?;
        }
    }
    // One Event per kind of action: the recorder folds Events with the same reason into a series.
    if !plan.delete.is_empty() {
        let note = format!(
            "deleted groups {:?}: {}",
            plan.delete,
            if dsd.spec.autoscaling.enabled {
                "the autoscaler removed them".to_string()
            } else {
                format!("spec.replicas is {}", dsd.spec.replicas)
            }
        );
        ctx.publish(dsd, EventType::Normal, "GroupsDeleted", note)
            .await;
    }
    if !plan.create.is_empty() {
        let note = format!("created groups {:?}", plan.create);
        ctx.publish(dsd, EventType::Normal, "GroupsCreated", note)
            .await;
    }
    let delete_pods = |index: i32| {
        let selector = format!(
            "{},{}={index}",
            render::engine_pods_selector(&name),
            render::GROUP_LABEL
        );
        let pods = pods.clone();
        async move {
            pods.delete_collection(
                &DeleteParams::background(),
                &ListParams::default().labels(&selector),
            )
            .await
            .map(|_| ())
        }
    };
    for (index, reason) in &plan.recreate {
        warn!(group = index, %reason, "recreating group");
        delete_pods(*index).await?;
        ctx.publish(
            dsd,
            EventType::Warning,
            "GroupRecreated",
            format!("recreating group {index}: {reason}"),
        )
        .await;
    }
    for &index in &plan.roll {
        info!(
            group = index,
            "restarting group on the current pod template"
        );
        delete_pods(index).await?;
        ctx.publish(
            dsd,
            EventType::Normal,
            "GroupUpdating",
            format!("restarting group {index} on the current pod template"),
        )
        .await;
    }
    Ok(())
}

/// Fails with a hint when the CRD is not installed.
pub async fn check_crd(client: &Client) -> Result<(), String> {
    let api: Api<DeepSeekDeployment> = Api::all(client.clone());
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Err(
            "the DeepSeekDeployment CRD is not installed; install it with:\n  deepseek-operator crd | kubectl apply --server-side -f -\nor, from the repository, kubectl apply --server-side -f crds/".into(),
        ),
        Err(e) => Err(format!("cannot list DeepSeekDeployments: {e}")),
    }
}

/// Runs the controller until `shutdown` completes. `namespace` limits the watch to one
/// namespace.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let owned = watcher::Config::default().labels(&format!(
        "{}={}",
        render::MANAGED_BY_LABEL,
        render::MANAGED_BY
    ));
    let pods =
        watcher::Config::default().labels(&format!("{}={}", render::NAME_LABEL, render::APP_NAME));
    let controller = Controller::new(
        api::<DeepSeekDeployment>(&client, namespace),
        watcher::Config::default().any_semantic(),
    );
    // Per-deployment series of deleted deployments are dropped against the controller's cache.
    let store = controller.store();
    let pruned = ctx.clone();
    let pruner = tokio::spawn(async move {
        loop {
            tokio::time::sleep(METRICS_PRUNE_EVERY).await;
            let live: BTreeSet<(String, String)> = store
                .state()
                .iter()
                .filter_map(|d| Some((d.namespace()?, d.name_any())))
                .collect();
            pruned.forget_deleted(&live);
        }
    });
    controller
        .owns(api::<StatefulSet>(&client, namespace), owned.clone())
        .owns(api::<Service>(&client, namespace), owned.clone())
        .owns(
            api::<PodDisruptionBudget>(&client, namespace),
            owned.clone(),
        )
        .owns(api::<ConfigMap>(&client, namespace), owned)
        .watches(api::<Pod>(&client, namespace), pods, |pod: Pod| {
            let name = pod.labels().get(render::INSTANCE_LABEL)?.clone();
            let ns = pod.namespace()?;
            Some(ObjectRef::<DeepSeekDeployment>::new(&name).within(&ns))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => {
                    tracing::debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled")
                }
                Err(e) => tracing::debug!(error = %e, "reconcile loop error"),
            }
        })
        .await;
    pruner.abort();
}

/// How often per-deployment metric series and autoscaler memory are checked against the live
/// deployments.
const METRICS_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
