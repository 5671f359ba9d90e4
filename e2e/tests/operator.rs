//! The operator against a real cluster: applies the tiny CPU example, checks the objects and
//! the status the controller produces, scales to zero, and checks that a bad spec is refused
//! at apply time. Skips, printing the reason, when `KUBECONFIG` names no reachable cluster.

use std::sync::Arc;
use std::time::Duration;

use deepseek_e2e::{cluster, install_crd, wait_for};
use deepseek_operator::api::DeepSeekDeployment;
use deepseek_operator::controller::{self, Context};
use deepseek_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};

const NS: &str = "deepseek-e2e";

fn tiny_example() -> DeepSeekDeployment {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tiny-cpu.yaml");
    let text = std::fs::read_to_string(path).expect("examples/tiny-cpu.yaml");
    let mut dsd: DeepSeekDeployment = serde_saphyr::from_str(&text).expect("example parses");
    dsd.metadata.namespace = Some(NS.into());
    dsd
}

#[tokio::test]
async fn the_tiny_example_gets_its_groups_and_status_on_a_real_cluster() {
    let client = match cluster().await {
        Ok(c) => c,
        Err(reason) => {
            println!("skipped: {reason}");
            return;
        }
    };
    install_crd(&client).await.expect("CRD installs");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": NS}})).unwrap();
    let _ = namespaces.create(&PostParams::default(), &ns).await;

    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(Metrics::default()),
        Some("e2e".into()),
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(async move {
        controller::run(ctx, Some(NS), async move {
            let _ = stop_rx.await;
        })
        .await;
    });

    let dsds: Api<DeepSeekDeployment> = Api::namespaced(client.clone(), NS);
    let dsd = tiny_example();
    dsds.patch(
        "tiny",
        &PatchParams::apply("deepseek-e2e").force(),
        &Patch::Apply(&dsd),
    )
    .await
    .expect("example applies");

    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let sts = wait_for(Duration::from_secs(60), || async {
        stss.get_opt("tiny-g0").await.ok().flatten()
    })
    .await
    .expect("group 0 StatefulSet is created");
    assert_eq!(sts.spec.replicas, Some(2));
    let svcs: Api<Service> = Api::namespaced(client.clone(), NS);
    assert!(
        svcs.get_opt("tiny").await.unwrap().is_some(),
        "serving Service"
    );
    assert!(
        svcs.get_opt("tiny-g0").await.unwrap().is_some(),
        "headless Service"
    );
    let status = wait_for(Duration::from_secs(60), || async {
        let d = dsds.get("tiny").await.ok()?;
        let s = d.status?;
        (s.observed_generation == d.metadata.generation && s.conditions.len() == 3).then_some(s)
    })
    .await
    .expect("status is written");
    assert_eq!(status.desired_replicas, 1);
    assert_eq!(status.pods_per_group, 2);

    // A spec the CRD's CEL rules refuse never reaches the controller.
    let mut bad = tiny_example();
    bad.metadata.name = Some("bad".into());
    bad.spec.parallelism.expert_parallel = 3;
    bad.spec.parallelism.gpus_per_pod = 2;
    let err = dsds
        .patch(
            "bad",
            &PatchParams::apply("deepseek-e2e").force(),
            &Patch::Apply(&bad),
        )
        .await
        .expect_err("refused at apply");
    assert!(
        err.to_string()
            .contains("multiple of parallelism.gpusPerPod"),
        "{err}"
    );

    // Scale to zero through the scale subresource: the group goes away.
    dsds.patch_scale(
        "tiny",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
    )
    .await
    .expect("scale subresource");
    let gone = wait_for(Duration::from_secs(60), || async {
        matches!(stss.get_opt("tiny-g0").await, Ok(None)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "group 0 is deleted after scaling to zero");

    let _ = dsds.delete("tiny", &DeleteParams::default()).await;
    let _ = stop_tx.send(());
    let _ = controller.await;
    let _ = namespaces.delete(NS, &DeleteParams::default()).await;
}
