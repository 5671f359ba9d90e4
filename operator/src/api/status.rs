//! The observed state of a `DeepSeekDeployment`, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Observed state of the deployment, written by the operator.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Engine groups that currently have pods, in any state.
    #[serde(default)]
    pub replicas: i32,

    /// Engine groups whose every pod is ready.
    #[serde(default)]
    pub ready_replicas: i32,

    /// Engine groups whose every pod runs the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,

    /// Engine groups asked for (`spec.replicas`).
    #[serde(default)]
    pub desired_replicas: i32,

    /// Pods in each group.
    #[serde(default)]
    pub pods_per_group: i32,

    /// Label selector of the leader (rank 0) pods of all groups, used by the scale subresource
    /// so that an external autoscaler averages metrics per group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// Hash of the current pod template. Groups whose pods carry another hash are replaced
    /// during a rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_revision: Option<String>,

    /// Mean KV-cache use of the ready groups, in percent, as last read by the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_utilization_percent: Option<i32>,

    /// Requests waiting in the ready groups, as last read by the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<i32>,

    /// State of each group, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupStatus>,

    /// Standard conditions: `Available` (enough groups are ready to serve), `Progressing` (the
    /// operator is still creating, rolling, scaling or recreating groups) and `Degraded` (the
    /// spec is invalid, a group failed, or the last reconcile hit an error).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// State of one engine group.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Index of the group; its pods are named `<name>-g<index>-<rank>`.
    pub index: i32,

    /// Phase of the group: `Pending` (no pods yet), `Starting` (pods are loading the model),
    /// `Ready` (every pod is ready), `Updating` (being replaced with the current pod template),
    /// `Recreating` (being replaced after a pod failed) or `Failed` (a pod failed and the
    /// failure policy leaves the group alone).
    pub state: GroupState,

    /// Pods of the group that are ready.
    pub ready_pods: i32,

    /// Pods of the group that exist and are not being deleted.
    pub pods: i32,

    /// Pod-template hash that all pods of the group run, if they agree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,

    /// Human-readable detail, for example which pod failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Phase of one engine group.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Pending,
    Starting,
    Ready,
    Updating,
    Recreating,
    Failed,
}

/// Condition type: enough groups are ready to serve.
pub const CONDITION_AVAILABLE: &str = "Available";
/// Condition type: the operator is still moving the groups towards the spec.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: something is wrong that needs attention.
pub const CONDITION_DEGRADED: &str = "Degraded";
