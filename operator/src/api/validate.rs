//! Checks of a `DeepSeekDeployment` spec done inside the operator.
//!
//! The CRD's schema and CEL rules refuse most bad specs at `kubectl apply`. This module repeats
//! those cross-field rules (a resource created under an older CRD, or written by a client that
//! skips validation, still reaches the operator) and adds the checks the schema cannot express:
//! quantity syntax, flags and variables the operator owns, and the parsed model source. A failure
//! here becomes a `Degraded` condition and a Warning Event, never a crash.

use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::DeepSeekDeploymentSpec;

/// One reason a spec is refused, naming the field and the limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// JSON path of the offending field, such as `spec.parallelism.expertParallel`.
    pub field: String,
    /// What is wrong, written for the person who wrote the manifest.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Engine flags the operator sets itself.
pub const RESERVED_FLAGS: &[&str] = &[
    "--host",
    "--port",
    "--model",
    "--max-model-len",
    "--kv-cache-dtype",
    "--max-num-seqs",
    "--expert-parallel",
    "--shutdown-grace-seconds",
];

/// Environment variables the operator sets itself.
pub const RESERVED_ENV: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LEADER_ADDR",
    "GROUP_INDEX",
    "EXPERT_PARALLEL",
    "POD_NAME",
    "DEEPSEEK_ENGINE_CONFIG",
    // The engine reads it as --shutdown-grace-seconds, which the operator sets.
    "SHUTDOWN_GRACE_SECONDS",
];

/// Longest `metadata.name` allowed: pod names append `-g<group>-<rank>` and StatefulSet revision
/// labels another 11 characters, all within 63.
pub const MAX_NAME_LEN: usize = 40;

/// The engine's name for the trained model its image bundles (`builtin://mini`).
pub const BUNDLED_MINI_MODEL: &str = "deepseek-v3.2-mini";

/// Where the model weights come from, parsed from `spec.model.source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// `hf://org/name@revision`: downloaded before the engine starts.
    HuggingFace {
        /// Repository, `org/name`.
        repo: String,
        /// Branch, tag or commit; `None` means the default branch.
        revision: Option<String>,
    },
    /// `pvc://claim/path`: a claim in the namespace, mounted read-only.
    Pvc {
        /// Claim name.
        claim: String,
        /// Directory inside the claim, without a leading slash; may be empty.
        path: String,
    },
    /// `s3://bucket/prefix`: downloaded before the engine starts.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without a leading slash; may be empty.
        prefix: String,
    },
    /// An absolute directory on the node.
    HostPath(String),
    /// `builtin://tiny`: the engine's random-weight test model.
    BuiltinTiny,
    /// `builtin://mini`: the small trained model bundled in the engine image.
    BuiltinMini,
}

impl ModelSource {
    /// Parses a `spec.model.source` value.
    pub fn parse(source: &str) -> Result<Self, String> {
        const HINT: &str = "expected hf://ORG/NAME[@REVISION], pvc://CLAIM[/PATH], s3://BUCKET[/PREFIX], builtin://tiny, builtin://mini or an absolute node path";
        if let Some(rest) = source.strip_prefix("hf://") {
            let (repo, revision) = match rest.split_once('@') {
                Some((repo, rev)) if !rev.is_empty() => (repo, Some(rev.to_string())),
                Some(_) => return Err(format!("{source:?} has an empty revision after '@'")),
                None => (rest, None),
            };
            let parts: Vec<&str> = repo.split('/').collect();
            let ok = parts.len() == 2
                && parts.iter().all(|p| {
                    !p.is_empty()
                        && p.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                });
            if !ok {
                return Err(format!(
                    "{source:?} must name a repository as hf://ORG/NAME"
                ));
            }
            return Ok(ModelSource::HuggingFace {
                repo: repo.to_string(),
                revision,
            });
        }
        if let Some(rest) = source.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if !is_dns_label(claim) {
                return Err(format!(
                    "{source:?}: claim name {claim:?} is not a valid PersistentVolumeClaim name"
                ));
            }
            if path.split('/').any(|s| s == "..") {
                return Err(format!("{source:?}: the path must not contain '..'"));
            }
            return Ok(ModelSource::Pvc {
                claim: claim.to_string(),
                path: path.trim_matches('/').to_string(),
            });
        }
        if let Some(rest) = source.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let ok = bucket.len() >= 3
                && bucket.len() <= 63
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
            if !ok {
                return Err(format!(
                    "{source:?}: bucket {bucket:?} is not a valid bucket name"
                ));
            }
            return Ok(ModelSource::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if source == "builtin://tiny" {
            return Ok(ModelSource::BuiltinTiny);
        }
        if source == "builtin://mini" {
            return Ok(ModelSource::BuiltinMini);
        }
        if source.starts_with('/') && source.len() > 1 && !source.starts_with("//") {
            if source.split('/').any(|s| s == "..") {
                return Err(format!("{source:?}: the path must not contain '..'"));
            }
            return Ok(ModelSource::HostPath(source.to_string()));
        }
        Err(format!("{source:?} is not a model source: {HINT}"))
    }

