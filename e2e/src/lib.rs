//! Shared helpers for the end-to-end suite.
//!
//! The tests run against the cluster named by `KUBECONFIG` and skip, printing why, when it is
//! unset or the cluster cannot be reached. They run the controller in the test process, so only
//! the CRD needs installing (the tests apply it) and no operator image is needed.

use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, CustomResourceExt};

use deepseek_operator::api::DeepSeekDeployment;

/// A client for the cluster in `KUBECONFIG`, or the reason the suite is skipped.
pub async fn cluster() -> Result<Client, String> {
    if std::env::var_os("KUBECONFIG").is_none() {
        return Err("KUBECONFIG is not set; no cluster to test against".into());
    }
    let client = Client::try_default()
        .await
        .map_err(|e| format!("cannot build a client from KUBECONFIG: {e}"))?;
    client
        .apiserver_version()
        .await
        .map_err(|e| format!("the cluster in KUBECONFIG does not answer: {e}"))?;
    Ok(client)
}

/// Installs or updates the `DeepSeekDeployment` CRD and waits until it is served.
pub async fn install_crd(client: &Client) -> Result<(), kube::Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = DeepSeekDeployment::crd();
    let name = crd.metadata.name.clone().expect("CRD name");
    crds.patch(
        &name,
        &PatchParams::apply("deepseek-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await?;
    let dsds: Api<DeepSeekDeployment> = Api::all(client.clone());
    for _ in 0..60 {
        if dsds.list(&Default::default()).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    dsds.list(&Default::default()).await.map(|_| ())
}

/// Polls `check` every second until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
