//! The tiny CPU example served end to end: groups of real engine processes run by the node
//! agent, status and printer columns, a chat completion through the leader pod (and one from
//! the bundled trained model), a killed rank, the scale subresource, and garbage collection.

use deepseek_e2e::FIELD_MANAGER;
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::support::{
    LONG, Shared, available_with, chat, chat_with, engine_pid, leader, pod_ready, tiny_example,
    uids, wait_dsd, wait_list,
};

const NAME: &str = "tiny";

/// Applies the tiny example in a fresh namespace, waits until it is Available and returns its
/// API handle.
async fn tiny_available(env: &Shared, ns: &str) -> Api<DeepSeekDeployment> {
    available(env, ns, tiny_example(ns)).await
}

/// Applies `dsd` (named [`NAME`]) in a fresh namespace and waits until it is Available.
async fn available(env: &Shared, ns: &str, dsd: DeepSeekDeployment) -> Api<DeepSeekDeployment> {
    env.operator().await.expect("the operator runs");
    env.namespace(ns).await.expect("namespace");
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), ns);
    dsds.patch(
        NAME,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&dsd),
    )
    .await
    .expect("the example applies");
    wait_dsd(
        &dsds,
        NAME,
        "the example becomes Available",
        available_with(1),
    )
    .await
    .expect("Available");
    dsds
}

/// A chat completion answered by the leader of `group`.
async fn chats(client: &Client, ns: &str, group: i32) {
    let pod = leader(client, ns, NAME, group).await.expect("leader pod");
    let ip = pod.status.and_then(|s| s.pod_ip).expect("leader pod IP");
    let reply = chat(&ip).await.expect("chat completion");
    assert_eq!(reply["object"], "chat.completion", "{reply}");
    assert!(
        reply["usage"]["completion_tokens"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "{reply}"
    );
}

/// The printer columns, as the apiserver computes them for `kubectl get dsd`.
async fn table_row(client: &Client, ns: &str) -> (Vec<String>, Vec<serde_json::Value>) {
    let req = http::Request::get(format!(
        "/apis/serving.deepseek.dev/v1alpha1/namespaces/{ns}/deepseekdeployments/{NAME}"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("request");
    let table: serde_json::Value = client.request(req).await.expect("table");
    let columns = table["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let cells = table["rows"][0]["cells"]
        .as_array()
        .expect("one row")
        .clone();
    (columns, cells)
}

pub async fn the_tiny_example_serves_chat_through_the_leader_pod(env: Shared) {
    let ns = "e2e-serve";
    let dsds = tiny_available(&env, ns).await;
    let d = dsds.get(NAME).await.expect("deployment");
    let s = d.status.clone().expect("status");
    assert_eq!(
        (s.replicas, s.ready_replicas, s.desired_replicas),
        (1, 1, 1)
    );
    assert_eq!(s.pods_per_group, 2);

    let (columns, cells) = table_row(&env.admin, ns).await;
    assert_eq!(
        columns,
        [
            "Name", "Replicas", "Ready", "Desired", "KV%", "Queue", "Age"
        ]
    );
    assert_eq!(cells[0], NAME);
    assert_eq!(&cells[1..4], &[json!(1), json!(1), json!(1)], "{cells:?}");

    // Both ranks run as engine processes, each on its own address.
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), ns);
    let group = wait_list(
        pods,
        "app.kubernetes.io/instance=tiny,serving.deepseek.dev/group=0",
        LONG,
        "both ranks are ready",
        |ps: &[Pod]| (ps.len() == 2 && ps.iter().all(pod_ready)).then(|| ps.to_vec()),
    )
    .await
    .expect("group 0");
    let mut ips: Vec<_> = group
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    ips.dedup();
    assert_eq!(ips.len(), 2, "{ips:?}");
    assert!(group.iter().all(|p| engine_pid(p).is_some()));

    chats(&env.admin, ns, 0).await;
    env.drop_namespace(ns).await;
}

/// `builtin://mini`: the trained model the engine image bundles, split over the example's two
/// ranks, answers a question in English through the leader pod, under the engine's name for it.
pub async fn the_bundled_trained_model_answers_in_english_through_the_leader_pod(env: Shared) {
    let ns = "e2e-mini";
    let mut dsd = tiny_example(ns);
    dsd.spec.model.source = "builtin://mini".into();
    available(&env, ns, dsd).await;
    let pod = leader(&env.admin, ns, NAME, 0).await.expect("leader pod");
    let ip = pod.status.and_then(|s| s.pod_ip).expect("leader pod IP");
    let reply = chat_with(&ip, "What does serendipity mean?", 24)
        .await
        .expect("chat completion");
    assert_eq!(reply["model"], "deepseek-v3.2-mini", "{reply}");
    let content = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(content.contains("serendipity"), "{reply}");
    env.drop_namespace(ns).await;
}

/// The engine's `--shutdown-grace-seconds` in the pod.
fn shutdown_grace(pod: &Pod) -> std::time::Duration {
    let args = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.iter().find(|c| c.name == "engine"))
        .and_then(|c| c.args.clone())
        .unwrap_or_default();
    let secs = args
        .iter()
        .position(|a| a == "--shutdown-grace-seconds")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the engine has --shutdown-grace-seconds");
    std::time::Duration::from_secs(secs)
}

pub async fn a_killed_rank_gets_its_group_recreated_whole(env: Shared) {
    let ns = "e2e-kill";
    let _dsds = tiny_available(&env, ns).await;
    let pods: Api<Pod> = Api::namespaced(env.admin.clone(), ns);
    let selector = "app.kubernetes.io/instance=tiny,serving.deepseek.dev/group=0";
    let before = wait_list(
        pods.clone(),
        selector,
        LONG,
        "two ready ranks",
        |ps: &[Pod]| (ps.len() == 2 && ps.iter().all(pod_ready)).then(|| ps.to_vec()),
    )
    .await
    .expect("group 0");
    let rank1 = before
        .iter()
        .find(|p| {
            p.labels()
                .get("apps.kubernetes.io/pod-index")
                .map(String::as_str)
                == Some("1")
        })
        .expect("rank 1");
    let pid = engine_pid(rank1).expect("rank 1's process");
    let grace = shutdown_grace(rank1);
    let killed = std::time::Instant::now();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }

    // Both pods are replaced (a group runs whole or not at all) and the new ones get ready.
    let old = uids(&before);
    wait_list(
        pods,
        selector,
        LONG,
        "a new group is ready",
        |ps: &[Pod]| {
            let fresh: Vec<&Pod> = ps
                .iter()
                .filter(|p| !old.contains(&p.uid().unwrap_or_default()))
                .collect();
            (ps.len() == 2 && fresh.len() == 2 && fresh.iter().all(|p| pod_ready(p))).then_some(())
        },
    )
    .await
    .expect("group recreated");
    // The restarted rank never joined a group, so nothing holds its deletion: waiting out the
    // shutdown grace would delay every recreation by that much.
    let took = killed.elapsed();
    assert!(
        took < grace,
        "the group served again {took:?} after the kill, not within the shutdown grace ({grace:?})"
    );
    let events: Api<Event> = Api::namespaced(env.admin.clone(), ns);
    wait_list(
        events,
        "",
        LONG,
        "a GroupRecreated event",
        |es: &[Event]| {
            es.iter()
                .any(|e| e.reason.as_deref() == Some("GroupRecreated"))
                .then_some(())
        },
    )
    .await
    .expect("the operator says why it recreated the group");
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), ns);
    wait_dsd(&dsds, NAME, "Available again", available_with(1))
        .await
        .expect("Available");
    chats(&env.admin, ns, 0).await;
    env.drop_namespace(ns).await;
}