    /// True for sources fetched by a download step before the engine starts.
    pub fn needs_download(&self) -> bool {
        matches!(
            self,
            ModelSource::HuggingFace { .. } | ModelSource::S3 { .. }
        )
    }

    /// The last path segment, used as the served model name when none is given.
    pub fn default_served_name(&self) -> String {
        let last = |s: &str| {
            s.rsplit('/')
                .find(|p| !p.is_empty())
                .unwrap_or("")
                .to_string()
        };
        let name = match self {
            ModelSource::HuggingFace { repo, .. } => last(repo),
            ModelSource::Pvc { claim, path } => {
                if path.is_empty() {
                    claim.clone()
                } else {
                    last(path)
                }
            }
            ModelSource::S3 { bucket, prefix } => {
                if prefix.is_empty() {
                    bucket.clone()
                } else {
                    last(prefix)
                }
            }
            ModelSource::HostPath(p) => last(p),
            ModelSource::BuiltinTiny => "tiny".into(),
            ModelSource::BuiltinMini => BUNDLED_MINI_MODEL.into(),
        };
        if name.is_empty() {
            "model".into()
        } else {
            name
        }
    }
}

/// True if `s` is an RFC 1123 label: lower-case alphanumerics and '-', at most 63 characters.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Parses a Kubernetes quantity such as `16Gi`, `1500G`, `0.5` or `1e3` into bytes (or units).
/// Returns `None` when the text is not a quantity.
pub fn parse_quantity(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    if num.is_empty() || num == "+" || num == "-" || num.matches('.').count() > 1 {
        return None;
    }
    if num[1..].contains(['+', '-']) {
        return None;
    }
    let value: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().ok()?;
            10f64.powi(exp)
        }
        _ => return None,
    };
    Some(value * mult)
}

