//! The objects of one engine group: StatefulSet, pod template, headless Service, PDB.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, LocalObjectReference, ObjectFieldSelector, PodAffinity,
    PodAffinityTerm, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::ModelMount;
use super::{
    COMPONENT_ENGINE, CONFIG_DIR, CONFIG_FILE, GROUP_LABEL, HTTP_PORT, HTTP_PORT_NAME, Owner,
    RANK_LABEL, RANK_PORT, RANK_PORT_NAME, REVISION_ANNOTATION, REVISION_LABEL, SERVING_LABEL,
};
use crate::api::DeepSeekDeploymentSpec;
use crate::api::validate::{GPU_RESOURCE, is_reserved_key};

/// Name of the engine container.
pub const ENGINE_CONTAINER: &str = "engine";
/// Seconds between startup probes; the startup timeout is divided by it.
const STARTUP_PERIOD: i32 = 10;
/// Seconds the engine gets on SIGTERM to finish its running requests before it exits
/// (`--shutdown-grace-seconds`).
pub const SHUTDOWN_GRACE_SECONDS: i64 = 30;
/// What the kubelet waits past the engine's drain before it kills the container. When the
/// grace runs out the engine fails the requests still running, gives their streams up to 5 s
/// to flush, and then waits up to its group timeout (10 s by default) plus 5 s for the group
/// to close: 20 s at most.
pub const SHUTDOWN_MARGIN_SECONDS: i64 = 20;
/// Seconds between liveness probes of `/health`.
pub const LIVENESS_PERIOD: i32 = 5;
/// Failed liveness probes in a row that restart the container. Rank 0's `/health` fails once
/// a rank of its group is lost or silent past the engine's group timeout, so a broken group
/// is restarted (and, with `RecreateGroup`, recreated whole) about
/// `LIVENESS_PERIOD * LIVENESS_FAILURES` seconds after that.
pub const LIVENESS_FAILURES: i32 = 3;

/// The pod template of group `index`. With `revision` set, pods are labelled with it; the
/// revision itself is computed from the template of group 0 rendered without it.
pub fn group_pod_template(
    owner: &Owner,
    spec: &DeepSeekDeploymentSpec,
    mount: &ModelMount,
    index: i32,
    revision: Option<&str>,
) -> PodTemplateSpec {
    let mut labels: BTreeMap<String, String> = spec
        .pod_labels
        .iter()
        .filter(|(k, _)| !is_reserved_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.extend(owner.labels(COMPONENT_ENGINE));
    labels.extend(owner.group_selector(index));
    if let Some(rev) = revision {
        labels.insert(REVISION_LABEL.into(), rev.into());
        labels.insert(SERVING_LABEL.into(), "true".into());
    }
    let annotations = (!spec.pod_annotations.is_empty()).then(|| spec.pod_annotations.clone());

    let mut volumes = vec![
        Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(spec.shared_memory_size.clone()),
                ..EmptyDirVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: owner.config_map_name(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    volumes.extend(mount.volume.clone());

    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels),
            annotations,
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![engine_container(owner, spec, mount, index)],
            init_containers: mount.download.clone().map(|c| vec![c]),
            volumes: Some(volumes),
            affinity: affinity(owner, spec, index),
            node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            priority_class_name: spec.priority_class_name.clone(),
            scheduler_name: spec.scheduler_name.clone(),
            service_account_name: spec.service_account_name.clone(),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(
                SHUTDOWN_GRACE_SECONDS + SHUTDOWN_MARGIN_SECONDS,
            ),
            ..PodSpec::default()
        }),
    }
}

fn engine_container(
    owner: &Owner,
    spec: &DeepSeekDeploymentSpec,
    mount: &ModelMount,
    index: i32,
) -> Container {
    let p = &spec.parallelism;
    let e = &spec.engine;
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--host".into(),
        "0.0.0.0".into(),
        "--port".into(),
        HTTP_PORT.to_string(),
        "--model".into(),
        mount.model_arg.clone(),
        "--max-model-len".into(),
        e.max_model_len.to_string(),
        "--kv-cache-dtype".into(),
        e.kv_cache_dtype.as_str().into(),
        "--max-num-seqs".into(),
        e.max_num_seqs.to_string(),
        "--expert-parallel".into(),
        p.expert_parallel.to_string(),
        "--shutdown-grace-seconds".into(),
        SHUTDOWN_GRACE_SECONDS.to_string(),
    ];
    args.extend(e.extra_args.iter().cloned());

    let group = owner.group_name(index);
    let leader = format!("{group}-0.{group}.{}.svc:{RANK_PORT}", owner.namespace);
    let served = spec.model.served_name.clone().unwrap_or_else(|| {
        crate::api::validate::ModelSource::parse(&spec.model.source)
            .map(|s| s.default_served_name())
            .unwrap_or_else(|_| "model".into())
    });
    let mut env = vec![
        field_env("RANK", &format!("metadata.labels['{RANK_LABEL}']")),
        value_env("WORLD_SIZE", p.pods_per_group().to_string()),
        value_env("LOCAL_WORLD_SIZE", p.ranks_per_pod().to_string()),
        value_env("EXPERT_PARALLEL", p.expert_parallel.to_string()),
        value_env("LEADER_ADDR", leader),
        value_env("GROUP_INDEX", index.to_string()),
        field_env("POD_NAME", "metadata.name"),
        value_env("SERVED_MODEL_NAME", served),
        value_env(
            "DEEPSEEK_ENGINE_CONFIG",
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ),
    ];
    env.extend(e.env.iter().cloned());

    let mut mounts = vec![
        VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    mounts.extend(mount.mount.clone());

    Container {
        name: ENGINE_CONTAINER.into(),
        image: Some(e.image.clone()),
        image_pull_policy: Some(e.image_pull_policy.as_str().into()),
        command: Some(vec!["deepseek-engine".into()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            ContainerPort {
                name: Some(HTTP_PORT_NAME.into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some(RANK_PORT_NAME.into()),
                container_port: RANK_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        resources: Some(resources(spec)),
        startup_probe: Some(Probe {
            period_seconds: Some(STARTUP_PERIOD),
            failure_threshold: Some(
                (e.startup_timeout_seconds + STARTUP_PERIOD - 1) / STARTUP_PERIOD,
            ),
            ..http_probe("/health", 5)
        }),
        liveness_probe: Some(Probe {
            period_seconds: Some(LIVENESS_PERIOD),
            failure_threshold: Some(LIVENESS_FAILURES),
            ..http_probe("/health", 5)
        }),
        readiness_probe: Some(Probe {
            period_seconds: Some(5),
            failure_threshold: Some(3),
            ..http_probe("/ready", 3)
        }),
        volume_mounts: Some(mounts),
        security_context: Some(restricted_security_context()),
        ..Container::default()
    }
}

/// What the `restricted` Pod Security Standard asks of a container; the engine image runs as
/// an unprivileged user and needs no capabilities (GPUs come through the device plugin).
pub fn restricted_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

fn http_probe(path: &str, timeout: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String(HTTP_PORT_NAME.into()),
            scheme: Some("HTTP".into()),
            ..HTTPGetAction::default()
        }),
        timeout_seconds: Some(timeout),
        ..Probe::default()
    }
}

fn value_env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// The user's resources plus `nvidia.com/gpu: gpusPerPod` as request and limit.
fn resources(spec: &DeepSeekDeploymentSpec) -> ResourceRequirements {
    let mut r = spec.resources.clone().unwrap_or_default();
    let gpus = spec.parallelism.gpus_per_pod;
    if gpus > 0 {
        let q = Quantity(gpus.to_string());
        r.limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), q.clone());
        r.requests
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), q);
    }
    r
}

