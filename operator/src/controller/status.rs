//! The status the operator writes: group states, counts and conditions. Pure; `now` is passed
//! in and only used for conditions whose status changes.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::observed::Observed;
use super::plan::Plan;
use crate::api::{
    AutoscalingStatus, CONDITION_AVAILABLE, CONDITION_DEGRADED, CONDITION_INFERENCE_POOL_READY,
    CONDITION_PROGRESSING, CONDITION_SCALING_LIMITED, DeepSeekDeploymentSpec,
    DeepSeekDeploymentStatus, GroupFailurePolicy, GroupState, GroupStatus,
};
use crate::render;

/// What the status describes beyond the spec and the observed groups.
#[derive(Clone, Debug, Default)]
pub struct Inputs<'a> {
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// Current pod-template revision; `None` when the spec could not be rendered.
    pub revision: Option<&'a str>,
    /// Pods per group.
    pub pods_per_group: i32,
    /// Why the spec is refused, if it is.
    pub invalid_spec: Option<&'a str>,
    /// The error of the last reconcile, if it failed.
    pub error: Option<&'a str>,
    /// Groups asked for, when not `0..spec.replicas` (autoscaling).
    pub groups: Option<&'a BTreeSet<i32>>,
    /// Group count asked for, when not `spec.replicas` (autoscaling).
    pub desired: Option<i32>,
    /// The autoscaler's part of the status, when it ran.
    pub autoscaling: Option<&'a AutoscalingStatus>,
    /// The group draining out of the serving Service.
    pub draining: Option<i32>,
    /// Leader model-load progress by group, 0..1.
    pub load_progress: Option<&'a BTreeMap<i32, f64>>,
    /// Why the autoscaler could not choose the count it wanted.
    pub limited: Option<&'a str>,
    /// What became of the InferencePool.
    pub inference_pool: PoolReport,
}

/// What the status says about the InferencePool of `spec.inferencePool`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PoolReport {
    /// Nothing was tried (the spec is refused): the previous condition stays as it is.
    #[default]
    Keep,
    /// No pool is asked for and none is left: no condition.
    Absent,
    /// The pool was synced; the condition says how it went.
    Synced(PoolState),
}

/// The outcome of syncing the InferencePool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolState {
    /// The pool `name` is applied and selects the serving pods.
    Ready {
        /// The pool's name.
        name: String,
    },
    /// The API server does not serve `inference.networking.k8s.io/v1` `inferencepools`.
    CrdMissing,
    /// A pool of that name exists and belongs to someone else; it is left alone.
    Conflict {
        /// The pool's name.
        name: String,
    },
    /// A call about the pool failed; it is tried again at the next reconcile.
    Failed {
        /// The error.
        message: String,
    },
}

impl PoolState {
    /// True when the condition is `True`.
    pub fn is_ready(&self) -> bool {
        matches!(self, PoolState::Ready { .. })
    }

    /// The condition's reason (also the reason of the Warning Event of a failure).
    pub fn reason(&self) -> &'static str {
        match self {
            PoolState::Ready { .. } => "InferencePoolApplied",
            PoolState::CrdMissing => "InferencePoolCRDMissing",
            PoolState::Conflict { .. } => "InferencePoolConflict",
            PoolState::Failed { .. } => "InferencePoolFailed",
        }
    }

    /// The condition's message.
    pub fn message(&self) -> String {
        match self {
            PoolState::Ready { name } => format!(
                "InferencePool {name} selects the serving (rank 0) pods on port {}",
                render::HTTP_PORT
            ),
            PoolState::CrdMissing => format!(
                "the API server does not serve {}/{} {}: install the Gateway API Inference Extension CRDs (config/crd/bases of sigs.k8s.io/gateway-api-inference-extension, v1.0 or newer); the operator looks again every {} s",
                render::inference_pool::INFERENCE_POOL_GROUP,
                render::inference_pool::INFERENCE_POOL_VERSION,
                render::inference_pool::INFERENCE_POOL_PLURAL,
                super::PROGRESS_RECHECK.as_secs()
            ),
            PoolState::Conflict { name } => format!(
                "InferencePool {name} exists and is not owned by this DeepSeekDeployment; left alone (set spec.inferencePool.name to another name)"
            ),
            PoolState::Failed { message } => message.clone(),
        }
    }
}

