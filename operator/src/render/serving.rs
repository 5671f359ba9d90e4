//! Objects shared by all groups: the serving Service and the engine ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::json;

use super::model::ModelMount;
use super::{
    APP_NAME, COMPONENT_CONFIG, COMPONENT_ENGINE, COMPONENT_LABEL, COMPONENT_SERVING, CONFIG_FILE,
    HTTP_PORT, HTTP_PORT_NAME, INSTANCE_LABEL, NAME_LABEL, Owner, RANK_LABEL, RANK_PORT,
    SERVING_LABEL,
};
use crate::Result;
use crate::api::DeepSeekDeploymentSpec;
use crate::api::validate::ModelSource;

/// Labels of the pods that serve clients: the rank-0 pod of every group that is not draining.
/// The serving Service and the InferencePool select exactly these.
pub fn serving_selector(owner: &Owner) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME_LABEL.to_string(), APP_NAME.to_string()),
        (INSTANCE_LABEL.to_string(), owner.name.clone()),
        (COMPONENT_LABEL.to_string(), COMPONENT_ENGINE.to_string()),
        (RANK_LABEL.to_string(), "0".to_string()),
        (SERVING_LABEL.to_string(), "true".to_string()),
    ])
}

/// The Service clients call: it selects the rank-0 pod of every group that is not draining
/// ([`SERVING_LABEL`]), and Kubernetes only routes to the ready ones.
pub fn serving_service(owner: &Owner, spec: &DeepSeekDeploymentSpec) -> Service {
    let mut meta = owner.meta(owner.name.clone(), owner.labels(COMPONENT_SERVING));
    if !spec.service.annotations.is_empty() {
        meta.annotations = Some(spec.service.annotations.clone());
    }
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(spec.service.type_.as_str().into()),
            selector: Some(serving_selector(owner)),
            ports: Some(vec![ServicePort {
                name: Some(HTTP_PORT_NAME.into()),
                port: spec.service.port,
                target_port: Some(IntOrString::String(HTTP_PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The engine ConfigMap: the effective engine settings as `engine.json`, mounted into every
/// engine pod and pointed to by `DEEPSEEK_ENGINE_CONFIG`. The command line carries the same
/// values; the file lets tools and people read the whole configuration in one place.
pub fn engine_config_map(
    owner: &Owner,
    spec: &DeepSeekDeploymentSpec,
    source: &ModelSource,
    mount: &ModelMount,
) -> Result<ConfigMap> {
    let p = &spec.parallelism;
    let e = &spec.engine;
    let doc = json!({
        "model": {
            "source": spec.model.source,
            "path": mount.model_arg,
            "servedName": spec.model.served_name.clone().unwrap_or_else(|| source.default_served_name()),
        },
        "engine": {
            "maxModelLen": e.max_model_len,
            "kvCacheDtype": e.kv_cache_dtype.as_str(),
            "maxNumSeqs": e.max_num_seqs,
            "extraArgs": e.extra_args,
        },
        "parallelism": {
            "expertParallel": p.expert_parallel,
            "gpusPerPod": p.gpus_per_pod,
            "ranksPerPod": p.ranks_per_pod(),
            "podsPerGroup": p.pods_per_group(),
        },
        "ports": { "http": HTTP_PORT, "rank": RANK_PORT },
    });
    Ok(ConfigMap {
        metadata: owner.meta(owner.config_map_name(), owner.labels(COMPONENT_CONFIG)),
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_string(),
            serde_json::to_string_pretty(&doc)? + "\n",
        )])),
        ..ConfigMap::default()
    })
}
