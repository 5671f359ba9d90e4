//! The observed state of a `DeepSeekDeployment`, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
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

    /// Engine groups asked for: `spec.replicas`, or the autoscaler's choice when
    /// `spec.autoscaling.enabled` is true.
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

    /// What the autoscaler saw and did; present while `spec.autoscaling.enabled` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,

    /// State of each group, by index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupStatus>,

    /// Standard conditions: `Available` (enough groups are ready to serve), `Progressing` (the
    /// operator is still creating, rolling, scaling or recreating groups) and `Degraded` (the
    /// spec is invalid, a group failed, or the last reconcile hit an error); with autoscaling,
    /// also `ScalingLimited` (the autoscaler wanted another count than it chose, and why); with
    /// `spec.inferencePool`, also `InferencePoolReady` (the InferencePool is in place, or why
    /// not).
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
    /// `Ready` (every pod is ready), `Draining` (out of the serving Service, finishing its
    /// requests before it is deleted), `Updating` (being replaced with the current pod template),
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

    /// Model loading progress of the group leader in percent
    /// (`deepseek_engine_model_load_progress`), as last read by the autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_progress_percent: Option<i32>,
}

/// What the autoscaler saw and did.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// When the groups' metrics were last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,

    /// Mean KV-cache use (0 to 1) of the ready groups that reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_cache_usage: Option<f64>,

    /// Mean projected KV-cache use of the ready groups that reported it (may exceed 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_kv_cache_usage: Option<f64>,

    /// Mean waiting requests per ready group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_waiting_per_group: Option<f64>,

    /// Running requests summed over the ready groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_running: Option<f64>,

    /// Ready groups in the serving Service.
    #[serde(default)]
    pub ready_groups: i32,

    /// Ready groups whose metrics could be read at the last poll.
    #[serde(default)]
    pub reporting_groups: i32,

    /// Why the autoscaler holds or moves the count, as of the last poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// The last change of the group count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleEvent>,

    /// The last changes of the group count, newest last (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ScaleEvent>,

    /// The group taken out of the serving Service to finish its requests before it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining: Option<DrainingGroup>,
}

/// One change of the group count.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    /// Groups before.
    pub from: i32,
    /// Groups after.
    pub to: i32,
    /// Why.
    pub reason: String,
    /// When.
    pub time: Time,
}

/// A group leaving the serving Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DrainingGroup {
    /// Index of the group.
    pub index: i32,
    /// When it left the serving Service.
    pub since: Time,
}

/// Phase of one engine group.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupState {
    Pending,
    Starting,
    Ready,
    Draining,
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
/// Condition type: the autoscaler wanted another group count than it chose.
pub const CONDITION_SCALING_LIMITED: &str = "ScalingLimited";
/// Condition type: the InferencePool asked for by `spec.inferencePool` is in place.
pub const CONDITION_INFERENCE_POOL_READY: &str = "InferencePoolReady";
