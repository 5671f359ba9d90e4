//! `spec.inferencePool`: the Gateway API Inference Extension's InferencePool over the serving
//! pods. First without the InferencePool CRD (the condition says so and the groups serve
//! anyway), then with the upstream CRD installed from the pinned Go module (the operator makes
//! the pool; it selects exactly the rank-0 pods), then without the field (the pool goes), and
//! last the deployment deleted (the garbage collector takes the pool with it).

use std::path::PathBuf;
use std::process::Command;

use deepseek_e2e::{FIELD_MANAGER, apply_manifest, read_repo_file, repo_root};
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::wait::await_condition;
use serde_json::json;

use crate::support::{
    LONG, Shared, available_with, condition, established, tiny_example, wait_dsd, within,
};

const NS: &str = "e2e-pool";
const NAME: &str = "tiny";
const MODULE: &str = "sigs.k8s.io/gateway-api-inference-extension";
const POOL_CRD: &str = "inferencepools.inference.networking.k8s.io";
const CONDITION: &str = "InferencePoolReady";

/// The InferencePool CRD of the module version e2e/controlplane/go.mod pins, from the Go
/// module cache (`go mod download` fetches it when missing); `Err` says why it is not there.
fn upstream_crd() -> Result<PathBuf, String> {
    let dir = repo_root().join("e2e/controlplane");
    let go_mod = read_repo_file("e2e/controlplane/go.mod");
    let version = go_mod
        .lines()
        .map(str::split_whitespace)
        .find_map(|mut w| (w.next() == Some(MODULE)).then(|| w.next()).flatten())
        .ok_or_else(|| format!("e2e/controlplane/go.mod does not require {MODULE}"))?;
    let out = Command::new("go")
        .args(["mod", "download", "-json", &format!("{MODULE}@{version}")])
        .current_dir(&dir)
        .env("GOFLAGS", "-mod=readonly")
        .output()
        .map_err(|e| format!("Go is not installed ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "go mod download {MODULE}@{version}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("go mod download -json: {e}"))?;
    let module = info["Dir"]
        .as_str()
        .ok_or("go mod download -json gave no Dir")?;
    Ok(PathBuf::from(module)
        .join("config/crd/bases/inference.networking.k8s.io_inferencepools.yaml"))
}

fn pool_resource() -> ApiResource {
    deepseek_operator::render::inference_pool::inference_pool_resource()
}

fn with_pool(ns: &str) -> DeepSeekDeployment {
    let mut dsd = tiny_example(ns);
    dsd.spec.inference_pool =
        Some(serde_json::from_value(json!({"endpointPicker": {"name": "tiny-epp"}})).unwrap());
    dsd
}

fn pool_is(status: &'static str, reason: &'static str) -> impl Fn(&DeepSeekDeployment) -> bool {
    move |d| {
        d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
            && condition(d, CONDITION) == Some((status.into(), reason.into()))
    }
}

async fn apply(dsds: &Api<DeepSeekDeployment>, dsd: &DeepSeekDeployment) {
    dsds.patch(
        NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(dsd),
    )
    .await
    .expect("the deployment applies");
}

async fn pool_gone(pools: &Api<DynamicObject>, what: &str) {
    within(
        LONG,
        what,
        await_condition(pools.clone(), NAME, |p: Option<&DynamicObject>| p.is_none()),
    )
    .await
    .expect(what);
}

pub async fn the_inference_pool_waits_for_its_crd_selects_the_serving_pods_and_goes_with_the_field(
    env: Shared,
) {
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    if crds.get_opt(POOL_CRD).await.expect("read CRDs").is_some() {
        panic!("{POOL_CRD} is installed already; this test starts without it");
    }
    env.operator().await.expect("the operator runs");
    env.namespace(NS).await.expect("namespace");
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), NS);

    // (a) No CRD: the condition says so, once, and the groups serve anyway.
    apply(&dsds, &with_pool(NS)).await;
    let missing = pool_is("False", "InferencePoolCRDMissing");
    wait_dsd(
        &dsds,
        NAME,
        "InferencePoolCRDMissing and Available",
        move |d| missing(d) && available_with(1)(d),
    )
    .await
    .expect("the missing CRD is reported and the groups are Available");
    let events: Api<Event> = Api::namespaced(env.admin.clone(), NS);
    let warned: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("InferencePoolCRDMissing"))
        .collect();
    assert_eq!(warned.len(), 1, "one Event: {warned:?}");
    assert_eq!(warned[0].type_.as_deref(), Some("Warning"));

    // (b) The upstream CRD, then the pool.
    let crd = match upstream_crd() {
        Ok(path) => std::fs::read_to_string(&path).expect("the module holds the CRD"),
        Err(reason) => {
            println!("skipped the InferencePool part of this test: {reason}");
            env.drop_namespace(NS).await;
            return;
        }
    };
    apply_manifest(&env.admin, &crd, "default", |_| {})
        .await
        .expect("the InferencePool CRD applies");
    within(
        LONG,
        "the InferencePool CRD is established",
        await_condition(crds.clone(), POOL_CRD, established()),
    )
    .await
    .expect("established");
    let dsd = wait_dsd(
        &dsds,
        NAME,
        "InferencePoolReady",
        pool_is("True", "InferencePoolApplied"),
    )
    .await
    .expect("the operator makes the pool once the CRD is served");
    let pools: Api<DynamicObject> = Api::namespaced_with(env.admin.clone(), NS, &pool_resource());
    let pool = pools.get(NAME).await.expect("the pool exists");
    let spec = &pool.data["spec"];
    assert_eq!(spec["targetPorts"], json!([{"number": 8000}]));
    assert_eq!(
        spec["endpointPickerRef"],
        json!({"group": "", "kind": "Service", "name": "tiny-epp", "port": {"number": 9002},
               "failureMode": "FailClose"})
    );
    let owner = &pool.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(Some(&owner.uid), dsd.metadata.uid.as_ref());
    // The selector picks exactly the rank-0 pods of this deployment's groups.
    let labels = spec["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let selector: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect();
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), NS);
    let selected = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await
        .expect("pods");
    let mut selected: Vec<String> = selected
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    selected.sort();
    let all = pods
        .list(&ListParams::default().labels("app.kubernetes.io/instance=tiny"))
        .await
        .expect("pods");
    let mut leaders: Vec<String> = all
        .items
        .iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("apps.kubernetes.io/pod-index"))
                == Some(&"0".to_string())
        })
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    leaders.sort();
    assert!(
        all.items.len() > leaders.len(),
        "the groups have worker ranks too"
    );
    assert_eq!(selected, leaders, "the pool selects the rank-0 pods");
    assert_eq!(selected, ["tiny-g0-0"]);

    // (c) The field removed: the pool and its condition go.
    apply(&dsds, &tiny_example(NS)).await;
    pool_gone(&pools, "the pool is deleted with the field").await;
    wait_dsd(&dsds, NAME, "no InferencePoolReady condition", |d| {
        d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
            && condition(d, CONDITION).is_none()
    })
    .await
    .expect("the condition goes with the field");

    // The field back, then the deployment deleted: the garbage collector takes the pool.
    apply(&dsds, &with_pool(NS)).await;
    wait_dsd(
        &dsds,
        NAME,
        "InferencePoolReady again",
        pool_is("True", "InferencePoolApplied"),
    )
    .await
    .expect("the pool is made again");
    dsds.delete(NAME, &DeleteParams::default())
        .await
        .expect("delete");
    pool_gone(&pools, "the pool is garbage-collected with its deployment").await;
    env.drop_namespace(NS).await;
}
