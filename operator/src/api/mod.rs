//! The `DeepSeekDeployment` API (`serving.deepseek.dev/v1alpha1`): the public contract.
//!
//! Types only. Every `///` comment on a field becomes the text that `kubectl explain` prints, so it
//! speaks to the person writing the manifest. Defaults live in the schema (via `serde(default)`),
//! field ranges are schema `minimum`/`maximum`, and cross-field rules are CEL
//! `x-kubernetes-validations` so the API server refuses bad specs at `kubectl apply`.
//! [`validate`] re-checks the same rules (and a few the schema cannot express) inside the
//! operator, so a spec that slips past an older CRD becomes a status condition, not a crash loop.

mod spec;
mod status;
pub mod validate;

pub use spec::*;
pub use status::*;

#[cfg(test)]
mod schema_check;
#[cfg(test)]
mod tests;
