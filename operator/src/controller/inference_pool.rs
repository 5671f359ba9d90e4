//! Keeps the InferencePool of `spec.inferencePool` in step with the spec, through the dynamic
//! API (k8s-openapi has no such type). The Gateway API Inference Extension is an optional
//! integration: whatever happens here ends up in the `InferencePoolReady` condition, and never
//! fails the reconcile of the groups.
//!
//! The pool is listed by the labels the operator puts on everything it owns. A 404 on that
//! list (or on the apply) means the API server does not serve the InferencePool type: the CRD
//! is not installed. The operator does not watch the CRD; a deployment whose pool is not ready
//! is looked at again within the progress recheck.

use kube::api::{Api, DeleteParams, DynamicObject, ListParams};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use super::apply_one;
use super::status::{PoolReport, PoolState};
use crate::Error;
use crate::render::{self, inference_pool::inference_pool_resource};

/// What [`sync`] did, for the status and the Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Synced {
    /// The condition to write.
    pub report: PoolReport,
    /// Pool created by this sync.
    pub created: Option<String>,
    /// Pools deleted by this sync (the field was removed, or the pool renamed).
    pub deleted: Vec<String>,
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Kube(kube::Error::Api(s)) if s.code == 404)
}

/// Applies `desired` (deleting pools of this deployment with another name), or, with no pool
/// asked for, deletes the pools of this deployment when `had_pool` says there may be some.
/// `owner_uid` is this deployment's UID, to tell its pool from someone else's of the same name.
pub async fn sync(
    client: &Client,
    ns: &str,
    deployment: &str,
    owner_uid: Option<&str>,
    desired: Option<&DynamicObject>,
    had_pool: bool,
) -> Synced {
    let mut out = Synced {
        report: PoolReport::Absent,
        created: None,
        deleted: Vec::new(),
    };
    if desired.is_none() && !had_pool {
        return out;
    }
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &inference_pool_resource());
    let lp = ListParams::default().labels(&render::owned_selector(deployment));
    let ours = match api.list(&lp).await.map_err(Error::from) {
        Ok(list) => list.items,
        // Not served: no pool can exist, and none can be made.
        Err(e) if is_not_found(&e) => {
            if desired.is_some() {
                out.report = PoolReport::Synced(PoolState::CrdMissing);
            }
            return out;
        }
        Err(e) => {
            out.report = PoolReport::Synced(PoolState::Failed {
                message: format!("listing InferencePools: {e}"),
            });
            return out;
        }
    };
    let keep = desired.map(ResourceExt::name_any);
    for pool in &ours {
        let name = pool.name_any();
        if Some(&name) == keep.as_ref() {
            continue;
        }
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {
                info!(pool = %name, "deleted InferencePool no longer asked for");
                out.deleted.push(name);
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                out.report = PoolReport::Synced(PoolState::Failed {
                    message: format!("deleting InferencePool {name}: {e}"),
                });
                return out;
            }
        }
    }
    let Some(desired) = desired else {
        return out;
    };
    let name = desired.name_any();
    let existing = ours.iter().find(|p| p.name_any() == name);
    if existing.is_none() {
        // Not among ours by label: a pool of that name may still exist, made by someone else.
        match api.get_opt(&name).await {
            Ok(Some(other)) if !owned_by(&other, owner_uid) => {
                warn!(pool = %name, "an InferencePool of that name belongs to someone else");
                out.report = PoolReport::Synced(PoolState::Conflict { name });
                return out;
            }
            Ok(_) => {}
            Err(e) => {
                out.report = PoolReport::Synced(PoolState::Failed {
                    message: format!("reading InferencePool {name}: {e}"),
                });
                return out;
            }
        }
    }
    match apply_one(&api, desired, &ours).await {
        Ok(applied) => {
            if applied && existing.is_none() {
                info!(pool = %name, "created InferencePool");
                out.created = Some(name.clone());
            }
            out.report = PoolReport::Synced(PoolState::Ready { name });
        }
        Err(e) if is_not_found(&e) => out.report = PoolReport::Synced(PoolState::CrdMissing),
        Err(e) => {
            out.report = PoolReport::Synced(PoolState::Failed {
                message: format!("applying InferencePool {name}: {e}"),
            })
        }
    }
    out
}

/// True when `pool`'s controller owner reference is the deployment with `uid`.
fn owned_by(pool: &DynamicObject, uid: Option<&str>) -> bool {
    pool.owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
}
