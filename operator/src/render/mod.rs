//! Desired Kubernetes objects for a `DeepSeekDeployment`; pure functions, no I/O and no clock.
//!
//! For each group `i` in `0..spec.replicas`: a StatefulSet `<name>-g<i>` (parallel pod
//! management, one pod per rank, rank = pod ordinal), a headless Service of the same name that
//! gives rank 0 a stable DNS name for the other ranks, and a PodDisruptionBudget. Shared by all
//! groups: the serving Service `<name>` that selects the ready rank-0 pods, and the engine
//! ConfigMap `<name>-engine`; with `spec.inferencePool`, an `InferencePool` over the serving
//! pods. The shape follows LeaderWorkerSet's group-of-pods model, rendered
//! onto plain StatefulSets.
//!
//! Every object carries an owner reference to the `DeepSeekDeployment` (so deleting it deletes
//! them), the `app.kubernetes.io/*` labels, and a hash of its own content in
//! [`APPLIED_HASH_ANNOTATION`], which lets the controller skip writes that would change nothing.
//! Pod templates carry [`REVISION_LABEL`], a hash of the template that drives rollouts.

mod group;
pub mod hash;
pub mod inference_pool;
mod model;
mod serving;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};

use crate::api::validate::ModelSource;
use crate::api::{DeepSeekDeployment, validate};
use crate::{Error, Result};

pub use group::{
    LIVENESS_FAILURES, LIVENESS_PERIOD, SHUTDOWN_GRACE_SECONDS, SHUTDOWN_MARGIN_SECONDS,
    group_pod_template, headless_service, pod_disruption_budget, statefulset,
};
pub use inference_pool::inference_pool;
pub use model::ModelMount;
pub use serving::{engine_config_map, serving_selector, serving_service};

/// `app.kubernetes.io/name` of every object: the application.
pub const APP_NAME: &str = "deepseek-engine";
/// `app.kubernetes.io/part-of` of every object.
pub const PART_OF: &str = "deepseek";
/// `app.kubernetes.io/managed-by` of every object; also the Events reporter.
pub const MANAGED_BY: &str = "deepseek-operator";

/// Standard label: the application name.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Standard label: the `DeepSeekDeployment` an object belongs to.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Standard label: the role of the object (`engine`, `serving`, `config`).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Standard label: the larger application.
pub const PART_OF_LABEL: &str = "app.kubernetes.io/part-of";
/// Standard label: the tool that manages the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Our label: index of the group an object or pod belongs to.
pub const GROUP_LABEL: &str = "serving.deepseek.dev/group";
/// Our label on pods: hash of the pod template they were created from.
pub const REVISION_LABEL: &str = "serving.deepseek.dev/revision";
/// Rank of a pod within its group. The StatefulSet controller sets this label to the pod's
/// ordinal, which is the rank, so the serving Service can select rank 0.
pub const RANK_LABEL: &str = "apps.kubernetes.io/pod-index";
/// Our label on engine pods: `true` while the pod may receive traffic from the serving
/// Service, `false` while its group drains before removal. Not part of the revision hash, so
/// adding it never restarts a group; the controller sets it on existing leader pods.
pub const SERVING_LABEL: &str = "serving.deepseek.dev/serving";
/// Annotation holding the hash of everything the operator applied to an object.
pub const APPLIED_HASH_ANNOTATION: &str = "serving.deepseek.dev/applied-hash";
/// Annotation on a StatefulSet: the pod-template revision it was last applied with.
pub const REVISION_ANNOTATION: &str = "serving.deepseek.dev/revision";

/// Component label value of engine pods and their StatefulSets, headless Services and PDBs.
pub const COMPONENT_ENGINE: &str = "engine";
/// Component label value of the serving Service.
pub const COMPONENT_SERVING: &str = "serving";
/// Component label value of the engine ConfigMap.
pub const COMPONENT_CONFIG: &str = "config";

/// The engine's HTTP port (OpenAI API, health, readiness, metrics).
pub const HTTP_PORT: i32 = 8000;
/// Port name of [`HTTP_PORT`].
pub const HTTP_PORT_NAME: &str = "http";
/// The port rank 0 listens on for the other ranks of its group.
pub const RANK_PORT: i32 = 29500;
/// Port name of [`RANK_PORT`].
pub const RANK_PORT_NAME: &str = "rank";
/// Where the engine ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/deepseek-engine";
/// File name of the engine configuration inside the ConfigMap.
pub const CONFIG_FILE: &str = "engine.json";

/// Identity of the `DeepSeekDeployment` being rendered.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// Controller owner reference placed on every child.
    pub reference: OwnerReference,
}

impl Owner {
    /// Reads name, namespace and UID off the resource.
    pub fn of(dsd: &DeepSeekDeployment) -> Result<Self> {
        let namespace = dsd
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let reference = dsd
            .controller_owner_ref(&())
            .ok_or(Error::MissingField("metadata.uid"))?;
        Ok(Self {
            name: dsd.name_any(),
            namespace,
            reference,
        })
    }

    /// Name of group `index`'s StatefulSet, headless Service and PDB.
    pub fn group_name(&self, index: i32) -> String {
        group_name(&self.name, index)
    }