/// Computes the full status. Fields the autoscaler owns (`kvCacheUtilizationPercent`,
/// `queueDepth`, `autoscaling`) come from `inputs.autoscaling` when it ran, else are carried
/// over from `previous`.
pub fn compute(
    spec: &DeepSeekDeploymentSpec,
    inputs: &Inputs<'_>,
    observed: &Observed,
    plan: &Plan,
    previous: Option<&DeepSeekDeploymentStatus>,
    now: Timestamp,
) -> DeepSeekDeploymentStatus {
    let ppg = inputs.pods_per_group;
    let replicas = inputs.desired.unwrap_or(spec.replicas).max(0);
    let indices: BTreeSet<i32> = match inputs.groups {
        Some(g) => g.clone(),
        None => (0..replicas).collect(),
    };
    let mut groups = Vec::new();
    let (mut existing, mut ready, mut updated) = (0, 0, 0);
    let mut failed = Vec::new();
    for &index in &indices {
        let g = observed.group(index).cloned().unwrap_or_default();
        let recreate = plan.recreate.iter().find(|(i, _)| *i == index);
        let (state, message) = if inputs.draining == Some(index) {
            (
                GroupState::Draining,
                Some("out of the serving Service, finishing its requests".into()),
            )
        } else if let Some((_, reason)) = recreate {
            (GroupState::Recreating, Some(reason.clone()))
        } else if plan.roll.contains(&index) {
            (
                GroupState::Updating,
                Some("restarting on the current pod template".into()),
            )
        } else if g.terminating() {
            let rolling = inputs.revision.is_some_and(|r| {
                g.pods
                    .iter()
                    .any(|p| p.deleting && p.revision.as_deref() != Some(r))
            });
            if rolling {
                (
                    GroupState::Updating,
                    Some("old pods are terminating".into()),
                )
            } else {
                (
                    GroupState::Recreating,
                    Some("old pods are terminating".into()),
                )
            }
        } else if g.live_count() == 0 {
            (GroupState::Pending, None)
        } else if let Some(reason) = g.failure() {
            if spec.group_failure_policy == GroupFailurePolicy::None {
                failed.push(format!("group {index}: {reason}"));
                (GroupState::Failed, Some(reason))
            } else {
                (
                    GroupState::Starting,
                    Some(format!("{reason}; waiting for all pods to start")),
                )
            }
        } else if g.is_ready(ppg) {
            let msg = inputs.revision.filter(|r| g.is_outdated(r)).map(|_| {
                "serving an older pod template; waiting for its turn to update".to_string()
            });
            (GroupState::Ready, msg)
        } else {
            (GroupState::Starting, None)
        };
        if g.live_count() > 0 {
            existing += 1;
        }
        if state == GroupState::Ready {
            ready += 1;
        }
        if !plan.restarts(index) && inputs.revision.is_some_and(|r| g.is_updated(r, ppg)) {
            updated += 1;
        }
        groups.push(GroupStatus {
            index,
            state,
            ready_pods: if plan.restarts(index) {
                0
            } else {
                g.ready_count()
            },
            pods: if plan.restarts(index) {
                0
            } else {
                g.live_count()
            },
            revision: g.revision(),
            message,
            load_progress_percent: inputs
                .load_progress
                .and_then(|m| m.get(&index))
                .map(|p| (p.clamp(0.0, 1.0) * 100.0).round() as i32),
        });
    }

    let old = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    let gen_ = inputs.generation;
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(old, type_, ok, reason, message, gen_, now)
    };

    let need = (replicas - spec.rollout.max_unavailable).max(1);
    let available = if replicas == 0 {
        cond(
            CONDITION_AVAILABLE,
            false,
            "ScaledToZero",
            "spec.replicas is 0".into(),
        )
    } else if ready >= need {
        cond(
            CONDITION_AVAILABLE,
            true,
            "MinimumGroupsAvailable",
            format!("{ready} of {replicas} groups ready (at least {need} needed)"),
        )
    } else {
        cond(
            CONDITION_AVAILABLE,
            false,
            "MinimumGroupsUnavailable",
            format!("{ready} of {replicas} groups ready (at least {need} needed)"),
        )
    };

    let any_outdated = inputs.revision.is_some_and(|r| {
        (0..replicas).any(|i| observed.group(i).is_some_and(|g| g.is_outdated(r)))
    });
    let progressing = if let Some(msg) = inputs.invalid_spec {
        cond(CONDITION_PROGRESSING, false, "InvalidSpec", msg.to_string())
    } else if !plan.delete.is_empty() {
        cond(
            CONDITION_PROGRESSING,
            true,
            "ScalingDown",
            format!("deleting groups {:?}", plan.delete),
        )
    } else if let Some(g) = inputs.draining {
        cond(
            CONDITION_PROGRESSING,
            true,
            "DrainingGroup",
            format!(
                "group {g} is out of the serving Service and is deleted once its requests finish"
            ),
        )
    } else if !plan.create.is_empty() {
        cond(
            CONDITION_PROGRESSING,
            true,
            "ScalingUp",
            format!("creating groups {:?}", plan.create),
        )
    } else if !plan.recreate.is_empty() {
        let idx: Vec<i32> = plan.recreate.iter().map(|(i, _)| *i).collect();
        cond(
            CONDITION_PROGRESSING,
            true,
            "RecreatingGroups",
            format!("recreating groups {idx:?} after a pod failure"),
        )
    } else if !plan.roll.is_empty() || any_outdated || !plan.waiting.is_empty() {
        cond(
            CONDITION_PROGRESSING,
            true,
            "RollingUpdate",
            format!("{updated} of {replicas} groups run the current pod template"),
        )
    } else if ready < replicas {
        cond(
            CONDITION_PROGRESSING,
            true,
            "GroupsStarting",
            format!("{ready} of {replicas} groups ready"),
        )
    } else {
        cond(
            CONDITION_PROGRESSING,
            false,
            "Converged",
            format!("all {replicas} groups are ready and run the current pod template"),
        )
    };

    let degraded = if let Some(msg) = inputs.invalid_spec {
        cond(CONDITION_DEGRADED, true, "InvalidSpec", msg.to_string())
    } else if let Some(err) = inputs.error {
        cond(CONDITION_DEGRADED, true, "ReconcileError", err.to_string())
    } else if !failed.is_empty() {
        cond(CONDITION_DEGRADED, true, "GroupFailed", failed.join("; "))
    } else if !plan.recreate.is_empty() {
        let msgs: Vec<String> = plan
            .recreate
            .iter()
            .map(|(i, r)| format!("group {i}: {r}"))
            .collect();
        cond(CONDITION_DEGRADED, true, "GroupRecreated", msgs.join("; "))
    } else {
        cond(
            CONDITION_DEGRADED,
            false,
            "AsExpected",
            "no problems found".into(),
        )
    };

    let mut conditions = vec![available, progressing, degraded];
    let autoscaling = if spec.autoscaling.enabled {
        inputs
            .autoscaling
            .cloned()
            .or_else(|| previous.and_then(|p| p.autoscaling.clone()))
    } else {
        // A drain after an outside scale-in (only its `draining` is set), while it lasts.
        inputs.autoscaling.filter(|a| a.draining.is_some()).cloned()
    };
    if spec.autoscaling.enabled {
        conditions.push(match inputs.limited {
            Some(why) => cond(CONDITION_SCALING_LIMITED, true, "Limited", why.to_string()),
            None => cond(
                CONDITION_SCALING_LIMITED,
                false,
                "DesiredWithinRange",
                "the autoscaler chose the count it computed".into(),
            ),
        });
    }
    match &inputs.inference_pool {
        PoolReport::Keep => {
            conditions.extend(find(previous, CONDITION_INFERENCE_POOL_READY).cloned());
        }
        PoolReport::Absent => {}
        PoolReport::Synced(state) => conditions.push(cond(
            CONDITION_INFERENCE_POOL_READY,
            state.is_ready(),
            state.reason(),
            state.message(),
        )),
    }
    let kv_percent = autoscaling
        .as_ref()
        .and_then(|a| a.kv_cache_usage)
        .map(|v| (v * 100.0).round() as i32);
    let queue = autoscaling
        .as_ref()
        .and_then(|a| a.requests_waiting_per_group)
        .map(|w| (w * f64::from(ready.max(1))).round() as i32);

    DeepSeekDeploymentStatus {
        observed_generation: inputs.generation,
        replicas: existing,
        ready_replicas: ready,
        updated_replicas: updated,
        desired_replicas: replicas,
        pods_per_group: ppg,
        selector: Some(render::leader_selector(inputs.name)),
        update_revision: inputs.revision.map(str::to_string),
        kv_cache_utilization_percent: kv_percent
            .or_else(|| previous.and_then(|p| p.kv_cache_utilization_percent)),
        queue_depth: queue.or_else(|| previous.and_then(|p| p.queue_depth)),
        autoscaling,
        groups,
        conditions,
    }
}

