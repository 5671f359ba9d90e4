//! Tests of rendering: every object, every model source, labels, owners and revisions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, EnvVar, PodSpec};

use super::*;
use crate::api::{DeepSeekDeployment, KvCacheDtype, ServiceType};

fn render(dsd: &DeepSeekDeployment) -> Desired {
    desired(dsd).expect("renders")
}

fn pod_spec(d: &Desired, group: usize) -> PodSpec {
    d.groups[group]
        .statefulset
        .spec
        .template
        .spec
        .clone()
        .unwrap()
}

fn engine(d: &Desired, group: usize) -> Container {
    pod_spec(d, group).containers[0].clone()
}

fn env(c: &Container) -> BTreeMap<String, EnvVar> {
    c.env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name.clone(), e))
        .collect()
}

fn value(c: &Container, name: &str) -> String {
    env(c)[name]
        .value
        .clone()
        .unwrap_or_else(|| panic!("{name} has no value"))
}

fn arg_after(c: &Container, flag: &str) -> String {
    let args = c.args.clone().unwrap();
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing"));
    args[i + 1].clone()
}

#[test]
fn one_statefulset_headless_service_and_budget_per_group() {
    let d = render(&DeepSeekDeployment::full().with_replicas(3));
    let names: Vec<String> = d
        .groups
        .iter()
        .map(|g| g.statefulset.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["v32-g0", "v32-g1", "v32-g2"]);
    for g in &d.groups {
        let name = g.statefulset.metadata.name.clone();
        assert_eq!(g.service.metadata.name, name);
        assert_eq!(g.pdb.metadata.name, name);
        assert_eq!(
            g.statefulset.spec.service_name, name,
            "pods get DNS through the headless Service"
        );
    }
    assert_eq!(d.service.metadata.name.as_deref(), Some("v32"));
    assert_eq!(d.config_map.metadata.name.as_deref(), Some("v32-engine"));
}

#[test]
fn zero_replicas_renders_no_groups_but_keeps_the_service_and_config() {
    let d = render(&DeepSeekDeployment::test().with_replicas(0));
    assert!(d.groups.is_empty());
    assert_eq!(d.service.metadata.name.as_deref(), Some("tiny"));
}

#[test]
fn a_group_starts_all_its_pods_at_once_and_only_the_operator_replaces_them() {
    let d = render(&DeepSeekDeployment::full());
    let spec = &d.groups[0].statefulset.spec;
    assert_eq!(spec.replicas, Some(2), "EP 16 over 8 GPUs per pod");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        spec.update_strategy.as_ref().unwrap().type_.as_deref(),
        Some("OnDelete")
    );
}

#[test]
fn ranks_find_the_leader_through_the_group_headless_service() {
    let d = render(&DeepSeekDeployment::full().with_replicas(2));
    let c = engine(&d, 1);
    assert_eq!(
        value(&c, "LEADER_ADDR"),
        "v32-g1-0.v32-g1.serving.svc:29500"
    );
    assert_eq!(value(&c, "WORLD_SIZE"), "2");
    assert_eq!(value(&c, "LOCAL_WORLD_SIZE"), "8");
    assert_eq!(value(&c, "EXPERT_PARALLEL"), "16");
    assert_eq!(value(&c, "GROUP_INDEX"), "1");
    let rank = env(&c)["RANK"]
        .value_from
        .clone()
        .unwrap()
        .field_ref
        .unwrap();
    assert_eq!(
        rank.field_path, "metadata.labels['apps.kubernetes.io/pod-index']",
        "rank is the pod ordinal"
    );
    let svc = d.groups[1].service.spec.clone().unwrap();
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
    assert_eq!(
        svc.publish_not_ready_addresses,
        Some(true),
        "ranks must resolve rank 0 before it is ready"
    );
    let ports: Vec<i32> = svc.ports.unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, [8000, 29500]);
}

