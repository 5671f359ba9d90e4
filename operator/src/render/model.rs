//! How the model weights reach the engine container, per source kind.
//!
//! - `pvc://CLAIM/PATH`: the claim is mounted read-only at [`MODEL_DIR`]; `--model` is
//!   `MODEL_DIR/PATH`.
//! - an absolute node path: a `hostPath` volume (type `Directory`) mounted read-only.
//! - `hf://` and `s3://`: an `emptyDir` (limited by `model.downloadSizeLimit`) that an init
//!   container `model-download` fills by running `deepseek-engine download --source SRC --dest
//!   MODEL_DIR`, with the credentials Secret's keys as environment variables. The engine then
//!   mounts it read-only.
//! - `builtin://tiny`: no volume; the engine builds its random-weight test model.
//! - `builtin://mini`: no volume; the engine serves the trained model its image bundles.

use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvFromSource, HostPathVolumeSource,
    PersistentVolumeClaimVolumeSource, SecretEnvSource, Volume, VolumeMount,
};

use crate::api::DeepSeekDeploymentSpec;
use crate::api::validate::{BUNDLED_MINI_MODEL, ModelSource};

/// Where model volumes are mounted in the engine and download containers.
pub const MODEL_DIR: &str = "/models";
/// Name of the model volume.
pub const MODEL_VOLUME: &str = "model";
/// Name of the download init container.
pub const DOWNLOAD_CONTAINER: &str = "model-download";

/// The pieces of a pod that deliver the model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelMount {
    /// Value of the engine's `--model` flag.
    pub model_arg: String,
    /// The model volume, if the source needs one.
    pub volume: Option<Volume>,
    /// Read-only mount of the model volume in the engine container.
    pub mount: Option<VolumeMount>,
    /// The init container that downloads the model, for hf:// and s3://.
    pub download: Option<Container>,
}

impl ModelMount {
    /// Works out volume, mount, init container and `--model` for a parsed source.
    pub fn new(source: &ModelSource, spec: &DeepSeekDeploymentSpec) -> Self {
        let read_only_mount = || VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: MODEL_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        };
        match source {
            ModelSource::BuiltinTiny => Self {
                model_arg: spec.model.source.clone(),
                volume: None,
                mount: None,
                download: None,
            },
            ModelSource::BuiltinMini => Self {
                model_arg: BUNDLED_MINI_MODEL.into(),
                volume: None,
                mount: None,
                download: None,
            },
            ModelSource::Pvc { claim, path } => Self {
                model_arg: join(MODEL_DIR, path),
                volume: Some(Volume {
                    name: MODEL_VOLUME.into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.clone(),
                        read_only: Some(true),
                    }),
                    ..Volume::default()
                }),
                mount: Some(read_only_mount()),
                download: None,
            },
            ModelSource::HostPath(path) => Self {
                model_arg: MODEL_DIR.into(),
                volume: Some(Volume {
                    name: MODEL_VOLUME.into(),
                    host_path: Some(HostPathVolumeSource {
                        path: path.clone(),
                        type_: Some("Directory".into()),
                    }),
                    ..Volume::default()
                }),
                mount: Some(read_only_mount()),
                download: None,
            },
            ModelSource::HuggingFace { .. } | ModelSource::S3 { .. } => Self {
                model_arg: MODEL_DIR.into(),
                volume: Some(Volume {
                    name: MODEL_VOLUME.into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: None,
                        size_limit: Some(spec.model.download_size_limit.clone()),
                        ..EmptyDirVolumeSource::default()
                    }),
                    ..Volume::default()
                }),
                mount: Some(read_only_mount()),
                download: Some(download_container(spec)),
            },
        }
    }
}

fn download_container(spec: &DeepSeekDeploymentSpec) -> Container {
    Container {
        security_context: Some(super::group::restricted_security_context()),
        name: DOWNLOAD_CONTAINER.into(),
        image: Some(spec.engine.image.clone()),
        image_pull_policy: Some(spec.engine.image_pull_policy.as_str().into()),
        command: Some(vec!["deepseek-engine".into()]),
        args: Some(vec![
            "download".into(),
            "--source".into(),
            spec.model.source.clone(),
            "--dest".into(),
            MODEL_DIR.into(),
        ]),
        env_from: spec.model.credentials_secret.as_ref().map(|name| {
            vec![EnvFromSource {
                secret_ref: Some(SecretEnvSource {
                    name: name.clone(),
                    optional: Some(false),
                }),
                ..EnvFromSource::default()
            }]
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: MODEL_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn join(dir: &str, rel: &str) -> String {
    if rel.is_empty() {
        dir.to_string()
    } else {
        format!("{dir}/{rel}")
    }
}
