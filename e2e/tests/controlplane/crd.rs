//! The CRD on a real apiserver: structural schema, CEL rules within the cost budget, and the
//! messages a bad spec is refused with.

use deepseek_e2e::{FIELD_MANAGER, read_repo_file, yaml_to_json};
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};

use crate::support::{CRD_FILE, Shared};

const NS: &str = "e2e-crd";

pub async fn the_crd_installs_by_server_side_apply_and_is_established(env: Shared) {
    // Server-side apply of the file as it is; the apiserver compiles every CEL rule and refuses
    // the whole CRD when one exceeds the cost budget.
    env.crd()
        .await
        .expect("the CRD installs and is established");
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    let name = "deepseekdeployments.serving.deepseek.dev";
    let before = crds.get(name).await.expect("CRD");
    let status = before.status.clone().expect("CRD status");
    let accepted = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "NamesAccepted")
        .map(|c| c.status.clone());
    assert_eq!(accepted.as_deref(), Some("True"), "{status:?}");

    // Applying the same file again changes nothing: the apiserver's defaulting and our file
    // agree, so the stored object's generation stays.
    let doc = yaml_to_json(&read_repo_file(CRD_FILE)).expect("CRD file parses");
    let again = crds
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&doc),
        )
        .await
        .expect("re-apply");
    assert_eq!(again.metadata.generation, before.metadata.generation);
}

/// Every CEL rule message in the CRD, with the path of the schema node holding it.
fn cel_messages(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for r in rules {
            let m = r["message"].as_str().expect("every rule has a message");
            out.push((
                path.to_string(),
                m.split_whitespace().collect::<Vec<_>>().join(" "),
            ));
        }
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            cel_messages(v, &format!("{path}.{k}"), out);
        }
    }
    if let Some(items) = schema.get("items") {
        cel_messages(items, &format!("{path}[]"), out);
    }
}

fn tiny(name: &str) -> Value {
    let mut v = serde_json::to_value(crate::support::tiny_example(NS)).expect("example");
    v["metadata"] = json!({"name": name, "namespace": NS});
    v
}

/// A bad spec: what is changed, and what the refusal must say.
struct Case {
    what: &'static str,
    name: String,
    edit: fn(&mut Value),
    says: Vec<&'static str>,
    /// Sent by create, as `kubectl create` and client-side `kubectl apply` do. Server-side
    /// apply refuses a value of the wrong type or an unknown field before validation, with
    /// a message that names the field but not the schema's wording.
    create: bool,
}

fn case(what: &'static str, edit: fn(&mut Value), says: Vec<&'static str>) -> Case {
    Case {
        what,
        name: "bad".into(),
        edit,
        says,
        create: false,
    }
}

fn created(mut c: Case) -> Case {
    c.create = true;
    c
}

/// Creates a deployment from raw JSON (a typed object cannot carry a bad field) with strict
/// field validation, as `kubectl create` does.
async fn create_raw(client: &kube::Client, v: &Value) -> kube::Result<()> {
    let req = http::Request::post(format!(
        "/apis/serving.deepseek.dev/v1alpha1/namespaces/{NS}/deepseekdeployments?fieldValidation=Strict"
    ))
    .header("Content-Type", "application/json")
    .body(serde_json::to_vec(v).expect("JSON"))
    .expect("request");
    client.request::<Value>(req).await.map(|_| ())
}

