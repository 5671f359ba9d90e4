//! Tests of the API: the generated CRD, its schema, the examples, and refusals of bad specs.

use std::path::PathBuf;

use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::schema_check::{crd_schema, untyped_nodes, validate_object};
use super::validate::{ModelSource, validate};
use super::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn minimal() -> Value {
    json!({
        "apiVersion": "serving.deepseek.dev/v1alpha1",
        "kind": "DeepSeekDeployment",
        "metadata": { "name": "m", "namespace": "ns" },
        "spec": { "model": { "source": "pvc://weights/deepseek-v3.2" } },
    })
}

fn with(mut obj: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer");
    let mut cur = &mut obj;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        if cur.get(part).is_none() {
            cur[part] = json!({});
        }
        cur = cur.get_mut(part).expect("path");
    }
    if value.is_null() {
        cur.as_object_mut().expect("object").remove(key);
    } else {
        cur[key] = value;
    }
    obj
}

#[test]
fn the_crd_printed_by_the_binary_matches_the_file_in_crds() {
    let path = repo_root().join("crds/serving.deepseek.dev_deepseekdeployments.yaml");
    let committed = std::fs::read_to_string(&path).expect("crds/ file exists");
    let generated = crate::crd::crd_yaml().unwrap();
    assert!(
        committed == generated,
        "{} is out of date: run `cargo run -p deepseek-operator -- crd > {}`",
        path.display(),
        path.display()
    );
}

#[test]
fn the_crd_has_short_name_status_scale_and_printer_columns() {
    let crd = DeepSeekDeployment::crd();
    assert_eq!(crd.spec.group, "serving.deepseek.dev");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(
        crd.spec.names.short_names.as_deref(),
        Some(&["dsd".to_string()][..])
    );
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let cols: Vec<&str> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["Replicas", "Ready", "Desired", "KV%", "Queue", "Age"]
    );
}

#[test]
fn the_crd_schema_is_structural_with_every_property_typed() {
    let mut bad = Vec::new();
    untyped_nodes(&crd_schema(), "", &mut bad);
    assert!(bad.is_empty(), "untyped or non-structural nodes: {bad:#?}");
}

#[test]
fn every_spec_and_status_field_is_documented_for_kubectl_explain() {
    fn walk(schema: &Value, path: &str, out: &mut Vec<String>) {
        for (k, v) in schema
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let p = format!("{path}.{k}");
            let desc = v.get("description").and_then(Value::as_str).unwrap_or("");
            if desc.trim().is_empty() {
                out.push(format!("{p}: no description"));
            }
            for leak in ["Option<", "Vec<", "BTreeMap", "serde", "Rust", "struct "] {
                if desc.contains(leak) {
                    out.push(format!("{p}: description mentions {leak:?}"));
                }
            }
            // Our own fields only: embedded Kubernetes types keep their upstream docs.
            let ours = !["affinity", "tolerations", "resources", "env", "conditions"]
                .contains(&k.as_str());
            if ours {
                walk(v, &p, out);
                if let Some(items) = v.get("items") {
                    walk(items, &format!("{p}[]"), out);
                }
            }
        }
    }
    let schema = crd_schema();
    let mut missing = Vec::new();
    walk(&schema["properties"]["spec"], "spec", &mut missing);
    walk(&schema["properties"]["status"], "status", &mut missing);
    assert!(missing.is_empty(), "{missing:#?}");
}

#[test]
fn schema_defaults_agree_with_the_operator_defaults() {
    let defaulted = validate_object(&crd_schema(), &minimal()).expect("minimal spec is valid");
    let spec = &defaulted["spec"];
    assert_eq!(spec["engine"]["maxModelLen"], 131072);
    assert_eq!(spec["engine"]["kvCacheDtype"], "fp8");
    assert_eq!(spec["groupFailurePolicy"], "RecreateGroup");
    assert_eq!(spec["replicas"], 1);
    assert_eq!(spec["service"]["port"], 8000);
    let from_schema: DeepSeekDeploymentSpec = serde_json::from_value(spec.clone()).unwrap();
    let from_serde: DeepSeekDeploymentSpec =
        serde_json::from_value(minimal()["spec"].clone()).unwrap();
    assert_eq!(from_schema, from_serde);
}