pub async fn the_scale_subresource_adds_groups_and_drains_before_removing(env: Shared) {
    let ns = "e2e-scale";
    let dsds = tiny_available(&env, ns).await;
    // As `kubectl scale dsd/tiny --replicas 2` does.
    dsds.patch_scale(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .expect("scale up");
    wait_dsd(&dsds, NAME, "two groups Available", available_with(2))
        .await
        .expect("two groups");
    let scale = dsds.get_scale(NAME).await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(2));
    assert_eq!(scale.status.as_ref().map(|s| s.replicas), Some(2));
    chats(&env.admin, ns, 1).await;

    dsds.patch_scale(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 1}})),
    )
    .await
    .expect("scale down");
    let events: Api<Event> = Api::namespaced(env.admin.clone(), ns);
    wait_list(
        events,
        "",
        LONG,
        "the group is drained, then removed",
        |es: &[Event]| {
            let has = |r: &str| es.iter().any(|e| e.reason.as_deref() == Some(r));
            (has("GroupDraining") && has("GroupDrained")).then_some(())
        },
    )
    .await
    .expect("drain events");
    let stss: Api<StatefulSet> = Api::namespaced(env.admin.clone(), ns);
    wait_list(
        stss,
        "app.kubernetes.io/instance=tiny",
        LONG,
        "one group left",
        |ss: &[StatefulSet]| (ss.len() == 1 && ss[0].name_any() == "tiny-g0").then_some(()),
    )
    .await
    .expect("group 1 removed");
    wait_dsd(&dsds, NAME, "one group Available", available_with(1))
        .await
        .expect("one group");
    chats(&env.admin, ns, 0).await;
    env.drop_namespace(ns).await;
}

/// Waits until no object of kind `K` with `selector` is left in `ns`, having checked there
/// was one.
async fn collected<K>(client: &Client, ns: &str, selector: &str, what: &str)
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    wait_list(
        api,
        selector,
        LONG,
        &format!("{what} are collected"),
        |x: &[K]| x.is_empty().then_some(()),
    )
    .await
    .expect(what);
}

pub async fn deleting_the_deployment_garbage_collects_what_it_owned(env: Shared) {
    let ns = "e2e-gc";
    let dsds = tiny_available(&env, ns).await;
    let selector = "app.kubernetes.io/instance=tiny";
    let c = &env.admin;
    let lp = kube::api::ListParams::default().labels(selector);
    let count = |n: usize, what: &str| assert!(n > 0, "no {what} before the delete");
    count(
        Api::<StatefulSet>::namespaced(c.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items
            .len(),
        "StatefulSet",
    );
    count(
        Api::<Service>::namespaced(c.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items
            .len(),
        "Service",
    );
    count(
        Api::<PodDisruptionBudget>::namespaced(c.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items
            .len(),
        "PDB",
    );
    count(
        Api::<ConfigMap>::namespaced(c.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items
            .len(),
        "ConfigMap",
    );
    count(
        Api::<Pod>::namespaced(c.clone(), ns)
            .list(&lp)
            .await
            .unwrap()
            .items
            .len(),
        "Pod",
    );

    dsds.delete(NAME, &DeleteParams::default())
        .await
        .expect("delete");
    collected::<StatefulSet>(c, ns, selector, "StatefulSets").await;
    collected::<Service>(c, ns, selector, "Services").await;
    collected::<PodDisruptionBudget>(c, ns, selector, "PodDisruptionBudgets").await;
    collected::<ConfigMap>(c, ns, selector, "ConfigMaps").await;
    collected::<Pod>(c, ns, selector, "pods").await;
    env.drop_namespace(ns).await;
}
