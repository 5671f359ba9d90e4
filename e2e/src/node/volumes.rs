//! A pod's volumes as directories of its sandbox: emptyDir, configMap, secret, downwardAPI and
//! projected (service-account token, configMap, secret, downwardAPI) volumes are written
//! there; hostPath volumes are the host path itself. Other kinds are refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, ServiceAccount, Volume,
};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

use super::launch::{self, PodFields};

/// A volume that cannot be set up (yet).
pub type VolumeError = String;

/// The files of one volume: relative path and contents.
type Files = Vec<(String, Vec<u8>)>;

fn pick(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
) -> Result<Files, VolumeError> {
    match items {
        None => Ok(data.into_iter().collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                data.get(&i.key)
                    .map(|v| (i.path.clone(), v.clone()))
                    .ok_or_else(|| format!("key {:?} is missing", i.key))
            })
            .collect(),
    }
}

async fn config_map(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
    items: &Option<Vec<KeyToPath>>,
) -> Result<Files, VolumeError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await.map_err(|e| e.to_string())? {
        Some(cm) => {
            let mut data: BTreeMap<String, Vec<u8>> = cm
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect();
            data.extend(
                cm.binary_data
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(k, v)| (k, v.0)),
            );
            pick(data, items)
        }
        None if optional == Some(true) => Ok(Vec::new()),
        None => Err(format!("configmap {name:?} not found")),
    }
}

async fn secret(
    client: &Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
    items: &Option<Vec<KeyToPath>>,
) -> Result<Files, VolumeError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_opt(name).await.map_err(|e| e.to_string())? {
        Some(s) => {
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .chain(
                    s.string_data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes())),
                )
                .collect();
            pick(data, items)
        }
        None if optional == Some(true) => Ok(Vec::new()),
        None => Err(format!("secret {name:?} not found")),
    }
}

fn downward(
    pod: &Pod,
    fields: &PodFields,
    items: &[DownwardAPIVolumeFile],
) -> Result<Files, VolumeError> {
    items
        .iter()
        .map(|i| match &i.field_ref {
            Some(f) => launch::field_value(pod, fields, &f.field_path)
                .map(|v| (i.path.clone(), v.into_bytes()))
                .map_err(|e| e.to_string()),
            None => Err(format!(
                "downwardAPI item {:?}: only fieldRef is supported",
                i.path
            )),
        })
        .collect()
}

/// A token for the pod's service account, bound to the pod, as the kubelet requests it.
async fn token(
    client: &Client,
    pod: &Pod,
    audience: Option<String>,
    expiration: Option<i64>,
) -> Result<Vec<u8>, VolumeError> {
    let ns = pod.namespace().unwrap_or_default();
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a]),
            expiration_seconds: expiration,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let answer: TokenRequest = api
        .create_subresource("token", &sa, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("token for service account {sa:?}: {e}"))?;
    Ok(answer
        .status
        .and_then(|s| s.token)
        .unwrap_or_default()
        .into_bytes())
}

async fn files(
    client: &Client,
    pod: &Pod,
    fields: &PodFields,
    v: &Volume,
) -> Result<Option<Files>, VolumeError> {
    let ns = pod.namespace().unwrap_or_default();
    if v.empty_dir.is_some() {
        return Ok(Some(Vec::new()));
    }
    if let Some(cm) = &v.config_map {
        return config_map(client, &ns, &cm.name, cm.optional, &cm.items)
            .await
            .map(Some);
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        return secret(client, &ns, &name, s.optional, &s.items)
            .await
            .map(Some);
    }
    if let Some(d) = &v.downward_api {
        return downward(pod, fields, d.items.as_deref().unwrap_or_default()).map(Some);
    }
    if let Some(p) = &v.projected {
        let mut out = Vec::new();
        for src in p.sources.iter().flatten() {
            if let Some(t) = &src.service_account_token {
                let tok = token(client, pod, t.audience.clone(), t.expiration_seconds).await?;
                out.push((t.path.clone(), tok));
            } else if let Some(cm) = &src.config_map {
                out.extend(config_map(client, &ns, &cm.name, cm.optional, &cm.items).await?);
            } else if let Some(s) = &src.secret {
                out.extend(secret(client, &ns, &s.name, s.optional, &s.items).await?);
            } else if let Some(d) = &src.downward_api {
                out.extend(downward(
                    pod,
                    fields,
                    d.items.as_deref().unwrap_or_default(),
                )?);
            } else {
                return Err(format!(
                    "volume {:?}: a projected source kind is not supported",
                    v.name
                ));
            }
        }
        return Ok(Some(out));
    }
    if v.host_path.is_some() {
        return Ok(None);
    }
    Err(format!(
        "volume {:?}: this volume kind is not supported by the node agent",
        v.name
    ))
}

fn write(dir: &Path, files: &Files) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (rel, data) in files {
        if Path::new(rel).is_absolute() || rel.split('/').any(|c| c == "..") {
            return Err(format!("volume file {rel:?} leaves its volume"));
        }
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        std::fs::write(&path, data).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Sets up every volume of `pod` under `dir/volumes/` and returns the host path of each, by
/// volume name.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    fields: &PodFields,
    dir: &Path,
) -> Result<BTreeMap<String, PathBuf>, VolumeError> {
    let mut paths = BTreeMap::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let host = match files(client, pod, fields, v).await? {
            Some(files) => {
                let d = dir.join("volumes").join(&v.name);
                write(&d, &files)?;
                d
            }
            None => PathBuf::from(
                v.host_path
                    .as_ref()
                    .map(|h| h.path.clone())
                    .unwrap_or_default(),
            ),
        };
        paths.insert(v.name.clone(), host);
    }
    Ok(paths)
}
