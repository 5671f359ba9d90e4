//! The Helm chart on the control plane: `helm install` (its operator Deployment's pods run
//! through the node agent like any other), a deployment served by that operator, `helm
//! upgrade`, and `helm uninstall`, which keeps the CRD (`helm.sh/resource-policy: keep`).
//!
//! Helm comes from e2e/helm/install.sh (`DEEPSEEK_E2E_HELM` names another binary); without it
//! the test prints why it skipped. It runs last: it takes the CRD over from the suite (Helm
//! installs it as a template and refuses to adopt one it did not create) and stops the
//! suite's operators, which would otherwise serve the same deployments.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use deepseek_e2e::{FIELD_MANAGER, repo_root};
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::ClusterRole;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::wait::{await_condition, conditions};

use crate::support::{LONG, Shared, available_with, established, tiny_example, wait_dsd, within};

const RELEASE: &str = "e2e";
const NS: &str = "e2e-helm";
/// The release's full name, which names the operator's Deployment and ClusterRole.
const FULLNAME: &str = "e2e-deepseek-operator";
const CRD: &str = "deepseekdeployments.serving.deepseek.dev";
const APP_NS: &str = "e2e-helm-app";

/// The helm binary: `DEEPSEEK_E2E_HELM`, else the one e2e/helm/install.sh installed.
fn helm_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("DEEPSEEK_E2E_HELM") {
        return Ok(PathBuf::from(p));
    }
    let script = repo_root().join("e2e").join("helm").join("install.sh");
    let check = std::process::Command::new(&script)
        .arg("--check")
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if !check.success() {
        return Err("helm is not installed; run e2e/helm/install.sh".into());
    }
    let out = std::process::Command::new(&script)
        .output()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(PathBuf::from(path))
}

/// Runs helm against the control plane as the admin; fails with its output.
async fn helm(env: &Shared, bin: &PathBuf, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(&env.kubeconfig)
        .env("HELM_CACHE_HOME", env.state_dir.join("helm").join("cache"))
        .env(
            "HELM_CONFIG_HOME",
            env.state_dir.join("helm").join("config"),
        )
        .env("HELM_DATA_HOME", env.state_dir.join("helm").join("data"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(
        Duration::from_secs(120),
        &format!("helm {}", args.join(" ")),
        out,
    )
    .await?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("helm {} failed: {text}", args.join(" ")))
    }
}

/// The operator Deployment has rolled out `generation`: every replica updated and available.
fn rolled_out(d: Option<&Deployment>) -> bool {
    let Some(d) = d else { return false };
    let want = d.spec.replicas.unwrap_or(1);
    let Some(s) = &d.status else { return false };
    s.observed_generation == d.metadata.generation
        && s.updated_replicas == Some(want)
        && s.available_replicas == Some(want)
        && s.replicas == Some(want)
}

pub async fn the_chart_installs_serves_upgrades_and_uninstalls_keeping_the_crd(env: Shared) {
    let bin = match tokio::task::spawn_blocking(helm_binary)
        .await
        .expect("task")
    {
        Ok(bin) => bin,
        Err(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let chart = repo_root().join("charts").join("deepseek-operator");
    let chart = chart.to_str().expect("a UTF-8 path");

    // The chart's operator replaces the suite's, and its CRD the suite's.
    env.stop_operators().await;
    let crds: Api<CustomResourceDefinition> = Api::all(env.admin.clone());
    if let Some(old) = crds.get_opt(CRD).await.expect("CRD lookup") {
        crds.delete(CRD, &DeleteParams::default())
            .await
            .expect("delete the suite's CRD");
        let uid = old.metadata.uid.unwrap_or_default();
        within(
            LONG,
            "the suite's CRD is gone",
            await_condition(crds.clone(), CRD, conditions::is_deleted(&uid)),
        )
        .await
        .expect("CRD deleted");
    }
    env.namespace(NS).await.expect("namespace");

    helm(&env, &bin, &["install", RELEASE, chart, "--namespace", NS])
        .await
        .expect("helm install");
    within(
        LONG,
        "the chart's CRD is established",
        await_condition(crds.clone(), CRD, established()),
    )
    .await
    .expect("CRD");
    let deployments: Api<Deployment> = Api::namespaced(env.admin.clone(), NS);
    within(
        LONG,
        "the operator Deployment is available",
        await_condition(deployments.clone(), FULLNAME, rolled_out),
    )
    .await
    .expect("operator pods ready");

    // That operator, with the chart's RBAC, serves a deployment.
    env.namespace(APP_NS).await.expect("namespace");
    let dsds: Api<DeepSeekDeployment> = Api::namespaced(env.admin.clone(), APP_NS);
    dsds.patch(
        "tiny",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&tiny_example(APP_NS)),
    )
    .await
    .expect("the example applies");
    wait_dsd(
        &dsds,
        "tiny",
        "Available under the chart's operator",
        available_with(1),
    )
    .await
    .expect("Available");

    // An upgrade that changes the pod template rolls the operator's pods.
    let before = deployments
        .get(FULLNAME)
        .await
        .expect("Deployment")
        .metadata
        .generation;
    helm(
        &env,
        &bin,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NS,
            "--set",
            "logLevel=debug\\,kube=warn",
        ],
    )
    .await
    .expect("helm upgrade");
    let after = deployments
        .get(FULLNAME)
        .await
        .expect("Deployment")
        .metadata
        .generation;
    assert!(
        after > before,
        "the upgrade changed nothing ({before:?} -> {after:?})"
    );
    within(
        LONG,
        "the upgraded operator Deployment is available",
        await_condition(deployments.clone(), FULLNAME, rolled_out),
    )
    .await
    .expect("operator pods rolled");
    wait_dsd(
        &dsds,
        "tiny",
        "Available after the upgrade",
        available_with(1),
    )
    .await
    .expect("Available");

    // Uninstall removes the release's objects and keeps the CRD, so the deployment stays.
    let operator_uid = deployments
        .get(FULLNAME)
        .await
        .expect("Deployment")
        .metadata
        .uid
        .unwrap_or_default();
    helm(&env, &bin, &["uninstall", RELEASE, "--namespace", NS])
        .await
        .expect("helm uninstall");
    within(
        LONG,
        "the operator Deployment is gone",
        await_condition(
            deployments.clone(),
            FULLNAME,
            conditions::is_deleted(&operator_uid),
        ),
    )
    .await
    .expect("Deployment deleted");
    let roles: Api<ClusterRole> = Api::all(env.admin.clone());
    assert!(
        roles.get_opt(FULLNAME).await.expect("lookup").is_none(),
        "the ClusterRole outlived the release"
    );
    let crd = crds.get(CRD).await.expect("the CRD is kept");
    assert_eq!(
        crd.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("helm.sh/resource-policy"))
            .map(String::as_str),
        Some("keep")
    );
    assert!(crd.metadata.deletion_timestamp.is_none());
    dsds.get("tiny").await.expect("the deployment is kept");
    env.drop_namespace(APP_NS).await;
    env.drop_namespace(NS).await;
}