fn examples() -> Vec<(String, Value)> {
    let dir = repo_root().join("examples");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/ exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            // A file may hold several documents (an HPA or KEDA object beside the deployment);
            // the DeepSeekDeployments among them are checked.
            let mut found = false;
            for doc in text.split("\n---\n") {
                let value: Value = serde_saphyr::from_str(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                if value["kind"] == "DeepSeekDeployment" {
                    found = true;
                    out.push((
                        path.file_name().unwrap().to_string_lossy().into_owned(),
                        value,
                    ));
                }
            }
            assert!(found, "{}: no DeepSeekDeployment", path.display());
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_example_passes_the_schema_the_cel_rules_and_the_operator_checks() {
    let schema = crd_schema();
    let all = examples();
    assert!(
        all.len() >= 2,
        "examples: {:?}",
        all.iter().map(|e| &e.0).collect::<Vec<_>>()
    );
    for (file, value) in all {
        let defaulted =
            validate_object(&schema, &value).unwrap_or_else(|e| panic!("{file}: {e:#?}"));
        let mut dsd: DeepSeekDeployment =
            serde_json::from_value(defaulted).unwrap_or_else(|e| panic!("{file}: {e}"));
        validate(&dsd.name_any_or_default(), &dsd.spec).unwrap_or_else(|e| panic!("{file}: {e:?}"));
        dsd.metadata
            .namespace
            .get_or_insert_with(|| "default".into());
        dsd.metadata.uid = Some("example".into());
        crate::render::desired(&dsd).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

impl DeepSeekDeployment {
    fn name_any_or_default(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }
}

#[test]
fn the_full_model_example_runs_ep16_over_two_8_gpu_pods_and_autoscales_1_to_4_groups() {
    let (_, value) = examples()
        .into_iter()
        .find(|(f, _)| f == "deepseek-v32.yaml")
        .expect("full example");
    let dsd: DeepSeekDeployment = serde_json::from_value(value).unwrap();
    assert_eq!(dsd.spec.parallelism.expert_parallel, 16);
    assert_eq!(dsd.spec.parallelism.gpus_per_pod, 8);
    assert_eq!(dsd.spec.parallelism.pods_per_group(), 2);
    assert!(dsd.spec.autoscaling.enabled);
    assert_eq!(
        (
            dsd.spec.autoscaling.min_replicas,
            dsd.spec.autoscaling.max_replicas
        ),
        (1, 4)
    );
}

/// (case, JSON pointer, value, what the schema says, what the operator says)
const BAD: &[(&str, &str, &str, &str, &str)] = &[
    (
        "EP not a multiple of GPUs per pod",
        "/spec/parallelism",
        r#"{"expertParallel": 12, "gpusPerPod": 8}"#,
        "expertParallel must be a multiple of parallelism.gpusPerPod",
        "spec.parallelism.expertParallel: must be a multiple of parallelism.gpusPerPod (8)",
    ),
    (
        "too many pods per group",
        "/spec/parallelism",
        r#"{"expertParallel": 128, "gpusPerPod": 1}"#,
        "at most 64 pods",
        "spec.parallelism: a group may have at most 64 pods",
    ),
    (
        "autoscaling min above max",
        "/spec/autoscaling",
        r#"{"minReplicas": 5, "maxReplicas": 2}"#,
        "minReplicas must not be greater than autoscaling.maxReplicas",
        "spec.autoscaling.minReplicas: must not be greater than autoscaling.maxReplicas (5 > 2)",
    ),
    (
        "unknown model scheme",
        "/spec/model/source",
        r#""http://example.com/model""#,
        "hf://ORG/NAME",
        "spec.model.source: \"http://example.com/model\" is not a model source",
    ),
    (
        "credentials with a PVC source",
        "/spec/model/credentialsSecret",
        r#""hf-token""#,
        "only used with hf:// and s3://",
        "spec.model.credentialsSecret: is only used with hf:// and s3://",
    ),
    (
        "negative replicas",
        "/spec/replicas",
        "-1",
        "greater than or equal to 0",
        "spec.replicas: must be between 0 and 1000 (is -1)",
    ),
    (
        "port out of range",
        "/spec/service/port",
        "70000",
        "less than or equal to 65535",
        "spec.service.port: must be between 1 and 65535 (is 70000)",
    ),
    (
        "KV target above 1",
        "/spec/autoscaling/targetKvCacheUtilization",
        "1.5",
        "less than or equal to 1",
        "spec.autoscaling.targetKvCacheUtilization: must be between 0.05 and 1.0 (is 1.5)",
    ),
    (
        "maxUnavailable zero",
        "/spec/rollout/maxUnavailable",
        "0",
        "greater than or equal to 1",
        "spec.rollout.maxUnavailable: must be between 1 and 1000 (is 0)",
    ),
    (
        "inference pool name not a DNS label",
        "/spec/inferencePool",
        r#"{"name": "Pool_1", "endpointPicker": {"name": "epp"}}"#,
        "inferencePool.name must be a DNS label",
        "spec.inferencePool.name: must be a DNS label",
    ),
    (
        "endpoint picker not a Service name",
        "/spec/inferencePool",
        r#"{"endpointPicker": {"name": "9epp"}}"#,
        "inferencePool.endpointPicker.name must be a Service name",
        "spec.inferencePool.endpointPicker.name: must be a Service name",
    ),
    (
        "endpoint picker port out of range",
        "/spec/inferencePool",
        r#"{"endpointPicker": {"name": "epp", "port": 0}}"#,
        "greater than or equal to 1",
        "spec.inferencePool.endpointPicker.port: must be between 1 and 65535 (is 0)",
    ),
    (
        "name too long",
        "/metadata/name",
        r#""a-very-long-deployment-name-that-goes-on-and-on""#,
        "metadata.name must be at most 40 characters",
        "metadata.name: must be at most 40 characters",
    ),
];

#[test]
fn bad_specs_are_refused_by_the_schema_with_a_message_naming_the_field() {
    let schema = crd_schema();
    for (case, pointer, value, expect, _) in BAD {
        let obj = with(minimal(), pointer, serde_json::from_str(value).unwrap());
        let errors = validate_object(&schema, &obj)
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        assert!(
            errors.iter().any(|e| e.contains(expect)),
            "{case}: {errors:#?}"
        );
    }
}

#[test]
fn the_operator_refuses_the_same_bad_specs_itself() {
    for (case, pointer, value, _, expect) in BAD {
        let obj = with(minimal(), pointer, serde_json::from_str(value).unwrap());
        let dsd: DeepSeekDeployment = serde_json::from_value(obj).unwrap();
        let errors = validate(dsd.metadata.name.as_deref().unwrap(), &dsd.spec)
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        let text = validate::summarize(&errors);
        assert!(
            text.contains(expect),
            "{case}: expected {expect:?} in {text:?}"
        );
    }
}

#[test]
fn enums_and_missing_fields_are_refused_by_the_schema() {
    let schema = crd_schema();
    let cases = [
        (
            "/spec/engine/kvCacheDtype",
            json!("fp16"),
            "spec.engine.kvCacheDtype: unsupported value",
        ),
        (
            "/spec/groupFailurePolicy",
            json!("Restart"),
            "spec.groupFailurePolicy: unsupported value",
        ),
        (
            "/spec/service/type",
            json!("Ingress"),
            "spec.service.type: unsupported value",
        ),
        ("/spec/model", Value::Null, "spec.model: Required value"),
        (
            "/spec/parallelism/gpusPerPod",
            json!("eight"),
            "spec.parallelism.gpusPerPod: must be of type integer",
        ),
        (
            "/spec/parallelism/gpuPerPod",
            json!(8),
            "spec.parallelism.gpuPerPod: unknown field",
        ),
    ];
    for (pointer, value, expect) in cases {
        let errors = validate_object(&schema, &with(minimal(), pointer, value)).unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains(expect)),
            "{pointer}: {errors:#?}"
        );
    }
}

#[test]
fn checks_beyond_the_schema_name_the_field_and_the_limit() {
    let base: DeepSeekDeployment = serde_json::from_value(minimal()).unwrap();
    type Edit = Box<dyn Fn(&mut DeepSeekDeploymentSpec)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|s| s.engine.extra_args = vec!["--max-model-len=9".into()]),
            "spec.engine.extraArgs[0]: --max-model-len is set by the operator",
        ),
        (
            Box::new(|s| {
                s.engine.env = vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "RANK".into(),
                    ..Default::default()
                }]
            }),
            "spec.engine.env[0].name: RANK is set by the operator",
        ),
        (
            Box::new(|s| {
                s.engine.extra_args = vec!["--shutdown-grace-seconds".into(), "300".into()]
            }),
            "spec.engine.extraArgs[0]: --shutdown-grace-seconds is set by the operator",
        ),
        (
            Box::new(|s| {
                s.engine.env = vec![k8s_openapi::api::core::v1::EnvVar {
                    name: "SHUTDOWN_GRACE_SECONDS".into(),
                    value: Some("300".into()),
                    ..Default::default()
                }]
            }),
            "spec.engine.env[0].name: SHUTDOWN_GRACE_SECONDS is set by the operator",
        ),
        (
            Box::new(|s| {
                s.shared_memory_size =
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("lots".into())
            }),
            "spec.sharedMemorySize: \"lots\" is not a quantity",
        ),
        (
            Box::new(|s| {
                s.shared_memory_size =
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("0".into())
            }),
            "spec.sharedMemorySize: must be greater than zero",
        ),
        (
            Box::new(|s| {
                s.resources = Some(
                    serde_json::from_value(json!({"limits": {"nvidia.com/gpu": "8"}})).unwrap(),
                );
            }),
            "spec.resources.limits: nvidia.com/gpu is set from parallelism.gpusPerPod",
        ),
        (
            Box::new(|s| {
                s.pod_labels
                    .insert("app.kubernetes.io/name".into(), "x".into());
            }),
            "spec.podLabels: label \"app.kubernetes.io/name\" is set by the operator",
        ),
        (
            Box::new(|s| s.model.source = "pvc://Bad_Claim".into()),
            "spec.model.source: \"pvc://Bad_Claim\": claim name",
        ),
        (
            Box::new(|s| s.model.source = "hf://just-a-name".into()),
            "must name a repository as hf://ORG/NAME",
        ),
    ];
    for (edit, expect) in cases {
        let mut spec = base.spec.clone();
        edit(&mut spec);
        let text = validate::summarize(&validate("m", &spec).unwrap_err());
        assert!(text.contains(expect), "expected {expect:?} in {text:?}");
    }
}

