//! The desired state of a `DeepSeekDeployment`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::DeepSeekDeploymentStatus;

/// API group of every resource this operator defines.
pub const GROUP: &str = "serving.deepseek.dev";
/// API version served and stored.
pub const VERSION: &str = "v1alpha1";

/// Desired state of a DeepSeek model served by expert-parallel engine groups.
///
/// Each group is a set of pods that together hold one full copy of the model: the model's
/// experts are spread over `parallelism.expertParallel` ranks, `parallelism.gpusPerPod` ranks
/// per pod. `replicas` sets how many such groups run; a Service in front of them sends traffic
/// to the leader (rank 0) pod of every ready group.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "serving.deepseek.dev",
    version = "v1alpha1",
    kind = "DeepSeekDeployment",
    namespaced,
    shortname = "dsd",
    category = "all",
    status = "DeepSeekDeploymentStatus",
    derive = "PartialEq",
    doc = "A DeepSeek model served by one or more expert-parallel engine groups.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas", description = "Engine groups that have pods"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "Engine groups whose every pod is ready"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas", description = "Engine groups asked for, by spec.replicas or the autoscaler"),
    printcolumn(name = "KV%", type_ = "integer", json_path = ".status.kvCacheUtilizationPercent", description = "Mean KV-cache use of the ready groups, in percent"),
    printcolumn(name = "Queue", type_ = "integer", json_path = ".status.queueDepth", description = "Requests waiting, summed over the ready groups"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 40").message("metadata.name must be at most 40 characters: pod names add a group index and a rank to it"),
)]
#[serde(rename_all = "camelCase")]
pub struct DeepSeekDeploymentSpec {
    /// Where the model weights come from.
    pub model: ModelSpec,

    /// The inference engine container: image, limits and extra command-line arguments.
    #[serde(default)]
    pub engine: EngineSpec,

    /// How one copy of the model is split over GPUs and pods.
    #[serde(default)]
    pub parallelism: ParallelismSpec,

    /// Number of engine groups (full model copies) to run. Each group has
    /// `parallelism.expertParallel / parallelism.gpusPerPod` pods. Set to 0 to stop serving while
    /// keeping the resource. When `autoscaling.enabled` is true this is only the starting
    /// point: the operator chooses the count and reports it in `status.desiredReplicas`.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Automatic scaling of the number of groups on KV-cache use and queue depth.
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,

    /// Extra compute resources for the engine container. GPU requests and limits
    /// (`nvidia.com/gpu`) are set from `parallelism.gpusPerPod` and must not be given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels that an engine pod's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Taints that engine pods tolerate, for example the taint on dedicated GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,

    /// Scheduling constraints for engine pods. Combined with the co-location rule that
    /// `topologyKey` adds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Node label whose value must be the same for every pod of one group, for example
    /// `kubernetes.io/hostname` (one node) or a rack or NVLink-domain label. Keeps a group's
    /// all-to-all traffic on the fastest links. Unset: pods of a group may land anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub topology_key: Option<String>,

    /// PriorityClass of the engine pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// Scheduler that places the engine pods, for example a gang scheduler so that a group's
    /// pods start together or not at all. Unset: the default scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: Option<String>,

    /// ServiceAccount the engine pods run as. Unset: the namespace's default account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,

    /// Extra labels on every engine pod. Labels under `app.kubernetes.io/` and
    /// `serving.deepseek.dev/` are set by the operator and cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,

    /// Extra annotations on every engine pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Names of Secrets in this namespace used to pull the engine image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,

    /// Size of the in-memory `/dev/shm` of each engine pod, used by the collective-communication
    /// library between the GPUs of a pod.
    #[serde(default = "default_shm_size")]
    pub shared_memory_size: Quantity,

    /// The Service that clients send requests to.
    #[serde(default)]
    pub service: ServiceSpec,

    /// How a change to the pod template is rolled out over the groups.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// What happens to a group when one of its pods fails or restarts. `RecreateGroup`
    /// (default): delete and recreate every pod of the group, since the remaining ranks cannot
    /// continue without the lost one. `RecreateGroupAfterStart`: the same, but not while any pod
    /// of the group is still Pending (slow image pulls or model downloads). `None`: let the pod
    /// restart alone.
    #[serde(default)]
    pub group_failure_policy: GroupFailurePolicy,

