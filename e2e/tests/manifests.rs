//! Checks of the install manifests that need no cluster and no helm binary: the Helm chart,
//! the kustomize tree, the images, the examples, the alerts and the dashboard, against each
//! other and against what the code really does (the CRD, the objects the operator renders, its
//! CLI, the metrics operator and engine export). Helm templates are Go templates and are not
//! rendered here; they are kept simple enough that the parts that matter (RBAC rules, value
//! references, the CRD file) can be read as text.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use deepseek_e2e::{read_repo_file, repo_root, workspace_binary, yaml_documents, yaml_to_json};
use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::render;
use k8s_openapi::Resource as _;
use kube::CustomResourceExt;
use serde_json::Value;

const CRD_FILE: &str = "crds/serving.deepseek.dev_deepseekdeployments.yaml";
const CHART: &str = "charts/deepseek-operator";
const VERSION: &str = env!("CARGO_PKG_VERSION");

// ---------------------------------------------------------------------------------------------
// CRD copies

#[test]
fn the_chart_and_kustomize_carry_the_repository_crd_byte_for_byte() {
    let crd = read_repo_file(CRD_FILE);
    for copy in [
        format!("{CHART}/files/serving.deepseek.dev_deepseekdeployments.yaml"),
        "deploy/base/crd.yaml".to_string(),
    ] {
        assert!(
            read_repo_file(&copy) == crd,
            "{copy} differs from {CRD_FILE}; after changing the CRD run: cp {CRD_FILE} {copy}"
        );
    }
}

#[test]
fn the_chart_renders_the_crd_as_a_template_so_upgrades_reach_it() {
    // Helm never upgrades files under a chart's crds/ directory.
    assert!(
        !repo_root().join(CHART).join("crds").exists(),
        "{CHART}/crds/ would be installed once and never upgraded"
    );
    let template = read_repo_file(&format!("{CHART}/templates/crds.yaml"));
    assert!(
        template.contains(".Files.Get \"files/serving.deepseek.dev_deepseekdeployments.yaml\"")
    );
    assert!(template.contains("helm.sh/resource-policy"));
}

// ---------------------------------------------------------------------------------------------
// Chart values and schema

/// A JSON-schema checker for the keywords values.schema.json uses. Any other keyword is an
/// error, so the schema cannot rely on something this check silently ignores.
fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let obj = schema.as_object().expect("schema is an object");
    for key in obj.keys() {
        let known = [
            "$schema",
            "title",
            "description",
            "type",
            "properties",
            "required",
            "additionalProperties",
            "items",
            "enum",
            "minimum",
            "maximum",
            "minLength",
            "maxLength",
        ];
        assert!(
            known.contains(&key.as_str()),
            "{path}: unsupported schema keyword {key}"
        );
    }
    if let Some(t) = obj.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => panic!("{path}: bad type"),
        };
        let ok = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "null" => value.is_null(),
            other => panic!("{path}: unknown type {other}"),
        });
        if !ok {
            errors.push(format!("{path}: expected {types:?}, got {value}"));
            return;
        }
    }
    if let Some(allowed) = obj.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = obj.get("minimum").and_then(Value::as_f64)
            && n < min
        {
            errors.push(format!("{path}: {n} < minimum {min}"));
        }
        if let Some(max) = obj.get("maximum").and_then(Value::as_f64)
            && n > max
        {
            errors.push(format!("{path}: {n} > maximum {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if let Some(min) = obj.get("minLength").and_then(Value::as_u64)
            && len < min
        {
            errors.push(format!("{path}: shorter than {min}"));
        }
        if let Some(max) = obj.get("maxLength").and_then(Value::as_u64)
            && len > max
        {
            errors.push(format!("{path}: longer than {max}"));
        }
    }
    if let Some(map) = value.as_object() {
        let props = obj.get("properties").and_then(Value::as_object);
        for req in obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let req = req.as_str().expect("required names");
            if !map.contains_key(req) {
                errors.push(format!("{path}: missing required {req}"));
            }
        }
        for (k, v) in map {
            let child = format!("{path}.{k}");
            match (
                props.and_then(|p| p.get(k)),
                obj.get("additionalProperties"),
            ) {
                (Some(s), _) => check_schema(s, v, &child, errors),
                (None, Some(Value::Bool(false))) => {
                    errors.push(format!("{child}: not allowed by the schema"))
                }
                (None, Some(s @ Value::Object(_))) => check_schema(s, v, &child, errors),
                (None, _) => {}
            }
        }
    }
    if let (Some(items), Some(list)) = (obj.get("items"), value.as_array()) {
        for (i, v) in list.iter().enumerate() {
            check_schema(items, v, &format!("{path}[{i}]"), errors);
        }
    }
}

