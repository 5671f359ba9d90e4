//! What the cluster holds for one deployment, reduced to what decisions need. Pure.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::render::{GROUP_LABEL, RANK_LABEL, REVISION_LABEL, SERVING_LABEL};

/// One engine pod.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ObservedPod {
    /// Pod name.
    pub name: String,
    /// Rank (pod ordinal), when the pod carries the label.
    pub rank: Option<i32>,
    /// Pod-template revision the pod was created from.
    pub revision: Option<String>,
    /// `status.phase`.
    pub phase: String,
    /// The `Ready` condition is true.
    pub ready: bool,
    /// Sum of the restart counts of the pod's main containers.
    pub restarts: i32,
    /// The pod has a deletion timestamp.
    pub deleting: bool,
    /// `status.reason`, such as `Evicted`.
    pub reason: Option<String>,
    /// `status.podIP`.
    pub ip: Option<String>,
    /// Value of the serving label, if set.
    pub serving: Option<String>,
}

/// One engine group as found in the cluster.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ObservedGroup {
    /// Group index.
    pub index: i32,
    /// The group's StatefulSet exists.
    pub statefulset: bool,
    /// The group's pods, by name order.
    pub pods: Vec<ObservedPod>,
}

/// Every group found for one deployment, by index.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Observed {
    /// Groups by index.
    pub groups: BTreeMap<i32, ObservedGroup>,
}

fn group_index<K: ResourceExt>(obj: &K) -> Option<i32> {
    obj.labels().get(GROUP_LABEL)?.parse().ok()
}

impl ObservedPod {
    /// Reduces a pod.
    pub fn from_pod(pod: &Pod) -> Self {
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let restarts = status
            .and_then(|s| s.container_statuses.as_ref())
            .map(|cs| cs.iter().map(|c| c.restart_count).sum())
            .unwrap_or(0);
        Self {
            name: pod.name_any(),
            rank: pod.labels().get(RANK_LABEL).and_then(|r| r.parse().ok()),
            revision: pod.labels().get(REVISION_LABEL).cloned(),
            phase: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into()),
            ready,
            restarts,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            reason: status.and_then(|s| s.reason.clone()),
            ip: status.and_then(|s| s.pod_ip.clone()),
            serving: pod.labels().get(SERVING_LABEL).cloned(),
        }
    }

    /// Why this pod breaks its group, if it does: it failed, was evicted, or a container
    /// restarted (the other ranks cannot continue with a restarted peer).
    pub fn failure(&self) -> Option<String> {
        if self.deleting {
            return None;
        }
        if self.phase == "Failed" {
            let why = self.reason.as_deref().unwrap_or("Failed");
            return Some(format!("pod {} failed ({why})", self.name));
        }
        if self.restarts > 0 {
            return Some(format!(
                "pod {} restarted {} time(s)",
                self.name, self.restarts
            ));
        }
        None
    }
}

impl ObservedGroup {
    /// Pods not being deleted.
    pub fn live_pods(&self) -> impl Iterator<Item = &ObservedPod> {
        self.pods.iter().filter(|p| !p.deleting)
    }

    /// Number of pods not being deleted.
    pub fn live_count(&self) -> i32 {
        self.live_pods().count() as i32
    }

    /// Number of ready pods not being deleted.
    pub fn ready_count(&self) -> i32 {
        self.live_pods().filter(|p| p.ready).count() as i32
    }

    /// Some pod is being deleted.
    pub fn terminating(&self) -> bool {
        self.pods.iter().any(|p| p.deleting)
    }

    /// Some live pod has not been scheduled or started yet.
    pub fn any_pending(&self) -> bool {
        self.live_pods().any(|p| p.phase == "Pending")
    }

    /// The first failure among the live pods.
    pub fn failure(&self) -> Option<String> {
        self.live_pods().find_map(ObservedPod::failure)
    }

    /// Every one of `pods_per_group` pods exists and is ready.
    pub fn is_ready(&self, pods_per_group: i32) -> bool {
        self.live_count() == pods_per_group && self.ready_count() == pods_per_group
    }

    /// Some live pod runs a template other than `revision`.
    pub fn is_outdated(&self, revision: &str) -> bool {
        self.live_pods()
            .any(|p| p.revision.as_deref() != Some(revision))
    }

    /// The live rank-0 pod, if any.
    pub fn leader(&self) -> Option<&ObservedPod> {
        self.live_pods().find(|p| p.rank == Some(0))
    }

    /// All `pods_per_group` pods exist and run `revision`.
    pub fn is_updated(&self, revision: &str, pods_per_group: i32) -> bool {
        self.live_count() == pods_per_group && !self.is_outdated(revision)
    }

    /// The revision all live pods share, if there are any and they agree.
    pub fn revision(&self) -> Option<String> {
        let mut revs = self.live_pods().map(|p| p.revision.clone());
        let first = revs.next()??;
        revs.all(|r| r.as_deref() == Some(first.as_str()))
            .then_some(first)
    }
}

impl Observed {
    /// Groups the StatefulSets and pods of one deployment by their group label. Objects
    /// without the label are ignored.
    pub fn from_objects(statefulsets: &[StatefulSet], pods: &[Pod]) -> Self {
        let mut groups: BTreeMap<i32, ObservedGroup> = BTreeMap::new();
        for sts in statefulsets {
            if let Some(i) = group_index(sts) {
                let g = groups.entry(i).or_default();
                g.index = i;
                g.statefulset = true;
            }
        }
        for pod in pods {
            if let Some(i) = group_index(pod) {
                let g = groups.entry(i).or_default();
                g.index = i;
                g.pods.push(ObservedPod::from_pod(pod));
            }
        }
        for g in groups.values_mut() {
            g.pods
                .sort_by(|a, b| a.rank.cmp(&b.rank).then(a.name.cmp(&b.name)));
        }
        Self { groups }
    }

    /// The group with this index, if anything of it exists.
    pub fn group(&self, index: i32) -> Option<&ObservedGroup> {
        self.groups.get(&index)
    }

    /// Indices of the groups whose StatefulSet exists.
    pub fn live_indices(&self) -> BTreeSet<i32> {
        self.groups
            .values()
            .filter(|g| g.statefulset)
            .map(|g| g.index)
            .collect()
    }
}