#[test]
fn model_sources_parse_into_their_kinds() {
    assert_eq!(
        ModelSource::parse("hf://deepseek-ai/DeepSeek-V3.2@a1b2c3").unwrap(),
        ModelSource::HuggingFace {
            repo: "deepseek-ai/DeepSeek-V3.2".into(),
            revision: Some("a1b2c3".into())
        }
    );
    assert_eq!(
        ModelSource::parse("hf://deepseek-ai/DeepSeek-V3.2").unwrap(),
        ModelSource::HuggingFace {
            repo: "deepseek-ai/DeepSeek-V3.2".into(),
            revision: None
        }
    );
    assert_eq!(
        ModelSource::parse("pvc://weights/v3.2/").unwrap(),
        ModelSource::Pvc {
            claim: "weights".into(),
            path: "v3.2".into()
        }
    );
    assert_eq!(
        ModelSource::parse("pvc://weights").unwrap(),
        ModelSource::Pvc {
            claim: "weights".into(),
            path: String::new()
        }
    );
    assert_eq!(
        ModelSource::parse("s3://my-bucket/models/v32").unwrap(),
        ModelSource::S3 {
            bucket: "my-bucket".into(),
            prefix: "models/v32".into()
        }
    );
    assert_eq!(
        ModelSource::parse("/mnt/models/v32").unwrap(),
        ModelSource::HostPath("/mnt/models/v32".into())
    );
    assert_eq!(
        ModelSource::parse("builtin://tiny").unwrap(),
        ModelSource::BuiltinTiny
    );
    assert_eq!(
        ModelSource::parse("builtin://mini").unwrap(),
        ModelSource::BuiltinMini
    );
    for bad in [
        "",
        "hf://",
        "hf://org/name@",
        "s3://A",
        "relative/path",
        "/mnt/../etc",
        "builtin://huge",
        "//x",
    ] {
        assert!(ModelSource::parse(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn the_cel_source_rule_accepts_exactly_what_the_operator_parses() {
    let schema = crd_schema();
    for source in [
        "hf://deepseek-ai/DeepSeek-V3.2@main",
        "pvc://weights/v32",
        "s3://bucket-1/p",
        "/data/m",
        "builtin://tiny",
        "builtin://mini",
        "builtin://minis",
        "hf://x",
        "ftp://a/b",
        "builtin://huge",
    ] {
        let mut obj = with(minimal(), "/spec/model/source", json!(source));
        if source.starts_with("hf") || source.starts_with("s3") {
            obj = with(obj, "/spec/model/credentialsSecret", json!("creds"));
        }
        let result = validate_object(&schema, &obj);
        let by_schema = result.is_ok();
        if by_schema != ModelSource::parse(source).is_ok() {
            eprintln!("{source}: {result:?}");
        }
        let by_operator = ModelSource::parse(source).is_ok();
        assert_eq!(by_schema, by_operator, "{source}");
    }
}

#[test]
fn quantities_parse_like_kubernetes_quantities() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let q = |s: &str| validate::parse_quantity(&Quantity(s.into()));
    assert_eq!(q("16Gi"), Some(16.0 * 1024.0 * 1024.0 * 1024.0));
    assert_eq!(q("500m"), Some(0.5));
    assert_eq!(q("1.5G"), Some(1.5e9));
    assert_eq!(q("1e3"), Some(1000.0));
    assert_eq!(q("2"), Some(2.0));
    for bad in ["", "Gi", "1.2.3", "5 Gi", "10XB", "--1"] {
        assert_eq!(q(bad), None, "{bad:?}");
    }
}

#[test]
fn pods_per_group_is_ep_over_gpus_per_pod_or_one_rank_per_cpu_pod() {
    let p = |ep, gpus| {
        ParallelismSpec {
            expert_parallel: ep,
            gpus_per_pod: gpus,
        }
        .pods_per_group()
    };
    assert_eq!(p(16, 8), 2);
    assert_eq!(p(8, 8), 1);
    assert_eq!(p(32, 4), 8);
    assert_eq!(p(2, 0), 2);
    assert_eq!(p(1, 0), 1);
}