fn chart_schema() -> Value {
    serde_json::from_str(&read_repo_file(&format!("{CHART}/values.schema.json")))
        .expect("values.schema.json is valid JSON")
}

fn chart_values() -> Value {
    yaml_to_json(&read_repo_file(&format!("{CHART}/values.yaml"))).expect("values.yaml parses")
}

#[test]
fn the_default_values_satisfy_the_values_schema() {
    let mut errors = Vec::new();
    check_schema(&chart_schema(), &chart_values(), "values", &mut errors);
    assert!(errors.is_empty(), "{errors:#?}");
}

#[test]
fn the_values_schema_refuses_typos_and_out_of_range_values() {
    let schema = chart_schema();
    let bad = [
        ("replicaCount", serde_json::json!(0)),
        ("leaderElektion", serde_json::json!({"enabled": true})),
        (
            "image",
            serde_json::json!({"repository": "x", "pullPolicy": "Sometimes"}),
        ),
        ("metrics", serde_json::json!({"port": 70000})),
    ];
    for (key, v) in bad {
        let mut values = chart_values();
        values[key] = v;
        let mut errors = Vec::new();
        check_schema(&schema, &values, "values", &mut errors);
        assert!(!errors.is_empty(), "the schema accepted a bad {key}");
    }
}

/// Every `.Values.a.b` path the templates read.
fn template_value_paths() -> BTreeMap<String, String> {
    let mut paths = BTreeMap::new();
    let dir = repo_root().join(CHART).join("templates");
    for entry in std::fs::read_dir(&dir).expect("templates/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("template");
        for (i, _) in text.match_indices(".Values.") {
            let rest = &text[i + ".Values.".len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
                .unwrap_or(rest.len());
            let p = rest[..end].trim_end_matches('.').to_string();
            paths.insert(p, path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    paths
}

#[test]
fn every_value_the_templates_read_is_declared_in_values_and_schema() {
    let values = chart_values();
    let schema = chart_schema();
    let paths = template_value_paths();
    assert!(paths.len() > 20, "found only {paths:?}");
    for (p, file) in &paths {
        let mut v = &values;
        let mut s = &schema;
        for part in p.split('.') {
            v = v
                .get(part)
                .unwrap_or_else(|| panic!("{file}: .Values.{p} is not in values.yaml"));
            s = s
                .get("properties")
                .and_then(|props| props.get(part))
                .unwrap_or_else(|| panic!("{file}: .Values.{p} is not in values.schema.json"));
        }
    }
}

#[test]
fn the_chart_version_and_images_follow_the_workspace_version() {
    let chart = yaml_to_json(&read_repo_file(&format!("{CHART}/Chart.yaml"))).unwrap();
    assert_eq!(chart["version"], VERSION);
    assert_eq!(chart["appVersion"], VERSION);
    let values = chart_values();
    assert_eq!(
        values["image"]["repository"],
        "ghcr.io/deepseek-serving/deepseek-operator"
    );
    // An empty tag means appVersion.
    assert_eq!(values["image"]["tag"], "");
    let base = operator_deployment();
    assert_eq!(
        base["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("ghcr.io/deepseek-serving/deepseek-operator:{VERSION}")
    );
    let engine = format!("ghcr.io/deepseek-serving/deepseek-engine:{VERSION}");
    assert_eq!(deepseek_operator::api::DEFAULT_IMAGE, engine);
    for (file, dsd) in examples() {
        assert_eq!(dsd.spec.engine.image, engine, "{file}");
    }
}

// ---------------------------------------------------------------------------------------------
// RBAC

/// `(apiGroup, resource) -> verbs` of every rule in the documents' ClusterRoles and Roles.
type Rules = BTreeMap<(String, String), BTreeSet<String>>;

fn collect_rules(rules: &Value, into: &mut Rules) {
    for rule in rules.as_array().expect("rules list") {
        let strings = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .unwrap_or_else(|| panic!("rule without {k}: {rule}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                let verbs = into.entry((group.clone(), resource)).or_default();
                verbs.extend(strings("verbs"));
            }
        }
    }
}

fn kustomize_rules() -> Rules {
    let docs = yaml_documents(&read_repo_file("deploy/base/rbac.yaml")).unwrap();
    let mut rules = Rules::new();
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        collect_rules(&d["rules"], &mut rules);
    }
    rules
}

/// The chart's rules: each `rules:` block of templates/rbac.yaml, up to the next top-level key
/// or document, parsed as YAML. The blocks hold no template logic, so this is what Helm renders.
fn chart_rules() -> Rules {
    let text = read_repo_file(&format!("{CHART}/templates/rbac.yaml"));
    let mut rules = Rules::new();
    let mut lines = text.lines().peekable();
    let mut blocks = 0;
    while let Some(line) = lines.next() {
        if line != "rules:" {
            continue;
        }
        let mut block = String::new();
        while let Some(next) = lines.peek() {
            if !(next.starts_with(' ') || next.is_empty()) {
                break;
            }
            block.push_str(lines.next().unwrap());
            block.push('\n');
        }
        assert!(
            !block.contains("{{"),
            "rules must not be templated:\n{block}"
        );
        collect_rules(&yaml_to_json(&block).unwrap(), &mut rules);
        blocks += 1;
    }
    assert_eq!(blocks, 2, "a ClusterRole and a leader-election Role");
    rules
}

#[test]
fn chart_and_kustomize_grant_the_same_rules() {
    assert_eq!(chart_rules(), kustomize_rules());
}

fn plural(kind: &str) -> String {
    match kind {
        "Service" => "services".into(),
        "StatefulSet" => "statefulsets".into(),
        "ConfigMap" => "configmaps".into(),
        "PodDisruptionBudget" => "poddisruptionbudgets".into(),
        "InferencePool" => "inferencepools".into(),
        other => panic!("the operator renders a new kind {other}: grant it in the RBAC rules"),
    }
}

fn group_of(api_version: &str) -> String {
    api_version
        .rsplit_once('/')
        .map(|(g, _)| g.to_string())
        .unwrap_or_default()
}

#[test]
fn rbac_grants_exactly_the_kinds_and_verbs_the_controller_uses() {
    let mut expected = Rules::new();
    let set = |verbs: &[&str]| verbs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
    // Every kind the operator renders: server-side applied (create + patch), watched as owned
    // (list + watch). Group kinds are also deleted when scaling down; the shared ConfigMap is
    // only garbage-collected with its DeepSeekDeployment.
    let d = render::desired(&cpu_demo()).expect("renders");
    let g = &d.groups[0];
    let kinds = [
        (
            k8s_openapi::api::apps::v1::StatefulSet::API_VERSION,
            k8s_openapi::api::apps::v1::StatefulSet::KIND,
            true,
        ),
        (
            k8s_openapi::api::core::v1::Service::API_VERSION,
            k8s_openapi::api::core::v1::Service::KIND,
            true,
        ),
        (
            k8s_openapi::api::policy::v1::PodDisruptionBudget::API_VERSION,
            k8s_openapi::api::policy::v1::PodDisruptionBudget::KIND,
            true,
        ),
        (
            k8s_openapi::api::core::v1::ConfigMap::API_VERSION,
            k8s_openapi::api::core::v1::ConfigMap::KIND,
            false,
        ),
    ];
    // The kinds above must be exactly the kinds of the rendered objects.
    let mut rendered_kinds: BTreeSet<String> = BTreeSet::new();
    for v in [
        serde_json::to_value(&g.statefulset).unwrap(),
        serde_json::to_value(&g.service).unwrap(),
        serde_json::to_value(&g.pdb).unwrap(),
        serde_json::to_value(&d.config_map).unwrap(),
        serde_json::to_value(&d.service).unwrap(),
    ] {
        // k8s-openapi serializes apiVersion and kind on every object.
        rendered_kinds.insert(format!("{}/{}", v["apiVersion"], v["kind"]).replace('"', ""));
    }
    let listed: BTreeSet<String> = kinds.iter().map(|(v, k, _)| format!("{v}/{k}")).collect();
    assert_eq!(
        rendered_kinds, listed,
        "the operator renders other kinds now"
    );
    for (api_version, kind, deleted) in kinds {
        let mut verbs = vec!["list", "watch", "create", "patch"];
        if deleted {
            verbs.push("delete");
        }
        expected.insert((group_of(api_version), plural(kind)), set(verbs.as_slice()));
    }
    // The InferencePool of spec.inferencePool (a dynamic object): listed by label, read by
    // name, server-side applied, deleted when the field goes; never watched.
    let mut with_pool = cpu_demo();
    with_pool.spec.inference_pool = Some(
        serde_json::from_value(serde_json::json!({"endpointPicker": {"name": "epp"}})).unwrap(),
    );
    let pool = serde_json::to_value(
        render::desired(&with_pool)
            .expect("renders")
            .inference_pool
            .expect("a pool"),
    )
    .unwrap();
    let pool_kind = pool["kind"].as_str().unwrap().to_string();
    expected.insert(
        (
            group_of(pool["apiVersion"].as_str().unwrap()),
            plural(&pool_kind),
        ),
        set(&["list", "get", "create", "patch", "delete"]),
    );
    // The custom resource: watched, status written, owner of the children.
    let crd = DeepSeekDeployment::crd();
    let group = crd.spec.group.clone();
    let plural = crd.spec.names.plural.clone();
    expected.insert((group.clone(), plural.clone()), set(&["list", "watch"]));
    expected.insert((group.clone(), format!("{plural}/status")), set(&["patch"]));
    expected.insert((group, format!("{plural}/finalizers")), set(&["update"]));
    // Engine pods: watched; a group's pods are deleted together; a draining group's leader is
    // relabelled out of the serving Service.
    expected.insert(
        (String::new(), "pods".into()),
        set(&["list", "watch", "deletecollection", "patch"]),
    );
    // Events through kube's Recorder (events.k8s.io/v1): created, then patched as a series.
    expected.insert(
        ("events.k8s.io".into(), "events".into()),
        set(&["create", "patch"]),
    );
    // The leader Lease: read, created once, renewed by update.
    expected.insert(
        ("coordination.k8s.io".into(), "leases".into()),
        set(&["get", "create", "update"]),
    );
    assert_eq!(kustomize_rules(), expected);
    for ((g, r), verbs) in kustomize_rules() {
        assert!(
            g != "*" && r != "*" && !verbs.contains("*"),
            "wildcard in {g}/{r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// kustomize

/// Every kustomization under deploy/: each listed resource exists and parses, and the tree's
/// documents have apiVersion, kind and name.
#[test]
fn every_kustomization_lists_existing_parseable_resources() {
    let mut stack = vec![repo_root().join("deploy")];
    let mut seen = 0;
    while let Some(dir) = stack.pop() {
        let k = dir.join("kustomization.yaml");
        if k.exists() {
            seen += 1;
            let doc = yaml_to_json(&std::fs::read_to_string(&k).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", k.display()));
            assert_eq!(doc["kind"], "Kustomization", "{}", k.display());
            for r in doc["resources"].as_array().expect("resources") {
                let p = dir.join(r.as_str().unwrap());
                if p.is_dir() {
                    assert!(
                        p.join("kustomization.yaml").exists(),
                        "{} is a directory without kustomization.yaml",
                        p.display()
                    );
                    continue;
                }
                let text = std::fs::read_to_string(&p)
                    .unwrap_or_else(|e| panic!("{} lists {}: {e}", k.display(), p.display()));
                let docs = yaml_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(!docs.is_empty(), "{} is empty", p.display());
                for d in docs {
                    assert!(
                        d["apiVersion"].is_string()
                            && d["kind"].is_string()
                            && d["metadata"]["name"].is_string(),
                        "{}: a document lacks apiVersion, kind or name",
                        p.display()
                    );
                }
            }
        }
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
    assert!(seen >= 4, "deploy/, base/, cpu-demo/, monitoring/");
    let top = yaml_to_json(&read_repo_file("deploy/kustomization.yaml")).unwrap();
    assert_eq!(top["resources"], serde_json::json!(["base"]));
    let base = yaml_to_json(&read_repo_file("deploy/base/kustomization.yaml")).unwrap();
    for needed in ["namespace.yaml", "crd.yaml", "rbac.yaml", "deployment.yaml"] {
        assert!(
            base["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r == needed),
            "deploy/base installs {needed}"
        );
    }
}

fn operator_deployment() -> Value {
    yaml_to_json(&read_repo_file("deploy/base/deployment.yaml")).unwrap()
}

#[test]
fn the_operator_runs_non_root_on_a_read_only_root_with_probes_and_requests() {
    for (name, text) in [
        (
            "deploy/base/deployment.yaml",
            read_repo_file("deploy/base/deployment.yaml"),
        ),
        (
            "chart templates/deployment.yaml",
            read_repo_file(&format!("{CHART}/templates/deployment.yaml")),
        ),
    ] {
        for needle in [
            "runAsNonRoot: true",
            "runAsUser: 65532",
            "readOnlyRootFilesystem: true",
            "allowPrivilegeEscalation: false",
            "drop: [\"ALL\"]",
            "type: RuntimeDefault",
            "path: /healthz",
            "path: /readyz",
            "fieldPath: metadata.namespace",
            "--leader-election",
        ] {
            assert!(text.contains(needle), "{name} lacks {needle}");
        }
    }
    let d = operator_deployment();
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert!(c["resources"]["requests"]["cpu"].is_string());
    assert!(c["resources"]["requests"]["memory"].is_string());
    let values = chart_values();
    assert!(values["resources"]["requests"]["cpu"].is_string());
    assert_eq!(values["leaderElection"]["enabled"], true);
}

#[test]
fn the_operator_accepts_the_flags_the_manifests_pass() {
    let bin = workspace_binary("deepseek-operator", "deepseek-operator");
    let help = Command::new(&bin).args(["run", "--help"]).output().unwrap();
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout).to_string();
    let chart = read_repo_file(&format!("{CHART}/templates/deployment.yaml"));
    let base = operator_deployment();
    let args: Vec<String> = base["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let chart_flags = chart
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(str::to_string);
    for flag in args
        .iter()
        .filter(|a| a.starts_with("--"))
        .cloned()
        .chain(chart_flags)
    {
        assert!(help.contains(&flag), "deepseek-operator run has no {flag}");
    }
    // The whole command line parses: without any cluster configuration the operator gets past
    // argument parsing (exit code 2 is clap's usage error) and stops at the client.
    let out = Command::new(&bin)
        .args(&args)
        .env_clear()
        .env("HOME", std::env::temp_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "usage error: {stderr}");
    assert!(
        stderr.contains("Kubernetes configuration"),
        "expected the missing-cluster error, got: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Images

#[test]
fn the_images_are_non_root_and_put_the_binaries_where_the_manifests_expect() {
    let engine = read_repo_file("docker/engine.Dockerfile");
    // The operator renders `command: [deepseek-engine]`, resolved through PATH.
    assert!(engine.contains("/usr/local/bin/deepseek-engine"));
    assert!(engine.contains("nvidia/cuda:13.0") && engine.contains("-runtime-"));
    assert!(engine.contains("USER 65532:65532"));
    assert!(engine.contains("cargo build --release --locked -p deepseek-engine"));
    let operator = read_repo_file("docker/operator.Dockerfile");
    let last_from = operator.lines().rfind(|l| l.starts_with("FROM ")).unwrap();
    assert!(
        last_from.contains("distroless/static") || last_from.contains("scratch"),
        "{last_from}"
    );
    assert!(operator.contains("-unknown-linux-musl"), "a static binary");
    assert!(operator.contains("USER 65532:65532"));
    assert!(operator.contains("ENTRYPOINT [\"/usr/local/bin/deepseek-operator\"]"));
}

// ---------------------------------------------------------------------------------------------
// Examples

fn examples() -> Vec<(String, DeepSeekDeployment)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            // An example may carry other objects (a Secret, a KEDA ScaledObject) beside its
            // DeepSeekDeployment.
            let text = std::fs::read_to_string(&p).unwrap();
            let docs = yaml_documents(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            for doc in docs
                .into_iter()
                .filter(|d| d["kind"] == "DeepSeekDeployment")
            {
                let dsd: DeepSeekDeployment =
                    serde_json::from_value(doc).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.push((p.file_name().unwrap().to_string_lossy().into_owned(), dsd));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn with_identity(mut dsd: DeepSeekDeployment) -> DeepSeekDeployment {
    dsd.metadata
        .namespace
        .get_or_insert_with(|| "default".into());
    dsd.metadata.uid = Some("00000000-0000-0000-0000-000000000002".into());
    dsd
}

fn cpu_demo() -> DeepSeekDeployment {
    with_identity(
        serde_saphyr::from_str(&read_repo_file("examples/tiny-cpu.yaml")).expect("parses"),
    )
}

/// (pods per group, GPUs per pod, autoscaling min..max) of a rendered example.
fn shape(dsd: &DeepSeekDeployment) -> (i32, i32, Option<(i32, i32)>) {
    let d = render::desired(&with_identity(dsd.clone())).expect("renders");
    let a = Some(&dsd.spec.autoscaling).filter(|a| a.enabled);
    (
        d.pods_per_group,
        dsd.spec.parallelism.gpus_per_pod,
        a.map(|a| (a.min_replicas, a.max_replicas)),
    )
}

#[test]
fn the_examples_cover_two_pod_gpu_groups_one_pod_groups_and_the_cpu_demo() {
    let all: BTreeMap<String, DeepSeekDeployment> = examples().into_iter().collect();
    assert_eq!(shape(&all["deepseek-v32.yaml"]), (2, 8, Some((1, 4))));
    assert_eq!(shape(&all["deepseek-v32-single-pod.yaml"]), (1, 8, None));
    let tiny = &all["tiny-cpu.yaml"];
    assert_eq!(shape(tiny), (2, 0, None));
    assert_eq!(tiny.spec.model.source, "builtin://tiny");
    // The kustomize demo is the same deployment.
    let demo = yaml_documents(&read_repo_file("deploy/cpu-demo/demo.yaml")).unwrap();
    let dsd = demo
        .iter()
        .find(|d| d["kind"] == "DeepSeekDeployment")
        .expect("the demo overlay has a DeepSeekDeployment");
    let dsd: DeepSeekDeployment = serde_json::from_value(dsd.clone()).unwrap();
    assert_eq!(
        dsd.spec, tiny.spec,
        "deploy/cpu-demo/demo.yaml and examples/tiny-cpu.yaml"
    );
}

/// Expert parallelism over GPUs has been run on one GPU shared by two ranks, never at the scale
/// of the full-model examples. An example asking for several GPUs per group says so at its top.
#[test]
fn every_example_beyond_what_was_run_says_so() {
    let mut flagged = 0;
    for (file, dsd) in examples() {
        let p = &dsd.spec.parallelism;
        let was_run = p.gpus_per_pod == 0 || (p.gpus_per_pod == 1 && p.expert_parallel == 1);
        let text = read_repo_file(&format!("examples/{file}"));
        let says = text.contains("NOT YET RUN AT THIS SCALE");
        assert_eq!(
            says, !was_run,
            "{file}: gpusPerPod {} expertParallel {}; its comment must say NOT YET RUN AT THIS SCALE exactly when its layout was never run",
            p.gpus_per_pod, p.expert_parallel
        );
        flagged += usize::from(says);
    }
    assert!(flagged >= 2, "the GPU examples are flagged");
}

// ---------------------------------------------------------------------------------------------
// Metrics: alerts and dashboard

/// Metric names exported by operator and engine: the string literals naming metrics in their
/// metrics modules.
fn exported_metrics() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["engine/src/metrics.rs", "operator/src/metrics.rs"] {
        let text = read_repo_file(file);
        for (i, _) in text.match_indices('"') {
            let rest = &text[i + 1..];
            let end = rest.find('"').unwrap_or(0);
            let lit = &rest[..end];
            // Series names in the modules' own tests (`..._bucket`) are not metric names.
            if (lit.starts_with("vllm:") || lit.starts_with("deepseek_"))
                && !lit.ends_with("_bucket")
                && lit
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == ':')
            {
                names.insert(lit.to_string());
            }
        }
    }
    assert!(names.contains("vllm:kv_cache_usage_perc"));
    assert!(names.contains("deepseek_operator_reconcile_errors_total"));
    names
}

/// PromQL words that are not metric names in our expressions.
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "avg",
    "max",
    "min",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "rate",
    "irate",
    "increase",
    "changes",
    "histogram_quantile",
    "vector",
    "label_values",
    "le",
    "namespace",
    "deployment",
    "group",
    "pod",
    "error",
    "reason",
    "finished_reason",
    "direction",
    "model_name",
    "offset",
];

/// Metric names in a PromQL expression: identifiers outside label matchers, ranges and
/// strings that are not PromQL words or numbers. Histogram series suffixes are stripped.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth_braces = 0;
    let mut depth_brackets = 0;
    let mut in_string = false;
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty()
            && !word.starts_with('$')
            && !word.chars().next().unwrap().is_ascii_digit()
            && !PROMQL_WORDS.contains(&word.as_str())
        {
            let mut name = word.clone();
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    name = base.to_string();
                }
            }
            out.push(name);
        }
        word.clear();
    };
    for c in expr.chars() {
        if in_string {
            in_string = c != '"';
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => depth_braces += 1,
            '}' => depth_braces -= 1,
            '[' => depth_brackets += 1,
            ']' => depth_brackets -= 1,
            c if depth_braces == 0
                && depth_brackets == 0
                && (c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '$' || c == '.') =>
            {
                word.push(c);
                continue;
            }
            _ => {}
        }
        flush(&mut word, &mut out);
    }
    flush(&mut word, &mut out);
    out
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket{namespace=~\"$ns\"}[$__rate_interval])))"
        ),
        ["vllm:time_to_first_token_seconds"]
    );
    assert_eq!(
        metric_names("(max(deepseek_operator_leader) or vector(0)) < 1"),
        ["deepseek_operator_leader"]
    );
}

fn alerts(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in doc["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            out.push((
                r["alert"].as_str().expect("alert name").to_string(),
                r["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    out
}

#[test]
fn the_alerts_cover_errors_degraded_groups_and_limited_scaling_on_exported_metrics() {
    let chart = yaml_to_json(&read_repo_file(&format!("{CHART}/files/alerts.yaml"))).unwrap();
    let kustomize = yaml_to_json(&read_repo_file("deploy/monitoring/prometheusrule.yaml")).unwrap();
    assert_eq!(
        kustomize["spec"], chart,
        "deploy/monitoring and the chart's alerts differ"
    );
    let exported = exported_metrics();
    let list = alerts(&chart);
    for (alert, expr) in &list {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{alert}: no metric in {expr}");
        for n in names {
            assert!(
                exported.contains(&n),
                "{alert} uses {n}, which nothing exports"
            );
        }
    }
    let names: BTreeSet<&str> = list.iter().map(|(a, _)| a.as_str()).collect();
    for needed in [
        "DeepSeekOperatorReconcileErrors",
        "DeepSeekGroupDegraded",
        "DeepSeekCapacityLimited",
    ] {
        assert!(names.contains(needed), "missing alert {needed}");
    }
}

#[test]
fn the_dashboard_is_valid_json_and_queries_only_exported_metrics() {
    let text = read_repo_file("deploy/grafana/deepseek-serving.json");
    let dash: Value = serde_json::from_str(&text).expect("valid JSON");
    let exported = exported_metrics();
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push((
                p["title"].as_str().unwrap_or("?").to_string(),
                t["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            exprs.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        for n in metric_names(expr) {
            assert!(exported.contains(&n), "{title}: {n} is not exported");
            used.insert(n);
        }
    }
    // The panels the operations guide promises.
    for needed in [
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds",
        "vllm:kv_cache_usage_perc",
        "vllm:num_requests_waiting",
        "deepseek_engine_ready",
        "deepseek_operator_reconcile_errors_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    let ids: Vec<i64> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    let unique: BTreeSet<i64> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "panel ids are unique");
}

// ---------------------------------------------------------------------------------------------
// docs/INSTALL.md references

const REF_START: &str =
    "<!-- crd-reference:start (generated from crds/ by e2e/tests/manifests.rs) -->";
const REF_END: &str = "<!-- crd-reference:end -->";
/// Fields of Kubernetes types embedded in the spec; documented by `kubectl explain`.
const EMBEDDED: &[&str] = &["spec.affinity", "spec.resources"];

fn first_sentence(description: &str) -> String {
    let one_line = description.split_whitespace().collect::<Vec<_>>().join(" ");
    let end = one_line.find(". ").map(|i| i + 1).unwrap_or(one_line.len());
    one_line[..end].replace('|', "\\|")
}

fn reference_rows(path: &str, schema: &Value, depth: usize, rows: &mut Vec<String>) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    for (name, s) in props {
        let p = format!("{path}.{name}");
        let ty = match (
            s["type"].as_str(),
            s["x-kubernetes-int-or-string"].as_bool(),
        ) {
            (_, Some(true)) => "int or string".to_string(),
            (Some("array"), _) => format!("[]{}", s["items"]["type"].as_str().unwrap_or("object")),
            (Some(t), _) => t.to_string(),
            (None, _) => "any".to_string(),
        };
        // An object's default repeats its fields' defaults, listed on their own rows.
        let default = if s["default"].is_null() || s["default"].is_object() {
            String::new()
        } else {
            format!("`{}`", s["default"])
        };
        let desc = first_sentence(s["description"].as_str().unwrap_or(""));
        rows.push(format!("| `{p}` | {ty} | {default} | {desc} |"));
        if depth < 2 && !EMBEDDED.contains(&p.as_str()) {
            reference_rows(&p, s, depth + 1, rows);
        }
    }
}

fn crd_reference() -> String {
    let crd = yaml_to_json(&read_repo_file(CRD_FILE)).unwrap();
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"];
    let mut rows = vec![
        "| field | type | default | description |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    reference_rows("spec", &schema["spec"], 1, &mut rows);
    reference_rows("status", &schema["status"], 2, &mut rows);
    rows.join("\n")
}

#[test]
fn the_crd_reference_in_install_md_is_generated_from_the_current_crd() {
    let path = repo_root().join("docs/INSTALL.md");
    let text = std::fs::read_to_string(&path).expect("docs/INSTALL.md");
    let start = text.find(REF_START).expect("reference start marker") + REF_START.len();
    let end = text.find(REF_END).expect("reference end marker");
    let want = format!("\n{}\n", crd_reference());
    if text[start..end] != want {
        if std::env::var_os("UPDATE_DOCS").is_some() {
            let updated = format!("{}{}{}", &text[..start], want, &text[end..]);
            std::fs::write(&path, updated).unwrap();
        } else {
            panic!(
                "docs/INSTALL.md's CRD reference is out of date; regenerate it with\n  UPDATE_DOCS=1 cargo test -p deepseek-e2e --test manifests"
            );
        }
    }
}

#[test]
fn install_md_lists_every_exported_metric() {
    let text = read_repo_file("docs/INSTALL.md");
    for name in exported_metrics() {
        assert!(
            text.contains(&format!("`{name}`")),
            "docs/INSTALL.md's metrics reference lacks `{name}`"
        );
    }
}

/// Builds each kustomization with `kubectl kustomize` where kubectl is installed (it needs no
/// cluster), so transformer and patch mistakes show up before anyone applies them.
#[test]
fn the_kustomizations_build_with_kubectl_where_it_is_installed() {
    let Ok(version) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        println!("skipped: kubectl is not installed");
        return;
    };
    assert!(version.status.success());
    let expect: [(&str, &[&str]); 3] = [
        (
            "deploy",
            &[
                "Namespace",
                "CustomResourceDefinition",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding",
                "Deployment",
                "Service",
            ],
        ),
        ("deploy/cpu-demo", &["DeepSeekDeployment", "Deployment"]),
        (
            "deploy/monitoring",
            &["ServiceMonitor", "PodMonitor", "PrometheusRule"],
        ),
    ];
    for (dir, kinds) in expect {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(repo_root().join(dir))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let docs = yaml_documents(&String::from_utf8_lossy(&out.stdout)).unwrap();
        let built: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for kind in kinds {
            assert!(built.contains(kind), "{dir} builds no {kind}: {built:?}");
        }
        if dir == "deploy/cpu-demo" {
            let operator = docs
                .iter()
                .find(|d| d["kind"] == "Deployment")
                .expect("operator Deployment");
            assert_eq!(operator["metadata"]["namespace"], "deepseek-system");
            assert_eq!(operator["spec"]["replicas"], 1, "the demo runs one replica");
            let dsd = docs
                .iter()
                .find(|d| d["kind"] == "DeepSeekDeployment")
                .unwrap();
            assert_eq!(dsd["metadata"]["namespace"], "deepseek-demo");
        }
    }
}

/// The overlay docs/INSTALL.md shows for pushing to one's own registry: its `images:` entries
/// rewrite the operator's container image and, through `deploy/base/engine-image.yaml`, the
/// engine image of the DeepSeekDeployments it builds.
#[test]
fn an_images_overlay_points_the_operator_and_the_engines_at_another_registry() {
    let Ok(version) = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        println!("skipped: kubectl is not installed");
        return;
    };
    assert!(version.status.success());
    let overlay = std::env::temp_dir().join(format!("deepseek-overlay-{}", std::process::id()));
    std::fs::create_dir_all(&overlay).unwrap();
    let overlay = overlay.canonicalize().unwrap();
    // kustomize takes only relative paths to other kustomizations.
    let up = "../".repeat(overlay.components().count() - 1);
    let root = repo_root().canonicalize().unwrap();
    let to_demo = format!(
        "{up}{}/deploy/cpu-demo",
        root.to_str().unwrap().trim_start_matches('/')
    );
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {to_demo}
images:
  - name: ghcr.io/deepseek-serving/deepseek-operator
    newName: registry.example.com/deepseek/deepseek-operator
  - name: ghcr.io/deepseek-serving/deepseek-engine
    newName: registry.example.com/deepseek/deepseek-engine
"
        ),
    )
    .unwrap();
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&overlay);
    assert!(
        out.status.success(),
        "kubectl kustomize: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = yaml_documents(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let operator = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(
        operator["spec"]["template"]["spec"]["containers"][0]["image"],
        format!("registry.example.com/deepseek/deepseek-operator:{VERSION}")
    );
    let dsd = docs
        .iter()
        .find(|d| d["kind"] == "DeepSeekDeployment")
        .unwrap();
    assert_eq!(
        dsd["spec"]["engine"]["image"],
        format!("registry.example.com/deepseek/deepseek-engine:{VERSION}")
    );
}

/// The chart's NOTES.txt links to no web address (no chart repository or release is
/// published) and every repository path it tells the user to apply exists.
#[test]
fn the_chart_notes_name_only_files_that_exist() {
    let notes = read_repo_file(&format!("{CHART}/templates/NOTES.txt"));
    for scheme in ["http://", "https://"] {
        assert!(!notes.contains(scheme), "NOTES.txt links to a web address");
    }
    let mut checked = 0;
    for word in notes.split(|c: char| c.is_whitespace() || c == ',' || c == '(' || c == ')') {
        let word = word.trim_end_matches(['.', ':', ';']);
        let (base, rel) = if word.starts_with("templates/") {
            (repo_root().join(CHART), word)
        } else if ["crds/", "examples/", "docs/"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            (repo_root(), word)
        } else {
            continue;
        };
        assert!(
            base.join(rel).exists(),
            "NOTES.txt names {word}, which does not exist"
        );
        checked += 1;
    }
    assert!(checked >= 3, "NOTES.txt names only {checked} files");
}
