//! The operator's identity: its service account, bound by deploy/base/rbac.yaml and nothing
//! else, is enough to run and is refused outside its role.

use deepseek_e2e::{read_repo_file, yaml_documents};
use deepseek_operator::api::DeepSeekDeployment;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, RoleBinding};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::support::{OPERATOR_NS, OPERATOR_SA, Shared};

fn forbidden<T: std::fmt::Debug>(what: &str, r: kube::Result<T>) -> Option<String> {
    match r {
        Err(kube::Error::Api(e)) if e.code == 403 => None,
        other => Some(format!("{what}: expected 403 Forbidden, got {other:?}")),
    }
}

pub async fn the_operator_runs_as_its_service_account_and_is_denied_outside_its_role(env: Shared) {
    env.crd().await.expect("CRD");
    let op = env.operator_client().await.expect("operator identity");
    let who: SelfSubjectReview = Api::all(op.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("SelfSubjectReview");
    let user = who
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(
        user.as_deref(),
        Some(format!("system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}").as_str())
    );

    // Exactly deploy/base's bindings name the service account.
    let names_sa = |subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>| {
        subjects.iter().flatten().any(|s| {
            s.kind == "ServiceAccount"
                && s.name == OPERATOR_SA
                && s.namespace.as_deref() == Some(OPERATOR_NS)
        })
    };
    let crbs: Api<ClusterRoleBinding> = Api::all(env.admin.clone());
    let mut bound: Vec<String> = crbs
        .list(&ListParams::default())
        .await
        .expect("cluster role bindings")
        .into_iter()
        .filter(|b| names_sa(&b.subjects))
        .map(|b| format!("ClusterRoleBinding {} -> {}", b.name_any(), b.role_ref.name))
        .collect();
    let rbs: Api<RoleBinding> = Api::all(env.admin.clone());
    bound.extend(
        rbs.list(&ListParams::default())
            .await
            .expect("role bindings")
            .into_iter()
            .filter(|b| names_sa(&b.subjects))
            .map(|b| {
                format!(
                    "RoleBinding {}/{} -> {}",
                    b.namespace().unwrap_or_default(),
                    b.name_any(),
                    b.role_ref.name
                )
            }),
    );
    bound.sort();
    assert_eq!(
        bound,
        [
            "ClusterRoleBinding deepseek-operator -> deepseek-operator",
            "RoleBinding deepseek-system/deepseek-operator-leader-election -> deepseek-operator-leader-election",
        ]
    );
    // The ClusterRole in the cluster is the file's.
    let file_rules = yaml_documents(&read_repo_file("deploy/base/rbac.yaml"))
        .expect("rbac.yaml parses")
        .into_iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole")["rules"]
        .clone();
    let role = Api::<ClusterRole>::all(env.admin.clone())
        .get("deepseek-operator")
        .await
        .expect("ClusterRole");
    assert_eq!(serde_json::to_value(&role.rules).unwrap(), file_rules);

    // Inside the role.
    let dsds: Api<DeepSeekDeployment> = Api::all(op.clone());
    dsds.list(&ListParams::default())
        .await
        .expect("the operator lists deployments cluster-wide");
    // Outside it.
    let mut denied = Vec::new();
    let secrets: Api<Secret> = Api::namespaced(op.clone(), OPERATOR_NS);
    denied.extend(forbidden(
        "list secrets",
        secrets.list(&ListParams::default()).await,
    ));
    let nodes: Api<Node> = Api::all(op.clone());
    denied.extend(forbidden(
        "list nodes",
        nodes.list(&ListParams::default()).await,
    ));
    let namespaces: Api<Namespace> = Api::all(op.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "e2e-not-allowed"}})).unwrap();
    denied.extend(forbidden(
        "create a namespace",
        namespaces.create(&PostParams::default(), &ns).await,
    ));
    // The spec belongs to users: the operator may write the status only.
    let in_ns: Api<DeepSeekDeployment> = Api::namespaced(op.clone(), "default");
    denied.extend(forbidden(
        "patch a deployment's spec",
        in_ns
            .patch(
                "any",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": 2}})),
            )
            .await,
    ));
    assert!(denied.is_empty(), "{}", denied.join("\n"));

    // With that identity the operator process starts and takes the leader lease.
    env.operator()
        .await
        .expect("the operator runs with its own identity");
}