#[test]
fn the_engine_command_line_follows_the_spec() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.engine.max_model_len = 65536;
    dsd.spec.engine.kv_cache_dtype = KvCacheDtype::Bf16;
    dsd.spec.engine.max_num_seqs = 128;
    dsd.spec.engine.extra_args = vec!["--enable-mtp".into()];
    let c = engine(&render(&dsd), 0);
    assert_eq!(c.command.clone().unwrap(), ["deepseek-engine"]);
    let args = c.args.clone().unwrap();
    assert_eq!(args[0], "serve");
    assert_eq!(arg_after(&c, "--host"), "0.0.0.0");
    assert_eq!(arg_after(&c, "--port"), "8000");
    assert_eq!(arg_after(&c, "--model"), "/models");
    assert_eq!(arg_after(&c, "--max-model-len"), "65536");
    assert_eq!(arg_after(&c, "--kv-cache-dtype"), "bf16");
    assert_eq!(arg_after(&c, "--max-num-seqs"), "128");
    assert_eq!(arg_after(&c, "--expert-parallel"), "16");
    assert_eq!(arg_after(&c, "--shutdown-grace-seconds"), "30");
    assert_eq!(args.last().unwrap(), "--enable-mtp", "extra args come last");
}

#[test]
fn the_kubelet_waits_past_the_engines_drain_before_killing_it() {
    let d = render(&DeepSeekDeployment::full());
    let grace: i64 = arg_after(&engine(&d, 0), "--shutdown-grace-seconds")
        .parse()
        .unwrap();
    let termination = pod_spec(&d, 0).termination_grace_period_seconds.unwrap();
    assert_eq!(grace, SHUTDOWN_GRACE_SECONDS);
    assert_eq!(
        termination,
        grace + SHUTDOWN_MARGIN_SECONDS,
        "SIGKILL comes only after the drain and a margin"
    );
    // Past the grace the engine flushes failed streams (5 s) and closes its group (group
    // timeout, 10 s by default, plus 5 s).
    let engine_bound_after_grace = 5 + 10 + 5;
    assert!(
        termination - grace >= engine_bound_after_grace,
        "the engine's own bound after the grace"
    );
}

#[test]
fn a_broken_group_fails_liveness_well_within_a_minute_and_readiness_is_unchanged() {
    let c = engine(&render(&DeepSeekDeployment::full()), 0);
    let live = c.liveness_probe.clone().unwrap();
    assert_eq!(live.http_get.unwrap().path.as_deref(), Some("/health"));
    let (period, failures, timeout) = (
        live.period_seconds.unwrap(),
        live.failure_threshold.unwrap(),
        live.timeout_seconds.unwrap(),
    );
    assert!(timeout <= period, "one probe at a time");
    // The engine's rank 0 turns /health to 503 at most 10 s (its default group timeout) after a
    // rank goes silent; the kubelet restarts it after `failures` failed probes in a row, the
    // first of them at most one period after the switch.
    let worst = 10 + period * failures;
    assert!(worst <= 30, "a broken group restarts after up to {worst} s");
    assert!(
        failures >= 3,
        "one slow /health answer under load does not restart a healthy engine"
    );
    let ready = c.readiness_probe.unwrap();
    assert_eq!(ready.http_get.unwrap().path.as_deref(), Some("/ready"));
    assert_eq!(
        (
            ready.period_seconds,
            ready.failure_threshold,
            ready.timeout_seconds
        ),
        (Some(5), Some(3), Some(3))
    );
}

#[test]
fn gpus_are_requested_and_limited_per_pod_and_not_at_all_on_cpu() {
    let c = engine(&render(&DeepSeekDeployment::full()), 0);
    let r = c.resources.unwrap();
    assert_eq!(r.limits.unwrap()["nvidia.com/gpu"].0, "8");
    assert_eq!(r.requests.unwrap()["nvidia.com/gpu"].0, "8");
    let cpu = engine(&render(&DeepSeekDeployment::test()), 0)
        .resources
        .unwrap();
    assert!(
        !cpu.limits
            .unwrap_or_default()
            .contains_key("nvidia.com/gpu")
    );
    assert!(
        !cpu.requests
            .unwrap_or_default()
            .contains_key("nvidia.com/gpu")
    );
}

