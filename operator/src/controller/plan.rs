//! What to do to move the groups towards the spec: which to create, delete, recreate after a
//! failure, or restart onto a new pod template. Pure: a function of the spec, the desired
//! revision and what was observed.
//!
//! Group restarts follow LeaderWorkerSet's semantics: a group is only ever replaced whole,
//! because its ranks share one set of collective-communication channels that do not survive a
//! lost member.

use std::collections::BTreeSet;

use super::observed::Observed;
use crate::api::{DeepSeekDeploymentSpec, GroupFailurePolicy};

/// Actions for one reconcile.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Plan {
    /// Groups whose StatefulSet does not exist yet and is created now.
    pub create: Vec<i32>,
    /// Groups no longer asked for to delete, highest index first.
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

/// Decides the actions for one reconcile, for groups `0..spec.replicas`.
pub fn plan(
    spec: &DeepSeekDeploymentSpec,
    revision: &str,
    pods_per_group: i32,
    observed: &Observed,
) -> Plan {
    let indices: BTreeSet<i32> = (0..spec.replicas.max(0)).collect();
    plan_groups(spec, &indices, None, revision, pods_per_group, observed)
}

/// Decides the actions for one reconcile, for the groups in `indices`. The `draining` group is
/// neither rolled nor recreated: it is about to go.
pub fn plan_groups(
    spec: &DeepSeekDeploymentSpec,
    indices: &BTreeSet<i32>,
    draining: Option<i32>,
    revision: &str,
    pods_per_group: i32,
    observed: &Observed,
) -> Plan {
    // Scale down: every group not asked for that still has a StatefulSet, highest first.
    let mut p = Plan {
        delete: observed
            .groups
            .values()
            .filter(|g| !indices.contains(&g.index) && g.statefulset)
            .map(|g| g.index)
            .rev()
            .collect(),
        ..Plan::default()
    };

    let mut unavailable = 0;
    let mut outdated = Vec::new();
    for &index in indices {
        let Some(g) = observed.group(index) else {
            p.create.push(index);
            unavailable += 1;
            continue;
        };
        if !g.statefulset {
            p.create.push(index);
        }
        if draining == Some(index) {
            unavailable += 1;
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::DeepSeekDeployment;
    use crate::controller::observed::{ObservedGroup, ObservedPod};

    const REV: &str = "new";

    fn pod(group: i32, rank: i32, rev: &str, ready: bool) -> ObservedPod {
        ObservedPod {
            name: format!("tiny-g{group}-{rank}"),
            rank: Some(rank),
            revision: Some(rev.into()),
            phase: "Running".into(),
            ready,
            ..ObservedPod::default()
        }
    }

    /// Groups with 2 pods each: (index, revision, ready).
    fn observed(groups: &[(i32, &str, bool)]) -> Observed {
        let mut o = Observed::default();
        for &(i, rev, ready) in groups {
            o.groups.insert(
                i,
                ObservedGroup {
                    index: i,
                    statefulset: true,
                    pods: vec![pod(i, 0, rev, ready), pod(i, 1, rev, ready)],
                },
            );
        }
        o
    }

    fn spec(replicas: i32, max_unavailable: i32) -> DeepSeekDeploymentSpec {
        let mut s = DeepSeekDeployment::test().spec;
        s.replicas = replicas;
        s.rollout.max_unavailable = max_unavailable;
        s
    }

    #[test]
    fn missing_groups_are_created() {
        let p = plan(&spec(3, 1), REV, 2, &observed(&[(0, REV, true)]));
        assert_eq!(p.create, [1, 2]);
        assert!(p.delete.is_empty() && p.roll.is_empty() && p.recreate.is_empty());
    }

    #[test]
    fn surplus_groups_are_deleted_highest_index_first() {
        let p = plan(
            &spec(1, 1),
            REV,
            2,
            &observed(&[
                (0, REV, true),
                (1, REV, true),
                (2, REV, true),
                (4, REV, false),
            ]),
        );
        assert_eq!(p.delete, [4, 2, 1]);
    }

    #[test]
    fn a_group_whose_statefulset_is_already_gone_is_not_deleted_again() {
        let mut o = observed(&[(0, REV, true), (1, REV, true)]);
        o.groups.get_mut(&1).unwrap().statefulset = false;
        assert!(plan(&spec(1, 1), REV, 2, &o).delete.is_empty());
    }

    #[test]
    fn a_converged_deployment_needs_no_action() {
        let p = plan(
            &spec(2, 1),
            REV,
            2,
            &observed(&[(0, REV, true), (1, REV, true)]),
        );
        assert!(p.is_empty());
        assert!(p.waiting.is_empty());
    }

    #[test]
    fn outdated_ready_groups_roll_within_max_unavailable_lowest_first() {
        let o = observed(&[(0, "old", true), (1, "old", true), (2, "old", true)]);
        let p = plan(&spec(3, 1), REV, 2, &o);
        assert_eq!((p.roll.clone(), p.waiting.clone()), (vec![0], vec![1, 2]));
        let p = plan(&spec(3, 2), REV, 2, &o);
        assert_eq!((p.roll.clone(), p.waiting.clone()), (vec![0, 1], vec![2]));
    }

    #[test]
    fn no_ready_group_rolls_while_another_group_is_unavailable() {
        let o = observed(&[(0, REV, false), (1, "old", true)]);
        let p = plan(&spec(2, 1), REV, 2, &o);
        assert!(p.roll.is_empty());
        assert_eq!(p.waiting, [1]);
    }

    #[test]
    fn an_outdated_group_that_is_down_anyway_rolls_at_once() {
        let o = observed(&[(0, "old", false), (1, "old", true)]);
        let p = plan(&spec(2, 1), REV, 2, &o);
        assert_eq!(p.roll, [0]);
        assert_eq!(p.waiting, [1]);
    }

    #[test]
    fn a_group_with_terminating_pods_is_left_to_finish() {
        let mut o = observed(&[(0, "old", true)]);
        o.groups.get_mut(&0).unwrap().pods[0].deleting = true;
        let p = plan(&spec(1, 1), REV, 2, &o);
        assert!(p.roll.is_empty() && p.recreate.is_empty());
    }

    #[test]
    fn a_restarted_or_failed_pod_recreates_its_group_under_the_default_policy() {
        let mut o = observed(&[(0, REV, true), (1, REV, true)]);
        o.groups.get_mut(&1).unwrap().pods[1].restarts = 2;
        let p = plan(&spec(2, 1), REV, 2, &o);
        assert_eq!(
            p.recreate,
            [(1, "pod tiny-g1-1 restarted 2 time(s)".to_string())]
        );
        let mut o = observed(&[(0, REV, true)]);
        o.groups.get_mut(&0).unwrap().pods[0].phase = "Failed".into();
        o.groups.get_mut(&0).unwrap().pods[0].reason = Some("Evicted".into());
        assert_eq!(
            plan(&spec(1, 1), REV, 2, &o).recreate,
            [(0, "pod tiny-g0-0 failed (Evicted)".to_string())]
        );
    }

    #[test]
    fn recreate_after_start_waits_while_a_pod_is_pending() {
        let mut s = spec(1, 1);
        s.group_failure_policy = GroupFailurePolicy::RecreateGroupAfterStart;
        let mut o = observed(&[(0, REV, false)]);
        o.groups.get_mut(&0).unwrap().pods[0].restarts = 1;
        o.groups.get_mut(&0).unwrap().pods[1].phase = "Pending".into();
        assert!(plan(&s, REV, 2, &o).recreate.is_empty());
        o.groups.get_mut(&0).unwrap().pods[1].phase = "Running".into();
        assert_eq!(plan(&s, REV, 2, &o).recreate.len(), 1);
    }

    #[test]
    fn policy_none_never_recreates() {
        let mut s = spec(1, 1);
        s.group_failure_policy = GroupFailurePolicy::None;
        let mut o = observed(&[(0, REV, true)]);
        o.groups.get_mut(&0).unwrap().pods[0].restarts = 5;
        assert!(plan(&s, REV, 2, &o).recreate.is_empty());
    }

    #[test]
    fn a_recreated_group_counts_as_unavailable_for_the_rollout() {
        let mut o = observed(&[(0, REV, true), (1, "old", true)]);
        o.groups.get_mut(&0).unwrap().pods[0].restarts = 1;
        let p = plan(&spec(2, 1), REV, 2, &o);
        assert_eq!(p.recreate.len(), 1);
        assert!(p.roll.is_empty());
    }
}