    /// Publish the serving pods as a Gateway API Inference Extension `InferencePool`
    /// (`inference.networking.k8s.io/v1`), so that a gateway's endpoint picker (llm-d,
    /// kgateway, Istio) routes each request by the engines' KV-cache use and queue depth. The
    /// pool selects the same pods as the serving Service: the leader (rank 0) pod of every
    /// group that is not draining, on the engine's HTTP port. The InferencePool CRD must be
    /// installed; without it the operator reports `InferencePoolReady=False` and serves as
    /// usual. Unset: no InferencePool (one made earlier is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_pool: Option<InferencePoolSpec>,
}

/// The InferencePool the operator keeps for this deployment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// Name of the InferencePool, which HTTPRoutes name in their `backendRefs`. Unset: the
    /// name of this DeepSeekDeployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("inferencePool.name must be a DNS label: lower-case letters, digits and '-', starting and ending with a letter or digit").reason(Reason::FieldValueInvalid))]
    #[schemars(length(min = 1, max = 63))]
    pub name: Option<String>,

    /// The endpoint picker (EPP) that chooses a pod of the pool for each request.
    pub endpoint_picker: EndpointPickerSpec,
}

/// The endpoint picker the InferencePool refers to: a Service in this namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPickerSpec {
    /// Name of the endpoint picker's Service in this namespace.
    #[x_kube(validation = Rule::new("self.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("inferencePool.endpointPicker.name must be a Service name: lower-case letters, digits and '-', starting with a letter").reason(Reason::FieldValueInvalid))]
    #[schemars(length(min = 1, max = 63))]
    pub name: String,

    /// Port of the endpoint picker's gRPC (Envoy ext-proc) service. 9002 is the port the
    /// upstream endpoint picker listens on.
    #[serde(default = "default_endpoint_picker_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// What the gateway does when the endpoint picker fails or does not answer: `FailClose`
    /// (default) refuses the request, `FailOpen` sends it to a pod of the pool chosen without
    /// the picker.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// What the gateway does when the endpoint picker is unavailable.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailureMode {
    FailOpen,
    #[default]
    FailClose,
}

/// Where the model weights come from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.source.matches('^(hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/].*)?|s3://[a-z0-9][a-z0-9.-]+[a-z0-9](/.*)?|builtin://(tiny|mini)|/[^/].*)$')").message("model.source must be hf://ORG/NAME[@REVISION], pvc://CLAIM[/PATH], s3://BUCKET[/PREFIX], builtin://tiny, builtin://mini, or an absolute path on the node such as /data/models/deepseek").reason(Reason::FieldValueInvalid),
    validation = Rule::new("!has(self.credentialsSecret) || self.source.startsWith('hf://') || self.source.startsWith('s3://')").message("model.credentialsSecret is only used with hf:// and s3:// sources").reason(Reason::FieldValueForbidden),
)]
pub struct ModelSpec {
    /// Location of the model weights. One of: `hf://ORG/NAME@REVISION` (downloaded from the
    /// Hugging Face hub before the engine starts; pin a revision for reproducible rollouts),
    /// `pvc://CLAIM/PATH` (a PersistentVolumeClaim in this namespace, mounted read-only),
    /// `s3://BUCKET/PREFIX` (downloaded from S3 or an S3-compatible store before the engine
    /// starts), an absolute path such as `/data/models/DeepSeek-V3.2` (a directory on every node,
    /// mounted read-only), `builtin://mini` (the small trained model bundled in the engine image,
    /// which answers in English: CPU demos), or `builtin://tiny` (random weights generated by the
    /// engine: tests).
    #[schemars(length(min = 1, max = 1024))]
    pub source: String,

    /// Name of a Secret in this namespace whose keys are passed as environment variables to the
    /// download step: `HF_TOKEN` for hf:// sources; `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, and optionally `AWS_REGION` and `AWS_ENDPOINT_URL` for s3://.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub credentials_secret: Option<String>,

    /// Model name clients put in the `model` field of API requests. Unset: the last path
    /// segment of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub served_name: Option<String>,

    /// Size limit of the scratch volume that hf:// and s3:// sources are downloaded into. The
    /// download is repeated whenever a pod is recreated; use a pvc:// source to avoid that.
    #[serde(default = "default_download_size")]
    pub download_size_limit: Quantity,
}