#[test]
fn user_resources_are_kept_next_to_the_gpus() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.resources = Some(
        serde_json::from_value(serde_json::json!({"requests": {"memory": "1000Gi"}})).unwrap(),
    );
    let r = engine(&render(&dsd), 0).resources.unwrap();
    let req = r.requests.unwrap();
    assert_eq!(req["memory"].0, "1000Gi");
    assert_eq!(req["nvidia.com/gpu"].0, "8");
}

#[test]
fn probes_hit_health_for_liveness_and_ready_for_readiness_with_a_startup_budget() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.engine.startup_timeout_seconds = 1805;
    let c = engine(&render(&dsd), 0);
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.clone().unwrap().http_get.unwrap().path.unwrap()
    };
    assert_eq!(path(&c.liveness_probe), "/health");
    assert_eq!(path(&c.readiness_probe), "/ready");
    assert_eq!(path(&c.startup_probe), "/health");
    let s = c.startup_probe.unwrap();
    assert_eq!(
        s.period_seconds.unwrap() * s.failure_threshold.unwrap(),
        1810,
        "rounded up to whole periods"
    );
    let ports: Vec<(String, i32)> = c
        .ports
        .unwrap()
        .into_iter()
        .map(|p| (p.name.unwrap(), p.container_port))
        .collect();
    assert_eq!(ports, [("http".into(), 8000), ("rank".into(), 29500)]);
}

#[test]
fn dev_shm_is_memory_backed_and_sized_from_the_spec() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.shared_memory_size =
        k8s_openapi::apimachinery::pkg::api::resource::Quantity("64Gi".into());
    let d = render(&dsd);
    let vols = pod_spec(&d, 0).volumes.unwrap();
    let shm = vols
        .iter()
        .find(|v| v.name == "dshm")
        .unwrap()
        .empty_dir
        .clone()
        .unwrap();
    assert_eq!(shm.medium.as_deref(), Some("Memory"));
    assert_eq!(shm.size_limit.unwrap().0, "64Gi");
    let mounts = engine(&d, 0).volume_mounts.unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "dshm" && m.mount_path == "/dev/shm")
    );
}

#[test]
fn a_hub_model_is_downloaded_by_an_init_container_with_the_credentials() {
    let d = render(&DeepSeekDeployment::full());
    let spec = pod_spec(&d, 0);
    let init = &spec.init_containers.unwrap()[0];
    assert_eq!(init.name, "model-download");
    assert_eq!(
        init.args.clone().unwrap(),
        [
            "download",
            "--source",
            "hf://deepseek-ai/DeepSeek-V3.2@main",
            "--dest",
            "/models"
        ]
    );
    let from = init.env_from.clone().unwrap()[0]
        .secret_ref
        .clone()
        .unwrap();
    assert_eq!(from.name, "hf-token");
    let vol = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "model")
        .unwrap();
    assert!(vol.empty_dir.is_some());
    let mount = engine(&d, 0)
        .volume_mounts
        .unwrap()
        .into_iter()
        .find(|m| m.name == "model")
        .unwrap();
    assert_eq!(
        mount.read_only,
        Some(true),
        "the engine only reads the weights"
    );
}

#[test]
fn an_s3_model_is_downloaded_the_same_way() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.model.source = "s3://models/deepseek/v32".into();
    dsd.spec.model.credentials_secret = Some("s3-credentials".into());
    let d = render(&dsd);
    let spec = pod_spec(&d, 0);
    let init = &spec.init_containers.clone().unwrap()[0];
    assert_eq!(init.name, "model-download");
    assert_eq!(
        init.image,
        engine(&d, 0).image,
        "the engine image downloads"
    );
    assert_eq!(init.command.clone().unwrap(), ["deepseek-engine"]);
    assert_eq!(
        init.args.clone().unwrap(),
        [
            "download",
            "--source",
            "s3://models/deepseek/v32",
            "--dest",
            "/models"
        ]
    );
    // Every key of the Secret becomes an env var of the same name, unprefixed: the engine
    // reads AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_ENDPOINT_URL.
    let from = init.env_from.clone().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(from[0].prefix, None);
    let secret = from[0].secret_ref.clone().unwrap();
    assert_eq!(secret.name, "s3-credentials");
    assert_eq!(
        secret.optional,
        Some(false),
        "a missing Secret stops the pod"
    );
    assert!(init.env.is_none(), "nothing overrides the Secret's keys");
    let mount = init.volume_mounts.clone().unwrap();
    assert_eq!(mount[0].mount_path, "/models");
    assert_ne!(mount[0].read_only, Some(true), "the download writes");
    assert_eq!(arg_after(&engine(&d, 0), "--model"), "/models");
    assert_eq!(value(&engine(&d, 0), "SERVED_MODEL_NAME"), "v32");
}

