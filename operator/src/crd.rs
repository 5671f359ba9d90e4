//! The CustomResourceDefinition as YAML, as printed by `deepseek-operator crd` and kept in
//! `crds/`.

use kube::CustomResourceExt;

use crate::api::DeepSeekDeployment;
use crate::{Error, Result};

/// The CRD manifest for `DeepSeekDeployment`, as YAML.
pub fn crd_yaml() -> Result<String> {
    let crd = DeepSeekDeployment::crd();
    serde_saphyr::to_string(&crd).map_err(|e| Error::Yaml(e.to_string()))
}