/// A condition whose `lastTransitionTime` is kept from `old` when its status did not change.
pub fn condition(
    old: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// The status with its `Degraded` condition replaced, as written when a reconcile fails.
pub fn with_error(
    previous: Option<&DeepSeekDeploymentStatus>,
    error: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> DeepSeekDeploymentStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let c = condition(
        &status.conditions,
        CONDITION_DEGRADED,
        true,
        "ReconcileError",
        error.to_string(),
        generation,
        now,
    );
    status.conditions.retain(|c| c.type_ != CONDITION_DEGRADED);
    status.conditions.push(c);
    status
}

/// The condition of a type, if present.
pub fn find<'a>(
    status: Option<&'a DeepSeekDeploymentStatus>,
    type_: &str,
) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DeepSeekDeployment;
    use crate::controller::observed::{ObservedGroup, ObservedPod};

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn group(i: i32, ready: bool) -> ObservedGroup {
        let pod = |r: i32| ObservedPod {
            name: format!("tiny-g{i}-{r}"),
            rank: Some(r),
            revision: Some("rev".into()),
            phase: "Running".into(),
            ready,
            ..ObservedPod::default()
        };
        ObservedGroup {
            index: i,
            statefulset: true,
            pods: vec![pod(0), pod(1)],
        }
    }

    fn inputs() -> Inputs<'static> {
        Inputs {
            name: "tiny",
            generation: Some(3),
            revision: Some("rev"),
            pods_per_group: 2,
            invalid_spec: None,
            error: None,
            ..Inputs::default()
        }
    }

    fn get<'a>(s: &'a DeepSeekDeploymentStatus, type_: &str) -> &'a Condition {
        find(Some(s), type_).unwrap()
    }

    fn spec(replicas: i32) -> DeepSeekDeploymentSpec {
        DeepSeekDeployment::test().with_replicas(replicas).spec
    }

    #[test]
    fn available_needs_replicas_minus_max_unavailable_ready_groups() {
        let mut o = Observed::default();
        o.groups.insert(0, group(0, true));
        o.groups.insert(1, group(1, false));
        o.groups.insert(2, group(2, true));
        let s = compute(&spec(3), &inputs(), &o, &Plan::default(), None, t(0));
        assert_eq!(
            (s.replicas, s.ready_replicas, s.updated_replicas),
            (3, 2, 3)
        );
        assert_eq!(get(&s, CONDITION_AVAILABLE).status, "True");
        assert_eq!(get(&s, CONDITION_PROGRESSING).reason, "GroupsStarting");
        o.groups.insert(2, group(2, false));
        let s = compute(&spec(3), &inputs(), &o, &Plan::default(), None, t(0));
        assert_eq!(
            get(&s, CONDITION_AVAILABLE).reason,
            "MinimumGroupsUnavailable"
        );
        assert_eq!(
            get(&s, CONDITION_AVAILABLE).message,
            "1 of 3 groups ready (at least 2 needed)"
        );
    }

    #[test]
    fn scaled_to_zero_is_not_available_but_converged() {
        let s = compute(
            &spec(0),
            &inputs(),
            &Observed::default(),
            &Plan::default(),
            None,
            t(0),
        );
        assert_eq!(get(&s, CONDITION_AVAILABLE).reason, "ScaledToZero");
        assert_eq!(get(&s, CONDITION_PROGRESSING).reason, "Converged");
        assert!(s.groups.is_empty());
    }

    #[test]
    fn transition_times_move_only_when_a_condition_flips() {
        let mut o = Observed::default();
        o.groups.insert(0, group(0, false));
        let first = compute(&spec(1), &inputs(), &o, &Plan::default(), None, t(0));
        let again = compute(
            &spec(1),
            &inputs(),
            &o,
            &Plan::default(),
            Some(&first),
            t(60),
        );
        assert_eq!(
            first, again,
            "same inputs, same status, whatever the clock says"
        );
        o.groups.insert(0, group(0, true));
        let ready = compute(
            &spec(1),
            &inputs(),
            &o,
            &Plan::default(),
            Some(&again),
            t(120),
        );
        assert_eq!(
            get(&ready, CONDITION_AVAILABLE).last_transition_time,
            Time(t(120))
        );
        assert_eq!(
            get(&ready, CONDITION_DEGRADED).last_transition_time,
            Time(t(0))
        );
    }

    #[test]
    fn an_invalid_spec_is_degraded_and_not_progressing() {
        let mut i = inputs();
        i.invalid_spec = Some("spec.replicas: must be between 0 and 1000 (is -1)");
        let s = compute(
            &spec(1),
            &i,
            &Observed::default(),
            &Plan::default(),
            None,
            t(0),
        );
        let d = get(&s, CONDITION_DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(
            d.message,
            "spec.replicas: must be between 0 and 1000 (is -1)"
        );
        assert_eq!(get(&s, CONDITION_PROGRESSING).status, "False");
        assert_eq!(d.observed_generation, Some(3));
    }

    #[test]
    fn group_states_follow_the_plan_and_the_pods() {
        let mut o = Observed::default();
        o.groups.insert(0, group(0, true));
        o.groups.insert(1, group(1, true));
        let mut old = group(2, true);
        old.pods
            .iter_mut()
            .for_each(|p| p.revision = Some("old".into()));
        o.groups.insert(2, old);
        let plan = Plan {
            recreate: vec![(1, "pod tiny-g1-0 restarted 1 time(s)".into())],
            waiting: vec![2],
            ..Plan::default()
        };
        let s = compute(&spec(4), &inputs(), &o, &plan, None, t(0));
        let states: Vec<GroupState> = s.groups.iter().map(|g| g.state).collect();
        assert_eq!(
            states,
            [
                GroupState::Ready,
                GroupState::Recreating,
                GroupState::Ready,
                GroupState::Pending
            ]
        );
        assert_eq!(
            s.groups[2].message.as_deref(),
            Some("serving an older pod template; waiting for its turn to update")
        );
        assert_eq!(get(&s, CONDITION_DEGRADED).reason, "GroupRecreated");
        assert_eq!(s.updated_replicas, 1);
        assert_eq!(
            s.selector.as_deref(),
            Some(
                "app.kubernetes.io/instance=tiny,app.kubernetes.io/component=engine,apps.kubernetes.io/pod-index=0"
            )
        );
    }

    #[test]
    fn autoscaler_readings_are_carried_over() {
        let prev = DeepSeekDeploymentStatus {
            kv_cache_utilization_percent: Some(42),
            queue_depth: Some(7),
            ..Default::default()
        };
        let s = compute(
            &spec(0),
            &inputs(),
            &Observed::default(),
            &Plan::default(),
            Some(&prev),
            t(0),
        );
        assert_eq!(
            (s.kv_cache_utilization_percent, s.queue_depth),
            (Some(42), Some(7))
        );
    }

    #[test]
    fn a_reconcile_error_replaces_only_the_degraded_condition() {
        let ok = compute(
            &spec(0),
            &inputs(),
            &Observed::default(),
            &Plan::default(),
            None,
            t(0),
        );
        let err = with_error(
            Some(&ok),
            "Kubernetes API call failed: boom",
            Some(3),
            t(10),
        );
        assert_eq!(err.conditions.len(), 3);
        let d = get(&err, CONDITION_DEGRADED);
        assert_eq!(
            (d.reason.as_str(), d.last_transition_time.clone()),
            ("ReconcileError", Time(t(10)))
        );
        assert_eq!(
            get(&err, CONDITION_AVAILABLE),
            get(&ok, CONDITION_AVAILABLE)
        );
    }
}