/// The inference engine container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EngineSpec {
    /// Container image of the inference engine.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// When the kubelet pulls the image.
    #[serde(default)]
    pub image_pull_policy: PullPolicy,

    /// Arguments appended to the engine command line. The operator sets `--host`, `--port`,
    /// `--model`, `--max-model-len`, `--kv-cache-dtype`, `--max-num-seqs`,
    /// `--expert-parallel` and `--shutdown-grace-seconds` (which the pods' termination grace
    /// period is derived from) itself; those flags are refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub extra_args: Vec<String>,

    /// Extra environment variables for the engine container. Names the operator sets (`RANK`,
    /// `WORLD_SIZE`, `LEADER_ADDR`, ...) or sets through a flag (`SHUTDOWN_GRACE_SECONDS`)
    /// are refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,

    /// Longest sequence (prompt plus output tokens) the engine accepts.
    #[serde(default = "default_max_model_len")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_model_len: i64,

    /// Number format of the KV cache. `fp8` stores twice as many tokens as `bf16` in the same
    /// memory.
    #[serde(default)]
    pub kv_cache_dtype: KvCacheDtype,

    /// Most sequences one group decodes at the same time.
    #[serde(default = "default_max_num_seqs")]
    #[schemars(range(min = 1, max = 65536))]
    pub max_num_seqs: i32,

    /// Seconds an engine pod may take to load the model before it is restarted. Loading a
    /// 671B-parameter model from network storage can take tens of minutes.
    #[serde(default = "default_startup_timeout")]
    #[schemars(range(min = 30, max = 86400))]
    pub startup_timeout_seconds: i32,
}

/// When the kubelet pulls the engine image.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

/// Number format of the KV cache.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    #[default]
    Fp8,
    Bf16,
}

/// How one copy of the model is split over GPUs and pods.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.gpusPerPod == 0 || self.expertParallel % self.gpusPerPod == 0").message("parallelism.expertParallel must be a multiple of parallelism.gpusPerPod: a group has expertParallel / gpusPerPod pods").reason(Reason::FieldValueInvalid),
    validation = Rule::new("(self.gpusPerPod == 0 ? self.expertParallel : self.expertParallel / self.gpusPerPod) <= 64").message("a group may have at most 64 pods (parallelism.expertParallel / parallelism.gpusPerPod)").reason(Reason::FieldValueInvalid),
)]
pub struct ParallelismSpec {
    /// Expert-parallel ranks in one group, one per GPU. The model's routed experts are spread
    /// evenly over these ranks.
    #[serde(default = "default_expert_parallel")]
    #[schemars(range(min = 1, max = 1024))]
    pub expert_parallel: i32,

    /// GPUs (and so ranks) in each pod of a group. A group has `expertParallel / gpusPerPod`
    /// pods. 0 runs on CPU with one rank per pod and requests no GPUs (for demos and tests).
    #[serde(default = "default_gpus_per_pod")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_pod: i32,
}

/// Automatic scaling of the number of groups.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.minReplicas <= self.maxReplicas").message("autoscaling.minReplicas must not be greater than autoscaling.maxReplicas").reason(Reason::FieldValueInvalid),
    validation = Rule::new("self.metricsTimeoutSeconds <= self.pollIntervalSeconds").message("autoscaling.metricsTimeoutSeconds must not be greater than autoscaling.pollIntervalSeconds").reason(Reason::FieldValueInvalid),
)]
pub struct AutoscalingSpec {
    /// Let the operator choose the number of groups from their KV-cache use and queue depth,
    /// between `minReplicas` and `maxReplicas`. The choice is written to
    /// `status.desiredReplicas`; `replicas` keeps the value written in the manifest and is only
    /// the starting point. Leave false to set `replicas` by hand or from an external autoscaler
    /// (HPA, KEDA) through the scale subresource.
    #[serde(default)]
    pub enabled: bool,

    /// Fewest groups the autoscaler keeps. 0 allows scaling to zero, but with no group running
    /// there is nothing to measure, so the autoscaler only starts groups again when
    /// `minReplicas` is raised.
    #[serde(default = "default_min_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub min_replicas: i32,

    /// Most groups the autoscaler starts.
    #[serde(default = "default_max_replicas")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_replicas: i32,

    /// Mean KV-cache use of the ready groups (0 to 1, on each group leader the fullest rank's,
    /// `deepseek_engine_kv_cache_fullest_partition_usage_perc`, or `vllm:kv_cache_usage_perc`
    /// from an engine without it) that the autoscaler aims for. Groups needed: ceil(ready
    /// groups x mean / target).
    #[serde(default = "default_target_kv")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub target_kv_cache_utilization: f64,