#[test]
fn a_pvc_model_is_mounted_read_only_without_a_download() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.model.source = "pvc://weights/deepseek/V3.2".into();
    dsd.spec.model.credentials_secret = None;
    let d = render(&dsd);
    let spec = pod_spec(&d, 0);
    assert!(spec.init_containers.is_none());
    let pvc = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "model")
        .unwrap()
        .persistent_volume_claim
        .unwrap();
    assert_eq!(pvc.claim_name, "weights");
    assert_eq!(pvc.read_only, Some(true));
    assert_eq!(
        arg_after(&engine(&d, 0), "--model"),
        "/models/deepseek/V3.2"
    );
}

#[test]
fn a_node_path_model_uses_a_host_path_directory() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.model.source = "/data/models/V3.2".into();
    dsd.spec.model.credentials_secret = None;
    let d = render(&dsd);
    let hp = pod_spec(&d, 0)
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "model")
        .unwrap()
        .host_path
        .unwrap();
    assert_eq!(hp.path, "/data/models/V3.2");
    assert_eq!(hp.type_.as_deref(), Some("Directory"));
    assert_eq!(arg_after(&engine(&d, 0), "--model"), "/models");
}

#[test]
fn the_builtin_demo_model_needs_no_volume_and_no_gpu() {
    let d = render(&DeepSeekDeployment::test());
    let spec = pod_spec(&d, 0);
    assert!(spec.init_containers.is_none());
    assert!(spec.volumes.unwrap().iter().all(|v| v.name != "model"));
    assert_eq!(arg_after(&engine(&d, 0), "--model"), "builtin://tiny");
    assert_eq!(
        d.groups[0].statefulset.spec.replicas,
        Some(2),
        "EP 2 on CPU is two one-rank pods"
    );
}

#[test]
fn the_bundled_trained_model_is_served_by_its_engine_name_with_no_volume() {
    let mut dsd = DeepSeekDeployment::test();
    dsd.spec.model.source = "builtin://mini".into();
    let d = render(&dsd);
    let spec = pod_spec(&d, 0);
    assert!(spec.init_containers.is_none());
    assert!(spec.volumes.unwrap().iter().all(|v| v.name != "model"));
    let c = engine(&d, 0);
    assert_eq!(arg_after(&c, "--model"), "deepseek-v3.2-mini");
    assert_eq!(
        env(&c)["SERVED_MODEL_NAME"].value.as_deref(),
        Some("deepseek-v3.2-mini")
    );
}