/// Checks a spec (and the resource name) against every rule the operator relies on. Returns all
/// violations, so the user can fix them in one edit.
pub fn validate(name: &str, spec: &DeepSeekDeploymentSpec) -> Result<(), Vec<Violation>> {
    let mut v = Vec::new();
    let mut bad = |field: &str, message: String| {
        v.push(Violation {
            field: field.to_string(),
            message,
        })
    };

    if name.len() > MAX_NAME_LEN {
        bad(
            "metadata.name",
            format!(
                "must be at most {MAX_NAME_LEN} characters (is {}): pod names add a group index and a rank to it",
                name.len()
            ),
        );
    }

    // model
    match ModelSource::parse(&spec.model.source) {
        Ok(source) => {
            if spec.model.credentials_secret.is_some() && !source.needs_download() {
                bad(
                    "spec.model.credentialsSecret",
                    "is only used with hf:// and s3:// sources".into(),
                );
            }
        }
        Err(e) => bad("spec.model.source", e),
    }
    check_positive_quantity(
        &mut bad,
        "spec.model.downloadSizeLimit",
        &spec.model.download_size_limit,
    );

    // engine
    let e = &spec.engine;
    if e.image.trim().is_empty() {
        bad("spec.engine.image", "must not be empty".into());
    }
    if !(1..=1_048_576).contains(&e.max_model_len) {
        bad(
            "spec.engine.maxModelLen",
            format!("must be between 1 and 1048576 (is {})", e.max_model_len),
        );
    }
    if !(1..=65536).contains(&e.max_num_seqs) {
        bad(
            "spec.engine.maxNumSeqs",
            format!("must be between 1 and 65536 (is {})", e.max_num_seqs),
        );
    }
    if !(30..=86400).contains(&e.startup_timeout_seconds) {
        bad(
            "spec.engine.startupTimeoutSeconds",
            format!(
                "must be between 30 and 86400 (is {})",
                e.startup_timeout_seconds
            ),
        );
    }
    for (i, arg) in e.extra_args.iter().enumerate() {
        let flag = arg.split('=').next().unwrap_or(arg);
        if RESERVED_FLAGS.contains(&flag) {
            bad(
                &format!("spec.engine.extraArgs[{i}]"),
                format!("{flag} is set by the operator from the spec and cannot be passed here"),
            );
        }
    }
    for (i, env) in e.env.iter().enumerate() {
        if RESERVED_ENV.contains(&env.name.as_str()) {
            bad(
                &format!("spec.engine.env[{i}].name"),
                format!(
                    "{} is set by the operator and cannot be overridden",
                    env.name
                ),
            );
        }
    }

    // parallelism
    let p = &spec.parallelism;
    if !(1..=1024).contains(&p.expert_parallel) {
        bad(
            "spec.parallelism.expertParallel",
            format!("must be between 1 and 1024 (is {})", p.expert_parallel),
        );
    }
    if !(0..=16).contains(&p.gpus_per_pod) {
        bad(
            "spec.parallelism.gpusPerPod",
            format!("must be between 0 and 16 (is {})", p.gpus_per_pod),
        );
    } else if p.gpus_per_pod > 0 && p.expert_parallel % p.gpus_per_pod != 0 {
        bad(
            "spec.parallelism.expertParallel",
            format!(
                "must be a multiple of parallelism.gpusPerPod ({}): a group has expertParallel / gpusPerPod pods, but {} / {} is not whole",
                p.gpus_per_pod, p.expert_parallel, p.gpus_per_pod
            ),
        );
    } else if p.expert_parallel >= 1 && p.expert_parallel / p.ranks_per_pod() > 64 {
        bad(
            "spec.parallelism",
            format!(
                "a group may have at most 64 pods (expertParallel / gpusPerPod = {})",
                p.expert_parallel / p.ranks_per_pod()
            ),
        );
    }

    // replicas and autoscaling
    if !(0..=1000).contains(&spec.replicas) {
        bad(
            "spec.replicas",
            format!("must be between 0 and 1000 (is {})", spec.replicas),
        );
    }
    let a = &spec.autoscaling;
    if !(0..=1000).contains(&a.min_replicas) {
        bad(
            "spec.autoscaling.minReplicas",
            format!("must be between 0 and 1000 (is {})", a.min_replicas),
        );
    }
    if !(1..=1000).contains(&a.max_replicas) {
        bad(
            "spec.autoscaling.maxReplicas",
            format!("must be between 1 and 1000 (is {})", a.max_replicas),
        );
    }
    if a.min_replicas > a.max_replicas {
        bad(
            "spec.autoscaling.minReplicas",
            format!(
                "must not be greater than autoscaling.maxReplicas ({} > {})",
                a.min_replicas, a.max_replicas
            ),
        );
    }
    if !(0.05..=1.0).contains(&a.target_kv_cache_utilization) {
        bad(
            "spec.autoscaling.targetKvCacheUtilization",
            format!(
                "must be between 0.05 and 1.0 (is {})",
                a.target_kv_cache_utilization
            ),
        );
    }
    if !(1..=100_000).contains(&a.target_queue_depth) {
        bad(
            "spec.autoscaling.targetQueueDepth",
            format!("must be between 1 and 100000 (is {})", a.target_queue_depth),
        );
    }
    if !(0..=3600).contains(&a.scale_up_stabilization_seconds) {
        bad(
            "spec.autoscaling.scaleUpStabilizationSeconds",
            format!(
                "must be between 0 and 3600 (is {})",
                a.scale_up_stabilization_seconds
            ),
        );
    }
    if !(0..=86400).contains(&a.scale_down_stabilization_seconds) {
        bad(
            "spec.autoscaling.scaleDownStabilizationSeconds",
            format!(
                "must be between 0 and 86400 (is {})",
                a.scale_down_stabilization_seconds
            ),
        );
    }

    let ranges_f = [
        (
            "spec.autoscaling.targetProjectedKvCacheUtilization",
            a.target_projected_kv_cache_utilization,
            0.05,
            4.0,
        ),
        ("spec.autoscaling.tolerance", a.tolerance, 0.0, 1.0),
    ];
    for (field, v, lo, hi) in ranges_f {
        if !(lo..=hi).contains(&v) {
            bad(field, format!("must be between {lo} and {hi} (is {v})"));
        }
    }
    let ranges_i = [
        (
            "spec.autoscaling.maxScaleUpStep",
            a.max_scale_up_step,
            0,
            1000,
        ),
        (
            "spec.autoscaling.pollIntervalSeconds",
            a.poll_interval_seconds,
            1,
            3600,
        ),
        (
            "spec.autoscaling.metricsTimeoutSeconds",
            a.metrics_timeout_seconds,
            1,
            60,
        ),
        (
            "spec.autoscaling.drainTimeoutSeconds",
            a.drain_timeout_seconds,
            0,
            86400,
        ),
    ];
    for (field, v, lo, hi) in ranges_i {
        if !(lo..=hi).contains(&v) {
            bad(field, format!("must be between {lo} and {hi} (is {v})"));
        }
    }
    if a.metrics_timeout_seconds > a.poll_interval_seconds {
        bad(
            "spec.autoscaling.metricsTimeoutSeconds",
            format!(
                "must not be greater than autoscaling.pollIntervalSeconds ({} > {})",
                a.metrics_timeout_seconds, a.poll_interval_seconds
            ),
        );
    }
    if let Some(p) = &a.prometheus {
        let host = p.url.strip_prefix("http://").unwrap_or_default();
        let host = host.split(['/', '?', '#']).next().unwrap_or_default();
        if host.is_empty() {
            bad(
                "spec.autoscaling.prometheus.url",
                format!("must be an http:// URL (is {:?})", p.url),
            );
        }
    }

    // pod settings
    check_positive_quantity(&mut bad, "spec.sharedMemorySize", &spec.shared_memory_size);
    if let Some(res) = &spec.resources {
        let lists = [("limits", &res.limits), ("requests", &res.requests)];
        for (kind, list) in lists {
            for (k, q) in list.iter().flatten() {
                if k == GPU_RESOURCE {
                    bad(
                        &format!("spec.resources.{kind}"),
                        format!(
                            "{GPU_RESOURCE} is set from parallelism.gpusPerPod and cannot be given here"
                        ),
                    );
                } else if parse_quantity(q).is_none() {
                    bad(
                        &format!("spec.resources.{kind}.{k}"),
                        format!("{:?} is not a quantity such as 500m, 64Gi or 2", q.0),
                    );
                }
            }
        }
    }
    for k in spec.pod_labels.keys() {
        if is_reserved_key(k) {
            bad(
                "spec.podLabels",
                format!("label {k:?} is set by the operator and cannot be overridden"),
            );
        }
    }
    if let Some(key) = &spec.topology_key
        && key.trim().is_empty()
    {
        bad("spec.topologyKey", "must not be empty when set".into());
    }
    for (i, s) in spec.image_pull_secrets.iter().enumerate() {
        if s.is_empty() {
            bad(
                &format!("spec.imagePullSecrets[{i}]"),
                "must not be empty".into(),
            );
        }
    }

    // service and rollout
    if !(1..=65535).contains(&spec.service.port) {
        bad(
            "spec.service.port",
            format!("must be between 1 and 65535 (is {})", spec.service.port),
        );
    }
    if !(1..=1000).contains(&spec.rollout.max_unavailable) {
        bad(
            "spec.rollout.maxUnavailable",
            format!(
                "must be between 1 and 1000 (is {})",
                spec.rollout.max_unavailable
            ),
        );
    }

    // inference pool
    if let Some(pool) = &spec.inference_pool {
        if let Some(n) = &pool.name
            && !is_dns_label(n)
        {
            bad(
                "spec.inferencePool.name",
                format!(
                    "must be a DNS label: lower-case letters, digits and '-', at most 63 characters (is {n:?})"
                ),
            );
        }
        let epp = &pool.endpoint_picker;
        if !is_dns_label(&epp.name) || !epp.name.starts_with(|c: char| c.is_ascii_lowercase()) {
            bad(
                "spec.inferencePool.endpointPicker.name",
                format!(
                    "must be a Service name: lower-case letters, digits and '-', starting with a letter, at most 63 characters (is {:?})",
                    epp.name
                ),
            );
        }
        if !(1..=65535).contains(&epp.port) {
            bad(
                "spec.inferencePool.endpointPicker.port",
                format!("must be between 1 and 65535 (is {})", epp.port),
            );
        }
    }

    if v.is_empty() { Ok(()) } else { Err(v) }
}

/// The extended resource name of NVIDIA GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

/// True for label keys the operator owns.
pub fn is_reserved_key(k: &str) -> bool {
    k.starts_with("app.kubernetes.io/")
        || k.starts_with("serving.deepseek.dev/")
        || k.starts_with("apps.kubernetes.io/")
}

fn check_positive_quantity(bad: &mut impl FnMut(&str, String), field: &str, q: &Quantity) {
    match parse_quantity(q) {
        Some(x) if x > 0.0 => {}
        Some(_) => bad(field, format!("must be greater than zero (is {:?})", q.0)),
        None => bad(
            field,
            format!("{:?} is not a quantity such as 16Gi or 500M", q.0),
        ),
    }
}

/// Joins violations into one message for a condition or an Event.
pub fn summarize(violations: &[Violation]) -> String {
    violations
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