    /// Mean projected KV-cache use of the ready groups that the autoscaler aims for: blocks in
    /// use plus the blocks running requests still need to reach their max_tokens, over all
    /// blocks (`deepseek_engine_kv_cache_projected_usage_perc`; may exceed 1). It rises as soon
    /// as long generations are admitted, before the plain KV-cache use does.
    #[serde(default = "default_target_projected_kv")]
    #[schemars(range(min = 0.05, max = 4.0))]
    pub target_projected_kv_cache_utilization: f64,

    /// Mean waiting requests per ready group (`vllm:num_requests_waiting` on each group leader)
    /// that the autoscaler aims for.
    #[serde(default = "default_target_queue")]
    #[schemars(range(min = 1, max = 100000))]
    pub target_queue_depth: i32,

    /// Ratios of mean to target within 1 +/- tolerance change nothing, so that small swings do
    /// not move whole groups.
    #[serde(default = "default_tolerance")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub tolerance: f64,

    /// Most groups added in one step. 0: at most double the count (and at least one group).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub max_scale_up_step: i32,

    /// Seconds over which the lowest recommendation bounds a scale-up. 0 scales up at once.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,

    /// Seconds during which every recommendation must be below the current count before a
    /// group is removed (then one group at a time). Starting a group means loading the model
    /// again, so this is long by default.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: i32,

    /// Seconds between two reads of the groups' metrics.
    #[serde(default = "default_poll_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub poll_interval_seconds: i32,

    /// Seconds one read of metrics may take; a group that does not answer in time counts as
    /// having no data, which never lowers the count.
    #[serde(default = "default_metrics_timeout")]
    #[schemars(range(min = 1, max = 60))]
    pub metrics_timeout_seconds: i32,

    /// Seconds a group taken out of the Service may take to finish its running requests before
    /// it is deleted anyway. Applies to the built-in autoscaler's scale-ins and to scale-ins
    /// from outside (a lower `spec.replicas`).
    #[serde(default = "default_drain_timeout")]
    #[schemars(range(min = 0, max = 86400))]
    pub drain_timeout_seconds: i32,

    /// Read the metrics from a Prometheus server instead of each group leader's `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusSpec>,
}

/// A Prometheus server the autoscaler queries for the groups' metrics.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PrometheusSpec {
    /// Base URL of the Prometheus HTTP API, for example
    /// `http://prometheus-operated.monitoring.svc:9090`. Plain HTTP only.
    #[x_kube(validation = Rule::new("self.matches('^http://[^/?#]+(/.*)?$')").message("autoscaling.prometheus.url must be an http:// URL").reason(Reason::FieldValueInvalid))]
    #[schemars(length(min = 8, max = 2048))]
    pub url: String,

    /// Query for the KV-cache use of each group leader. It must return one series per leader
    /// pod with a `pod` label. `$namespace` and `$name` are replaced by the namespace and the
    /// deployment name. Unset: `max by (pod)
    /// (deepseek_engine_kv_cache_fullest_partition_usage_perc{namespace="$namespace",pod=~"$name-g[0-9]+-0"}
    /// or vllm:kv_cache_usage_perc{...})`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub kv_cache_usage_query: Option<String>,

    /// Query for the projected KV-cache use of each group leader, as for `kvCacheUsageQuery`.
    /// Unset: `max by (pod) (deepseek_engine_kv_cache_projected_usage_perc{...})`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub projected_kv_cache_usage_query: Option<String>,

    /// Query for the waiting requests of each group leader, as for `kvCacheUsageQuery`.
    /// Unset: `sum by (pod) (vllm:num_requests_waiting{...})`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub requests_waiting_query: Option<String>,

    /// Query for the running requests of each group leader, as for `kvCacheUsageQuery`.
    /// Unset: `sum by (pod) (vllm:num_requests_running{...})`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub requests_running_query: Option<String>,
}

/// The Service that clients send requests to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Kind of Service: `ClusterIP` (inside the cluster only), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,

    /// Port of the Service. Requests go to the engine's `http` port (8000) on the leader pod of
    /// a ready group.
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Extra annotations on the Service, for example for a cloud load balancer.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kind of Service.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// How a change to the pod template is rolled out.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Most groups that may be unavailable at once during a rollout. Groups are restarted whole,
    /// lowest index first, and the next one starts only when the count of unready groups allows.
    #[serde(default = "default_max_unavailable")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_unavailable: i32,
}

