//! What to do to move the groups towards the spec: which to create, delete, recreate after a
//! failure, or restart onto a new pod template. Pure: a function of the spec, the desired
//! revision and what was observed.
//!
//! Group restarts follow LeaderWorkerSet's semantics: a group is only ever replaced whole,
//! because its ranks share one set of collective-communication channels that do not survive a
//! lost member.

use super::observed::Observed;
use crate::api::{DeepSeekDeploymentSpec, GroupFailurePolicy};

/// Actions for one reconcile.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// Groups whose StatefulSet does not exist yet and is created now.
    pub create: Vec<i32>,
    /// Groups at or above `spec.replicas` to delete, highest index first.
    pub delete: Vec<i32>,
    /// Groups whose pods are all deleted now because one failed, with the reason.
    pub recreate: Vec<(i32, String)>,
    /// Outdated groups whose pods are deleted now so they come back on the current template.
    pub roll: Vec<i32>,
    /// Outdated groups left for a later reconcile because of `rollout.maxUnavailable`.
    pub waiting: Vec<i32>,
}

impl Plan {
    /// True if the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.create.is_empty()
            && self.delete.is_empty()
            && self.recreate.is_empty()
            && self.roll.is_empty()
    }

    /// True if `index` is recreated or rolled by this plan.
    pub fn restarts(&self, index: i32) -> bool {
        self.roll.contains(&index) || self.recreate.iter().any(|(i, _)| *i == index)
    }
}

/// Decides the actions for one reconcile.
pub fn plan(
    spec: &DeepSeekDeploymentSpec,
    revision: &str,
    pods_per_group: i32,
    observed: &Observed,
) -> Plan {
    let mut p = Plan::default();
    let replicas = spec.replicas.max(0);

    // Scale down: every group at or above replicas that still has a StatefulSet.
    p.delete = observed
        .groups
        .values()
        .filter(|g| g.index >= replicas && g.statefulset)
        .map(|g| g.index)
        .rev()
        .collect();

    let mut unavailable = 0;
    let mut outdated = Vec::new();
    for index in 0..replicas {
        let Some(g) = observed.group(index) else {
            p.create.push(index);
            unavailable += 1;
            continue;
        };
        if !g.statefulset {
            p.create.push(index);
        }
        if let Some(reason) = g.failure() {
            let act = match spec.group_failure_policy {
                GroupFailurePolicy::RecreateGroup => true,
                GroupFailurePolicy::RecreateGroupAfterStart => !g.any_pending(),
                GroupFailurePolicy::None => false,
            };
            if act {
                p.recreate.push((index, reason));
                unavailable += 1;
                continue;
            }
        }
        let ready = g.is_ready(pods_per_group) && !g.terminating();
        if !ready {
            unavailable += 1;
        }
        if !g.terminating() && g.live_count() > 0 && g.is_outdated(revision) {
            outdated.push((index, ready));
        }
    }

    // Rollout: a group that is down anyway is restarted at once; a serving group only while
    // fewer than maxUnavailable groups are down, lowest index first.
    let max_unavailable = spec.rollout.max_unavailable.max(1);
    for (index, ready) in outdated {
        if !ready {
            p.roll.push(index);
        } else if unavailable < max_unavailable {
            p.roll.push(index);
            unavailable += 1;
        } else {
            p.waiting.push(index);
        }
    }
    p
}