#[test]
fn every_object_is_owned_by_the_deployment_and_labelled() {
    let dsd = DeepSeekDeployment::full().with_replicas(2);
    let d = render(&dsd);
    let mut metas = vec![d.config_map.metadata.clone(), d.service.metadata.clone()];
    for g in &d.groups {
        metas.extend([
            g.statefulset.metadata.clone(),
            g.service.metadata.clone(),
            g.pdb.metadata.clone(),
        ]);
    }
    for m in metas {
        let owners = m.owner_references.clone().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "DeepSeekDeployment");
        assert_eq!(owners[0].name, "v32");
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(m.namespace.as_deref(), Some("serving"));
        let l = m.labels.clone().unwrap();
        assert_eq!(l[INSTANCE_LABEL], "v32");
        assert_eq!(l[NAME_LABEL], APP_NAME);
        assert_eq!(l[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(l[PART_OF_LABEL], PART_OF);
        assert!(l.contains_key(COMPONENT_LABEL));
        assert!(
            hash::applied_hash_of(&m).is_some(),
            "{:?} has no applied hash",
            m.name
        );
    }
}

#[test]
fn pods_carry_group_and_revision_labels_next_to_user_labels() {
    let mut dsd = DeepSeekDeployment::full().with_replicas(2);
    dsd.spec
        .pod_labels
        .insert("team".into(), "inference".into());
    dsd.spec
        .pod_annotations
        .insert("example.com/a".into(), "b".into());
    let d = render(&dsd);
    let meta = d.groups[1]
        .statefulset
        .spec
        .template
        .metadata
        .clone()
        .unwrap();
    let l = meta.labels.unwrap();
    assert_eq!(l["team"], "inference");
    assert_eq!(l[GROUP_LABEL], "1");
    assert_eq!(l[REVISION_LABEL], d.revision);
    assert_eq!(meta.annotations.unwrap()["example.com/a"], "b");
    let sel = d.groups[1]
        .statefulset
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap();
    assert!(
        sel.iter().all(|(k, v)| l.get(k) == Some(v)),
        "the selector matches the template"
    );
}

#[test]
fn the_serving_service_selects_rank_zero_of_every_group() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.service.type_ = ServiceType::LoadBalancer;
    dsd.spec.service.port = 80;
    dsd.spec
        .service
        .annotations
        .insert("lb.example.com/internal".into(), "true".into());
    let d = render(&dsd);
    let spec = d.service.spec.clone().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let sel = spec.selector.unwrap();
    assert_eq!(sel[RANK_LABEL], "0");
    assert_eq!(sel[INSTANCE_LABEL], "v32");
    assert!(!sel.contains_key(GROUP_LABEL), "all groups");
    let port = &spec.ports.unwrap()[0];
    assert_eq!(port.port, 80);
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("http".into()))
    );
    assert_eq!(
        d.service.metadata.annotations.unwrap()["lb.example.com/internal"],
        "true"
    );
    assert_eq!(
        leader_selector("v32"),
        "app.kubernetes.io/instance=v32,app.kubernetes.io/component=engine,apps.kubernetes.io/pod-index=0"
    );
}

#[test]
fn a_group_budget_forbids_evicting_a_healthy_group_but_not_a_broken_one() {
    let d = render(&DeepSeekDeployment::full());
    let spec = d.groups[0].pdb.spec.clone().unwrap();
    assert_eq!(
        spec.min_available,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(2))
    );
    assert_eq!(
        spec.unhealthy_pod_eviction_policy.as_deref(),
        Some("AlwaysAllow")
    );
    assert_eq!(
        spec.selector.unwrap().match_labels.unwrap()[GROUP_LABEL],
        "0"
    );
}

#[test]
fn the_config_map_holds_the_effective_engine_settings() {
    let d = render(&DeepSeekDeployment::full());
    let doc: serde_json::Value =
        serde_json::from_str(&d.config_map.data.clone().unwrap()[CONFIG_FILE]).unwrap();
    assert_eq!(doc["model"]["servedName"], "DeepSeek-V3.2");
    assert_eq!(doc["parallelism"]["podsPerGroup"], 2);
    assert_eq!(doc["engine"]["maxModelLen"], 131072);
    let c = engine(&d, 0);
    assert_eq!(
        value(&c, "DEEPSEEK_ENGINE_CONFIG"),
        "/etc/deepseek-engine/engine.json"
    );
    let spec = pod_spec(&d, 0);
    let cm = spec
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "config")
        .unwrap()
        .config_map
        .unwrap();
    assert_eq!(cm.name, "v32-engine");
}

