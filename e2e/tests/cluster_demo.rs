//! The CPU demo on a real cluster, installed the way users install it: the kustomize base
//! (namespace, CRD, RBAC, operator Deployment) applied document by document with server-side
//! apply, then deploy/cpu-demo/demo.yaml. It waits for `Available`, sends a chat request
//! through the serving Service (via the API server's service proxy), scales to two groups and
//! back, deletes a pod and waits for the group to serve again, deletes the deployment and
//! checks that garbage collection removes everything it owned, and finally removes the
//! operator.
//!
//! It needs the operator and engine images in the cluster (for kind: `kind load docker-image`),
//! so it runs only with `DEEPSEEK_E2E_DEMO=1` and a reachable cluster in `KUBECONFIG`; otherwise
//! it prints why it skipped. `DEEPSEEK_E2E_OPERATOR_IMAGE` and `DEEPSEEK_E2E_ENGINE_IMAGE`
//! override the images. See docs/INSTALL.md, "End-to-end tests on kind".

use std::time::Duration;

use deepseek_e2e::{cluster, read_repo_file, wait_for, yaml_documents};
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{GroupVersionKind, Request};
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, ResourceExt};

const MANAGER: &str = "deepseek-e2e";
const DEMO_NS: &str = "deepseek-demo";
const OPERATOR_NS: &str = "deepseek-system";
const NAME: &str = "tiny";

/// Server-side applies every document of a manifest file, in order.
async fn apply_file(client: &Client, relative: &str, edit: impl Fn(&mut serde_json::Value)) {
    let docs = yaml_documents(&read_repo_file(relative)).expect("manifest parses");
    for mut doc in docs {
        edit(&mut doc);
        let (group, version) = match doc["apiVersion"].as_str().unwrap().rsplit_once('/') {
            Some((g, v)) => (g.to_string(), v.to_string()),
            None => (
                String::new(),
                doc["apiVersion"].as_str().unwrap().to_string(),
            ),
        };
        let gvk = GroupVersionKind::gvk(&group, &version, doc["kind"].as_str().unwrap());
        // A kind defined by a CRD applied just before needs a moment to be served.
        let (resource, caps) = wait_for(Duration::from_secs(60), || async {
            pinned_kind(client, &gvk).await.ok()
        })
        .await
        .unwrap_or_else(|| panic!("{relative}: {gvk:?} is not served"));
        let obj: DynamicObject = serde_json::from_value(doc.clone()).unwrap();
        let name = obj.name_any();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &resource),
            Scope::Namespaced => {
                let ns = obj.namespace().unwrap_or_else(|| OPERATOR_NS.into());
                Api::namespaced_with(client.clone(), &ns, &resource)
            }
        };
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{relative}: applying {gvk:?} {name}: {e}"));
    }
}

fn condition(dsd: &DeepSeekDeployment, type_: &str) -> Option<String> {
    dsd.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.status.clone())
}

async fn wait_available(dsds: &Api<DeepSeekDeployment>, ready: i32, timeout: Duration) {
    let ok = wait_for(timeout, || async {
        let d = dsds.get(NAME).await.ok()?;
        let s = d.status.as_ref()?;
        (condition(&d, "Available").as_deref() == Some("True") && s.ready_replicas == ready)
            .then_some(())
    })
    .await;
    if ok.is_none() {
        let d = dsds.get(NAME).await.ok();
        panic!(
            "dsd/{NAME} did not reach {ready} ready group(s): {:#?}",
            d.and_then(|d| d.status)
        );
    }
}

/// A chat request through the serving Service, by the API server's service proxy.
async fn chat(client: &Client) -> Result<serde_json::Value, String> {
    let body = serde_json::json!({
        "model": NAME,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 8
    });
    let path =
        format!("/api/v1/namespaces/{DEMO_NS}/services/{NAME}:8000/proxy/v1/chat/completions");
    let req = Request::new(path)
        .create(&PostParams::default(), serde_json::to_vec(&body).unwrap())
        .map_err(|e| e.to_string())?;
    let text = client.request_text(req).await.map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
}

