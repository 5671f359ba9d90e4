//! Content hashes: the pod-template revision and the applied-object hash.
//!
//! FNV-1a (64-bit) over the object's JSON. `serde_json` writes struct fields in declaration
//! order and maps in key order, so equal objects give equal hashes across runs and versions.

use k8s_openapi::api::core::v1::PodTemplateSpec;
use kube::Resource;
use serde::Serialize;

use super::APPLIED_HASH_ANNOTATION;
use crate::Result;

/// FNV-1a, 64 bit, as 16 lower-case hex digits.
pub fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Revision of a pod template: the first 10 hex digits of its hash.
pub fn revision(template: &PodTemplateSpec) -> Result<String> {
    let json = serde_json::to_vec(template)?;
    Ok(fnv1a_hex(&json)[..10].to_string())
}

/// Hash of an object's content, ignoring any applied-hash annotation already on it.
pub fn content_hash<K: Resource + Serialize + Clone>(obj: &K) -> Result<String> {
    let mut copy = obj.clone();
    if let Some(a) = copy.meta_mut().annotations.as_mut() {
        a.remove(APPLIED_HASH_ANNOTATION);
        if a.is_empty() {
            copy.meta_mut().annotations = None;
        }
    }
    Ok(fnv1a_hex(&serde_json::to_vec(&copy)?))
}

/// Writes the object's content hash into its [`APPLIED_HASH_ANNOTATION`].
pub fn stamp<K: Resource + Serialize + Clone>(obj: &mut K) -> Result<()> {
    let h = content_hash(obj)?;
    obj.meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(APPLIED_HASH_ANNOTATION.to_string(), h);
    Ok(())
}

/// The applied hash recorded on an object, if any.
pub fn applied_hash<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .annotations
        .as_ref()?
        .get(APPLIED_HASH_ANNOTATION)
        .map(String::as_str)
}

/// The applied hash recorded in object metadata, if any.
pub fn applied_hash_of(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<&str> {
    meta.annotations
        .as_ref()?
        .get(APPLIED_HASH_ANNOTATION)
        .map(String::as_str)
}