#[test]
fn scheduling_settings_reach_the_pod() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.node_selector.insert("gpu".into(), "h200".into());
    dsd.spec.tolerations = vec![
        serde_json::from_value(serde_json::json!({"key": "nvidia.com/gpu", "operator": "Exists"}))
            .unwrap(),
    ];
    dsd.spec.priority_class_name = Some("high".into());
    dsd.spec.scheduler_name = Some("volcano".into());
    dsd.spec.service_account_name = Some("engine".into());
    dsd.spec.image_pull_secrets = vec!["regcred".into()];
    dsd.spec.topology_key = Some("kubernetes.io/hostname".into());
    let d = render(&dsd.with_replicas(2));
    let spec = pod_spec(&d, 1);
    assert_eq!(spec.node_selector.unwrap()["gpu"], "h200");
    assert_eq!(
        spec.tolerations.unwrap()[0].key.as_deref(),
        Some("nvidia.com/gpu")
    );
    assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
    assert_eq!(spec.scheduler_name.as_deref(), Some("volcano"));
    assert_eq!(spec.service_account_name.as_deref(), Some("engine"));
    assert_eq!(spec.image_pull_secrets.unwrap()[0].name, "regcred");
    let term = &spec
        .affinity
        .unwrap()
        .pod_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()[0];
    assert_eq!(term.topology_key, "kubernetes.io/hostname");
    assert_eq!(
        term.label_selector.clone().unwrap().match_labels.unwrap()[GROUP_LABEL],
        "1",
        "co-located with its own group only"
    );
}

#[test]
fn the_revision_is_the_same_for_every_group_and_changes_only_with_the_pod_template() {
    let base = DeepSeekDeployment::full().with_replicas(2);
    let d = render(&base);
    for g in &d.groups {
        assert_eq!(
            g.statefulset.metadata.annotations.clone().unwrap()[REVISION_ANNOTATION],
            d.revision
        );
    }
    assert_eq!(render(&base).revision, d.revision, "deterministic");
    assert_eq!(
        render(&base.clone().with_replicas(4)).revision,
        d.revision,
        "scaling is not a rollout"
    );
    let mut port = base.clone();
    port.spec.service.port = 9000;
    assert_eq!(
        render(&port).revision,
        d.revision,
        "the serving Service is not in the pod template"
    );
    let mut seqs = base.clone();
    seqs.spec.engine.max_num_seqs = 7;
    assert_ne!(render(&seqs).revision, d.revision);
    let mut image = base;
    image.spec.engine.image = "engine:2".into();
    assert_ne!(render(&image).revision, d.revision);
}

#[test]
fn an_invalid_spec_is_not_rendered() {
    let mut dsd = DeepSeekDeployment::full();
    dsd.spec.parallelism.expert_parallel = 12;
    match desired(&dsd) {
        Err(crate::Error::InvalidSpec(m)) => {
            assert!(m.contains("spec.parallelism.expertParallel"), "{m}")
        }
        other => panic!("{other:?}"),
    }
    let mut no_uid = DeepSeekDeployment::test();
    no_uid.metadata.uid = None;
    assert!(matches!(
        desired(&no_uid),
        Err(crate::Error::MissingField("metadata.uid"))
    ));
}

#[test]
fn the_applied_hash_changes_with_content_only() {
    let d = render(&DeepSeekDeployment::full());
    let mut sts = d.groups[0].statefulset.clone();
    let h = hash::applied_hash(&sts).unwrap().to_string();
    hash::stamp(&mut sts).unwrap();
    assert_eq!(
        hash::applied_hash(&sts).unwrap(),
        h,
        "stamping twice is stable"
    );
    sts.spec.replicas = Some(3);
    hash::stamp(&mut sts).unwrap();
    assert_ne!(hash::applied_hash(&sts).unwrap(), h);
    assert_eq!(hash::fnv1a_hex(b""), "cbf29ce484222325");
    assert_eq!(hash::fnv1a_hex(b"a"), "af63dc4c8601ec8c");
}