/// The user's affinity plus, when `topologyKey` is set, a required pod affinity to the other
/// pods of the same group (the first pod of a group may go anywhere; the rest follow it).
fn affinity(owner: &Owner, spec: &DeepSeekDeploymentSpec, index: i32) -> Option<Affinity> {
    let mut affinity = spec.affinity.clone();
    if let Some(key) = &spec.topology_key {
        let a = affinity.get_or_insert_with(Affinity::default);
        let pa = a.pod_affinity.get_or_insert_with(PodAffinity::default);
        pa.required_during_scheduling_ignored_during_execution
            .get_or_insert_with(Vec::new)
            .push(PodAffinityTerm {
                label_selector: Some(LabelSelector {
                    match_labels: Some(owner.group_selector(index)),
                    match_expressions: None,
                }),
                topology_key: key.clone(),
                ..PodAffinityTerm::default()
            });
    }
    affinity
}

/// The StatefulSet of group `index`: one pod per rank, all started at once, replaced only when
/// the operator deletes them (so a group never runs two templates).
pub fn statefulset(
    owner: &Owner,
    spec: &DeepSeekDeploymentSpec,
    index: i32,
    template: PodTemplateSpec,
    revision: &str,
) -> StatefulSet {
    let mut labels = owner.labels(COMPONENT_ENGINE);
    labels.insert(GROUP_LABEL.into(), index.to_string());
    let mut meta = owner.meta(owner.group_name(index), labels);
    meta.annotations = Some(BTreeMap::from([(
        REVISION_ANNOTATION.to_string(),
        revision.to_string(),
    )]));
    StatefulSet {
        metadata: meta,
        spec: StatefulSetSpec {
            replicas: Some(spec.parallelism.pods_per_group()),
            service_name: Some(owner.group_name(index)),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                rolling_update: None,
            }),
            revision_history_limit: Some(2),
            selector: LabelSelector {
                match_labels: Some(owner.group_selector(index)),
                match_expressions: None,
            },
            template,
            ..StatefulSetSpec::default()
        },
        status: None,
    }
}

/// The headless Service of group `index`. It publishes not-ready pods too, because ranks must
/// find rank 0 before any of them is ready.
pub fn headless_service(owner: &Owner, index: i32) -> Service {
    let mut labels = owner.labels(COMPONENT_ENGINE);
    labels.insert(GROUP_LABEL.into(), index.to_string());
    Service {
        metadata: owner.meta(owner.group_name(index), labels),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(owner.group_selector(index)),
            ports: Some(vec![
                ServicePort {
                    name: Some(HTTP_PORT_NAME.into()),
                    port: HTTP_PORT,
                    target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some(RANK_PORT_NAME.into()),
                    port: RANK_PORT,
                    target_port: Some(IntOrString::String(RANK_PORT_NAME.into())),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The PDB of group `index`: no voluntary eviction of a healthy group's pods (losing one rank
/// stops the whole group); pods of an unhealthy group may always be evicted, so node drains are
/// not blocked by a group that is down anyway.
pub fn pod_disruption_budget(
    owner: &Owner,
    spec: &DeepSeekDeploymentSpec,
    index: i32,
) -> PodDisruptionBudget {
    let mut labels = owner.labels(COMPONENT_ENGINE);
    labels.insert(GROUP_LABEL.into(), index.to_string());
    PodDisruptionBudget {
        metadata: owner.meta(owner.group_name(index), labels),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(spec.parallelism.pods_per_group())),
            selector: Some(LabelSelector {
                match_labels: Some(owner.group_selector(index)),
                match_expressions: None,
            }),
            unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}