/// What happens to a group when one of its pods fails or restarts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GroupFailurePolicy {
    #[default]
    RecreateGroup,
    RecreateGroupAfterStart,
    None,
}

fn default_replicas() -> i32 {
    1
}
fn default_shm_size() -> Quantity {
    Quantity("16Gi".into())
}
fn default_download_size() -> Quantity {
    Quantity("1500Gi".into())
}
/// Image used when `engine.image` is not set.
pub const DEFAULT_IMAGE: &str = "ghcr.io/deepseek-serving/deepseek-engine:0.1.0";
fn default_image() -> String {
    DEFAULT_IMAGE.into()
}
fn default_max_model_len() -> i64 {
    131072
}
fn default_max_num_seqs() -> i32 {
    256
}
fn default_startup_timeout() -> i32 {
    3600
}
fn default_expert_parallel() -> i32 {
    8
}
fn default_gpus_per_pod() -> i32 {
    8
}
fn default_min_replicas() -> i32 {
    1
}
fn default_max_replicas() -> i32 {
    1
}
fn default_target_kv() -> f64 {
    0.8
}
fn default_target_queue() -> i32 {
    4
}
fn default_target_projected_kv() -> f64 {
    0.9
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_poll_interval() -> i32 {
    15
}
fn default_metrics_timeout() -> i32 {
    5
}
fn default_drain_timeout() -> i32 {
    600
}
fn default_scale_down_stabilization() -> i32 {
    300
}
fn default_service_port() -> i32 {
    8000
}
fn default_max_unavailable() -> i32 {
    1
}
/// The port the upstream endpoint picker serves its gRPC ext-proc API on.
pub const DEFAULT_ENDPOINT_PICKER_PORT: i32 = 9002;
fn default_endpoint_picker_port() -> i32 {
    DEFAULT_ENDPOINT_PICKER_PORT
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self {
            image: default_image(),
            image_pull_policy: PullPolicy::default(),
            extra_args: Vec::new(),
            env: Vec::new(),
            max_model_len: default_max_model_len(),
            kv_cache_dtype: KvCacheDtype::default(),
            max_num_seqs: default_max_num_seqs(),
            startup_timeout_seconds: default_startup_timeout(),
        }
    }
}

impl Default for ParallelismSpec {
    fn default() -> Self {
        Self {
            expert_parallel: default_expert_parallel(),
            gpus_per_pod: default_gpus_per_pod(),
        }
    }
}

impl ParallelismSpec {
    /// Ranks each pod runs: one per GPU, or a single CPU rank when no GPUs are requested.
    pub fn ranks_per_pod(&self) -> i32 {
        self.gpus_per_pod.max(1)
    }

    /// Pods in one group. Only meaningful for a spec that passed validation.
    pub fn pods_per_group(&self) -> i32 {
        (self.expert_parallel / self.ranks_per_pod()).max(1)
    }
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            min_replicas: default_min_replicas(),
            max_replicas: default_max_replicas(),
            target_kv_cache_utilization: default_target_kv(),
            target_projected_kv_cache_utilization: default_target_projected_kv(),
            target_queue_depth: default_target_queue(),
            tolerance: default_tolerance(),
            max_scale_up_step: 0,
            scale_up_stabilization_seconds: 0,
            scale_down_stabilization_seconds: default_scale_down_stabilization(),
            poll_interval_seconds: default_poll_interval(),
            metrics_timeout_seconds: default_metrics_timeout(),
            drain_timeout_seconds: default_drain_timeout(),
            prometheus: None,
        }
    }
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: ServiceType::default(),
            port: default_service_port(),
            annotations: BTreeMap::new(),
        }
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_unavailable: default_max_unavailable(),
        }
    }
}

impl PullPolicy {
    /// The value Kubernetes expects in `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

impl KvCacheDtype {
    /// The value the engine expects after `--kv-cache-dtype`.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheDtype::Fp8 => "fp8",
            KvCacheDtype::Bf16 => "bf16",
        }
    }
}

impl FailureMode {
    /// The value the InferencePool API expects in `endpointPickerRef.failureMode`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::FailOpen => "FailOpen",
            FailureMode::FailClose => "FailClose",
        }
    }
}

impl InferencePoolSpec {
    /// Name of the InferencePool of deployment `deployment`.
    pub fn pool_name(&self, deployment: &str) -> String {
        self.name.clone().unwrap_or_else(|| deployment.to_string())
    }
}

impl ServiceType {
    /// The value Kubernetes expects in a Service's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}