#[test]
fn engine_and_download_containers_meet_the_restricted_pod_security_standard() {
    for dsd in [DeepSeekDeployment::test(), DeepSeekDeployment::full()] {
        let d = render(&dsd);
        let pod = pod_spec(&d, 0);
        for c in pod
            .containers
            .iter()
            .chain(pod.init_containers.iter().flatten())
        {
            let sc = c
                .security_context
                .as_ref()
                .unwrap_or_else(|| panic!("{} has no securityContext", c.name));
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.run_as_non_root, Some(true), "{}", c.name);
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop,
                Some(vec!["ALL".to_string()]),
                "{}",
                c.name
            );
            assert_eq!(
                sc.seccomp_profile.as_ref().unwrap().type_,
                "RuntimeDefault",
                "{}",
                c.name
            );
        }
    }
}

fn with_pool(pool: serde_json::Value) -> DeepSeekDeployment {
    DeepSeekDeployment::test().edited(|s| {
        s.inference_pool = Some(serde_json::from_value(pool).expect("pool spec"));
    })
}

#[test]
fn no_inference_pool_is_rendered_without_the_field() {
    assert!(render(&DeepSeekDeployment::test()).inference_pool.is_none());
}

#[test]
fn the_inference_pool_selects_exactly_the_serving_services_pods_on_the_engine_port() {
    let d = render(&with_pool(
        serde_json::json!({"endpointPicker": {"name": "tiny-epp"}}),
    ));
    let pool = d.inference_pool.expect("pool rendered");
    let v = serde_json::to_value(&pool).unwrap();
    assert_eq!(v["apiVersion"], "inference.networking.k8s.io/v1");
    assert_eq!(v["kind"], "InferencePool");
    assert_eq!(
        v["metadata"]["name"], "tiny",
        "defaults to the deployment's name"
    );
    assert_eq!(v["metadata"]["namespace"], crate::fixtures::NS);
    let service_selector = serde_json::to_value(d.service.spec.unwrap().selector).unwrap();
    assert_eq!(v["spec"]["selector"]["matchLabels"], service_selector);
    assert_eq!(v["spec"]["selector"]["matchLabels"][RANK_LABEL], "0");
    assert_eq!(v["spec"]["selector"]["matchLabels"][SERVING_LABEL], "true");
    assert_eq!(
        v["spec"]["targetPorts"],
        serde_json::json!([{"number": HTTP_PORT}])
    );
    assert_eq!(
        v["spec"]["endpointPickerRef"],
        serde_json::json!({
            "kind": "Service", "name": "tiny-epp", "port": {"number": 9002},
            "failureMode": "FailClose",
        })
    );
    let owner = &pool.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("DeepSeekDeployment", "tiny", Some(true))
    );
    let labels = pool.metadata.labels.as_ref().unwrap();
    assert_eq!(labels[COMPONENT_LABEL], "inference-pool");
    assert_eq!(labels[INSTANCE_LABEL], "tiny");
    assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
    assert!(hash::applied_hash(&pool).is_some());
}

#[test]
fn a_named_pool_carries_its_name_port_and_failure_mode() {
    let d = render(&with_pool(serde_json::json!({
        "name": "deepseek",
        "endpointPicker": {"name": "epp", "port": 9100, "failureMode": "FailOpen"},
    })));
    let v = serde_json::to_value(d.inference_pool.unwrap()).unwrap();
    assert_eq!(v["metadata"]["name"], "deepseek");
    assert_eq!(v["spec"]["endpointPickerRef"]["port"]["number"], 9100);
    assert_eq!(v["spec"]["endpointPickerRef"]["failureMode"], "FailOpen");
}

#[test]
fn a_change_of_endpoint_picker_changes_the_pools_applied_hash_but_not_the_revision() {
    let a = render(&with_pool(
        serde_json::json!({"endpointPicker": {"name": "a"}}),
    ));
    let b = render(&with_pool(
        serde_json::json!({"endpointPicker": {"name": "b"}}),
    ));
    assert_ne!(
        hash::applied_hash(a.inference_pool.as_ref().unwrap()),
        hash::applied_hash(b.inference_pool.as_ref().unwrap())
    );
    assert_eq!(a.revision, b.revision, "the pool does not restart groups");
    assert_eq!(a.revision, render(&DeepSeekDeployment::test()).revision);
}