#[tokio::test]
async fn the_cpu_demo_installs_serves_scales_heals_and_is_garbage_collected() {
    if std::env::var_os("DEEPSEEK_E2E_DEMO").is_none() {
        println!(
            "skipped: set DEEPSEEK_E2E_DEMO=1 to install the operator and run the CPU demo on the cluster in KUBECONFIG (its images must be loadable there)"
        );
        return;
    }
    let client = match cluster().await {
        Ok(c) => c,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    let operator_image = std::env::var("DEEPSEEK_E2E_OPERATOR_IMAGE").ok();
    let engine_image = std::env::var("DEEPSEEK_E2E_ENGINE_IMAGE").ok();

    // The kustomize base, in its kustomization's order, with the images the cluster has.
    for file in [
        "namespace.yaml",
        "crd.yaml",
        "rbac.yaml",
        "deployment.yaml",
        "service.yaml",
    ] {
        apply_file(&client, &format!("deploy/base/{file}"), |doc| {
            if doc["kind"] == "Deployment"
                && let Some(image) = &operator_image
            {
                doc["spec"]["template"]["spec"]["containers"][0]["image"] = image.clone().into();
                doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] =
                    "IfNotPresent".into();
            }
        })
        .await;
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), OPERATOR_NS);
    let up = wait_for(Duration::from_secs(180), || async {
        let d = deployments.get("deepseek-operator").await.ok()?;
        (d.status?.available_replicas.unwrap_or(0) >= 1).then_some(())
    })
    .await;
    assert!(up.is_some(), "the operator Deployment became available");

    apply_file(&client, "deploy/cpu-demo/demo.yaml", |doc| {
        if doc["kind"] == "DeepSeekDeployment"
            && let Some(image) = &engine_image
        {
            doc["spec"]["engine"]["image"] = image.clone().into();
        }
    })
    .await;
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(client.clone(), DEMO_NS);
    wait_available(&dsds, 1, Duration::from_secs(600)).await;

    let reply = wait_for(Duration::from_secs(60), || async {
        chat(&client).await.ok()
    })
    .await
    .expect("a chat reply through the Service");
    assert_eq!(
        reply["choices"][0]["message"]["role"], "assistant",
        "{reply}"
    );

    // Scale out and back through the scale subresource.
    let scale = |n: i32| {
        let dsds = dsds.clone();
        async move {
            dsds.patch_scale(
                NAME,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("scale subresource")
        }
    };
    scale(2).await;
    wait_available(&dsds, 2, Duration::from_secs(600)).await;
    scale(1).await;
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), DEMO_NS);
    let gone = wait_for(Duration::from_secs(120), || async {
        matches!(stss.get_opt(&format!("{NAME}-g1")).await, Ok(None)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "group 1 is deleted after scaling back to 1");

    // Lose a rank: the group comes back and serves again.
    let pods: Api<Pod> = Api::namespaced(client.clone(), DEMO_NS);
    let victim = format!("{NAME}-g0-1");
    let old_uid = pods.get(&victim).await.expect("rank 1 pod").uid();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("pod deleted");
    let replaced = wait_for(Duration::from_secs(120), || async {
        let p = pods.get(&victim).await.ok()?;
        (p.uid() != old_uid).then_some(())
    })
    .await;
    assert!(replaced.is_some(), "the lost rank's pod is recreated");
    wait_available(&dsds, 1, Duration::from_secs(600)).await;
    let reply = wait_for(Duration::from_secs(120), || async {
        chat(&client).await.ok()
    })
    .await
    .expect("a chat reply after the group came back");
    assert_eq!(reply["choices"][0]["message"]["role"], "assistant");

    // Delete: everything the deployment owned is garbage-collected.
    dsds.delete(NAME, &DeleteParams::foreground())
        .await
        .expect("dsd deleted");
    let owned = ListParams::default().labels(&format!("app.kubernetes.io/instance={NAME}"));
    let services: Api<Service> = Api::namespaced(client.clone(), DEMO_NS);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), DEMO_NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), DEMO_NS);
    let collected = wait_for(Duration::from_secs(180), || async {
        let left = stss.list(&owned).await.ok()?.items.len()
            + services.list(&owned).await.ok()?.items.len()
            + config_maps.list(&owned).await.ok()?.items.len()
            + pdbs.list(&owned).await.ok()?.items.len()
            + pods.list(&owned).await.ok()?.items.len();
        (left == 0).then_some(())
    })
    .await;
    assert!(collected.is_some(), "owned objects are garbage-collected");

    // Leave the cluster as found, except the CRD.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(DEMO_NS, &DeleteParams::default()).await;
    let _ = namespaces
        .delete(OPERATOR_NS, &DeleteParams::default())
        .await;
}