pub async fn bad_deployments_are_refused_with_the_messages_the_docs_promise(env: Shared) {
    env.crd().await.expect("CRD");
    env.namespace(NS).await.expect("namespace");
    let crd = yaml_to_json(&read_repo_file(CRD_FILE)).expect("CRD file parses");
    let mut rules = Vec::new();
    cel_messages(
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"],
        "",
        &mut rules,
    );

    let mut cases = vec![
        case(
            "expertParallel not a multiple of gpusPerPod",
            |v| v["spec"]["parallelism"] = json!({"expertParallel": 3, "gpusPerPod": 2}),
            vec!["parallelism.expertParallel must be a multiple of parallelism.gpusPerPod"],
        ),
        case(
            "a group of 65 pods",
            |v| v["spec"]["parallelism"] = json!({"expertParallel": 130, "gpusPerPod": 2}),
            vec!["a group may have at most 64 pods"],
        ),
        case(
            "minReplicas above maxReplicas",
            |v| v["spec"]["autoscaling"] = json!({"minReplicas": 3, "maxReplicas": 2}),
            vec!["autoscaling.minReplicas must not be greater than autoscaling.maxReplicas"],
        ),
        case(
            "metrics timeout above the poll interval",
            |v| {
                v["spec"]["autoscaling"] =
                    json!({"metricsTimeoutSeconds": 30, "pollIntervalSeconds": 10})
            },
            vec![
                "autoscaling.metricsTimeoutSeconds must not be greater than autoscaling.pollIntervalSeconds",
            ],
        ),
        case(
            "an https Prometheus URL",
            |v| {
                v["spec"]["autoscaling"] = json!({"prometheus": {"url": "https://prometheus:9090"}})
            },
            vec!["autoscaling.prometheus.url must be an http:// URL"],
        ),
        case(
            "an unknown model source scheme",
            |v| v["spec"]["model"]["source"] = json!("ftp://models/deepseek"),
            vec!["model.source must be hf://ORG/NAME[@REVISION]"],
        ),
        case(
            "credentials for the built-in model",
            |v| v["spec"]["model"]["credentialsSecret"] = json!("hf-token"),
            vec!["model.credentialsSecret is only used with hf:// and s3:// sources"],
        ),
        case(
            "an endpoint picker that is not a Service name",
            |v| v["spec"]["inferencePool"] = json!({"endpointPicker": {"name": "EPP_Service"}}),
            vec!["inferencePool.endpointPicker.name must be a Service name"],
        ),
        case(
            "an InferencePool name that is not a DNS label",
            |v| {
                v["spec"]["inferencePool"] =
                    json!({"name": "-pool", "endpointPicker": {"name": "epp"}})
            },
            vec!["inferencePool.name must be a DNS label"],
        ),
        // Schema violations: ranges, enums, types, unknown fields.
        case(
            "negative replicas",
            |v| v["spec"]["replicas"] = json!(-1),
            vec!["spec.replicas", "greater than or equal to 0"],
        ),
        case(
            "an unknown failure policy",
            |v| v["spec"]["groupFailurePolicy"] = json!("Sometimes"),
            vec![
                "spec.groupFailurePolicy",
                "Unsupported value: \"Sometimes\"",
            ],
        ),
        created(case(
            "a string for an integer",
            |v| v["spec"]["parallelism"]["expertParallel"] = json!("two"),
            vec!["spec.parallelism.expertParallel", "must be of type integer"],
        )),
        case(
            "a string for an integer, applied",
            |v| v["spec"]["parallelism"]["expertParallel"] = json!("two"),
            vec![".spec.parallelism.expertParallel"],
        ),
        case(
            "a model without a source",
            |v| v["spec"]["model"] = json!({}),
            vec!["spec.model.source", "Required value"],
        ),
        created(case(
            "an unknown field",
            |v| v["spec"]["replicaz"] = json!(2),
            vec!["unknown field \"spec.replicaz\""],
        )),
        case(
            "an unknown field, applied",
            |v| v["spec"]["replicaz"] = json!(2),
            vec![".spec.replicaz"],
        ),
    ];
    let mut long = case(
        "a name over 40 characters",
        |_| {},
        vec!["metadata.name must be at most 40 characters"],
    );
    long.name = "a".repeat(41);
    cases.push(long);

    // One case per CEL rule of the CRD.
    for (path, message) in &rules {
        assert!(
            cases
                .iter()
                .any(|c| c.says.iter().any(|s| message.starts_with(s))),
            "no case for the CEL rule at {path}: {message}"
        );
    }

    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), NS);
    let mut failures = Vec::new();
    for c in &cases {
        let mut v = tiny(&c.name);
        (c.edit)(&mut v);
        // Strict field validation, as kubectl uses by default.
        let answer = if c.create {
            create_raw(&env.admin, &v).await
        } else {
            let pp = PatchParams::apply(FIELD_MANAGER)
                .force()
                .validation_strict();
            dsds.patch(&c.name, &pp, &Patch::Apply(&v))
                .await
                .map(|_| ())
        };
        match answer {
            Ok(()) => failures.push(format!("{}: accepted", c.what)),
            Err(kube::Error::Api(e)) => {
                let missing: Vec<_> = c.says.iter().filter(|s| !e.message.contains(*s)).collect();
                // Server-side apply answers 500 for a body it cannot type (upstream behavior);
                // a refusal that names the field is what matters there.
                let code_ok = matches!(e.code, 400 | 422) || (!c.create && e.code == 500);
                if !code_ok || !missing.is_empty() {
                    failures.push(format!(
                        "{}: answered {} {:?}, missing {missing:?}",
                        c.what, e.code, e.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", c.what)),
        }
    }
    // The example itself is accepted.
    let good = tiny("tiny");
    let pp = PatchParams::apply(FIELD_MANAGER)
        .force()
        .validation_strict();
    if let Err(e) = dsds.patch("tiny", &pp, &Patch::Apply(&good)).await {
        failures.push(format!("the tiny example was refused: {e}"));
    }
    env.drop_namespace(NS).await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
