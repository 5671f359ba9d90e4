//! The status the operator writes: group states, counts and conditions. Pure; `now` is passed
//! in and only used for conditions whose status changes.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::observed::Observed;
use super::plan::Plan;
use crate::api::{
    CONDITION_AVAILABLE, CONDITION_DEGRADED, CONDITION_PROGRESSING, DeepSeekDeploymentSpec,
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
}

/// Computes the full status. Fields the autoscaler owns (`kvCacheUtilizationPercent`,
/// `queueDepth`) are carried over from `previous`.
pub fn compute(
    spec: &DeepSeekDeploymentSpec,
    inputs: &Inputs<'_>,
    observed: &Observed,
    plan: &Plan,
    previous: Option<&DeepSeekDeploymentStatus>,
    now: Timestamp,
) -> DeepSeekDeploymentStatus {
    let ppg = inputs.pods_per_group;
    let replicas = spec.replicas.max(0);
    let mut groups = Vec::new();
    let (mut existing, mut ready, mut updated) = (0, 0, 0);
    let mut failed = Vec::new();
    for index in 0..replicas {
        let g = observed.group(index).cloned().unwrap_or_default();
        let recreate = plan.recreate.iter().find(|(i, _)| *i == index);
        let (state, message) = if let Some((_, reason)) = recreate {
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

    DeepSeekDeploymentStatus {
        observed_generation: inputs.generation,
        replicas: existing,
        ready_replicas: ready,
        updated_replicas: updated,
        desired_replicas: replicas,
        pods_per_group: ppg,
        selector: Some(render::leader_selector(inputs.name)),
        update_revision: inputs.revision.map(str::to_string),
        kv_cache_utilization_percent: previous.and_then(|p| p.kv_cache_utilization_percent),
        queue_depth: previous.and_then(|p| p.queue_depth),
        groups,
        conditions: vec![available, progressing, degraded],
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