    /// Name of the engine ConfigMap.
    pub fn config_map_name(&self) -> String {
        format!("{}-engine", self.name)
    }

    /// Labels shared by every object of this deployment with the given component.
    pub fn labels(&self, component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), APP_NAME.to_string()),
            (INSTANCE_LABEL.to_string(), self.name.clone()),
            (COMPONENT_LABEL.to_string(), component.to_string()),
            (PART_OF_LABEL.to_string(), PART_OF.to_string()),
            (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        ])
    }

    /// Labels that select the pods of one group. Fixed for the life of the group (a
    /// StatefulSet's selector cannot change).
    pub fn group_selector(&self, index: i32) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), APP_NAME.to_string()),
            (INSTANCE_LABEL.to_string(), self.name.clone()),
            (COMPONENT_LABEL.to_string(), COMPONENT_ENGINE.to_string()),
            (GROUP_LABEL.to_string(), index.to_string()),
        ])
    }

    /// Metadata for a child object: name, namespace, labels and owner reference.
    pub fn meta(&self, name: String, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// Name of group `index`'s StatefulSet, headless Service and PDB for deployment `name`.
pub fn group_name(name: &str, index: i32) -> String {
    format!("{name}-g{index}")
}

/// Label selector (as a string) of every engine pod of a deployment.
pub fn engine_pods_selector(name: &str) -> String {
    format!("{INSTANCE_LABEL}={name},{COMPONENT_LABEL}={COMPONENT_ENGINE}")
}

/// Label selector (as a string) of every object the operator made for a deployment.
pub fn owned_selector(name: &str) -> String {
    format!("{INSTANCE_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}")
}

/// Label selector of the rank-0 pods of all groups, published in `status.selector` for the
/// scale subresource.
pub fn leader_selector(name: &str) -> String {
    format!("{},{RANK_LABEL}=0", engine_pods_selector(name))
}

/// Objects of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupObjects {
    /// Group index.
    pub index: i32,
    /// The group's pods.
    pub statefulset: StatefulSet,
    /// Stable DNS for the group's pods, including not-ready ones.
    pub service: Service,
    /// Guards the group against voluntary evictions while it is healthy.
    pub pdb: PodDisruptionBudget,
}

/// Everything the spec asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Hash of the pod template; pods with another [`REVISION_LABEL`] are outdated.
    pub revision: String,
    /// Pods in each group.
    pub pods_per_group: i32,
    /// The engine ConfigMap.
    pub config_map: ConfigMap,
    /// The serving Service.
    pub service: Service,
    /// One entry per group, by index.
    pub groups: Vec<GroupObjects>,
    /// The InferencePool, when `spec.inferencePool` asks for one.
    pub inference_pool: Option<DynamicObject>,
}

/// Renders every object a valid `DeepSeekDeployment` asks for, with groups `0..spec.replicas`.
/// Fails with [`Error::InvalidSpec`] when the spec breaks a rule (see [`validate::validate`]).
pub fn desired(dsd: &DeepSeekDeployment) -> Result<Desired> {
    let indices: Vec<i32> = (0..dsd.spec.replicas.max(0)).collect();
    desired_groups(dsd, &indices)
}

/// As [`desired`], for the given group indices (the autoscaler fills free indices and removes
/// the drained group, so the set can have holes).
pub fn desired_groups(dsd: &DeepSeekDeployment, indices: &[i32]) -> Result<Desired> {
    let owner = Owner::of(dsd)?;
    let spec = &dsd.spec;
    validate::validate(&owner.name, spec)
        .map_err(|v| Error::InvalidSpec(validate::summarize(&v)))?;
    let source = ModelSource::parse(&spec.model.source).map_err(Error::InvalidSpec)?;
    let mount = ModelMount::new(&source, spec);

    let revision = hash::revision(&group_pod_template(&owner, spec, &mount, 0, None))?;
    let mut groups = Vec::new();
    for &index in indices {
        let template = group_pod_template(&owner, spec, &mount, index, Some(&revision));
        let mut sts = statefulset(&owner, spec, index, template, &revision);
        let mut svc = headless_service(&owner, index);
        let mut pdb = pod_disruption_budget(&owner, spec, index);
        hash::stamp(&mut sts)?;
        hash::stamp(&mut svc)?;
        hash::stamp(&mut pdb)?;
        groups.push(GroupObjects {
            index,
            statefulset: sts,
            service: svc,
            pdb,
        });
    }
    let mut config_map = engine_config_map(&owner, spec, &source, &mount)?;
    let mut service = serving_service(&owner, spec);
    hash::stamp(&mut config_map)?;
    hash::stamp(&mut service)?;
    let inference_pool = match &spec.inference_pool {
        Some(pool) => {
            let mut obj = inference_pool(&owner, pool);
            hash::stamp(&mut obj)?;
            Some(obj)
        }
        None => None,
    };
    Ok(Desired {
        revision,
        pods_per_group: spec.parallelism.pods_per_group(),
        config_map,
        service,
        groups,
        inference_pool,
    })
}

#[cfg(test)]
mod tests;
