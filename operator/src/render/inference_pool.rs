//! The Gateway API Inference Extension `InferencePool` (`inference.networking.k8s.io/v1`) of a
//! deployment with `spec.inferencePool`.
//!
//! The pool names the pods a gateway may send a request to and the endpoint picker (EPP) that
//! chooses one of them, by the vLLM-named KV-cache and queue gauges the engine exports. It
//! selects exactly the pods of the serving Service ([`serving_selector`]): the leader of every
//! group not draining. Worker ranks never take HTTP requests, and a draining group leaves the
//! pool when its leader's serving label turns false; the picker skips pods that are not ready.
//! k8s-openapi has no such type, so the pool is a [`DynamicObject`] with the fields of the
//! upstream v1 schema.

use kube::api::{ApiResource, DynamicObject};
use serde_json::json;

use super::serving::serving_selector;
use super::{HTTP_PORT, Owner};
use crate::api::InferencePoolSpec;

/// API group of the InferencePool.
pub const INFERENCE_POOL_GROUP: &str = "inference.networking.k8s.io";
/// Served version of the InferencePool the operator writes.
pub const INFERENCE_POOL_VERSION: &str = "v1";
/// Kind of the InferencePool.
pub const INFERENCE_POOL_KIND: &str = "InferencePool";
/// Resource (plural) of the InferencePool, as RBAC and the API paths name it.
pub const INFERENCE_POOL_PLURAL: &str = "inferencepools";
/// Component label value of the InferencePool.
pub const COMPONENT_INFERENCE_POOL: &str = "inference-pool";

/// The InferencePool's type, for the dynamic API.
pub fn inference_pool_resource() -> ApiResource {
    ApiResource {
        group: INFERENCE_POOL_GROUP.into(),
        version: INFERENCE_POOL_VERSION.into(),
        api_version: format!("{INFERENCE_POOL_GROUP}/{INFERENCE_POOL_VERSION}"),
        kind: INFERENCE_POOL_KIND.into(),
        plural: INFERENCE_POOL_PLURAL.into(),
    }
}

/// The InferencePool for `pool`: the serving pods on the engine's HTTP port, and the endpoint
/// picker's Service.
pub fn inference_pool(owner: &Owner, pool: &InferencePoolSpec) -> DynamicObject {
    let epp = &pool.endpoint_picker;
    let mut obj = DynamicObject::new(&pool.pool_name(&owner.name), &inference_pool_resource());
    obj.metadata = owner.meta(
        pool.pool_name(&owner.name),
        owner.labels(COMPONENT_INFERENCE_POOL),
    );
    obj.data = json!({
        "spec": {
            "selector": { "matchLabels": serving_selector(owner) },
            "targetPorts": [{ "number": HTTP_PORT }],
            "endpointPickerRef": {
                "kind": "Service",
                "name": epp.name,
                "port": { "number": epp.port },
                "failureMode": epp.failure_mode.as_str(),
            },
        },
    });
    obj
}
