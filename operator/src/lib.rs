//! deepseek-operator: reconciles `DeepSeekDeployment` resources into expert-parallel engine groups.
//!
//! - [`api`]: the CRD types, the public contract.
//! - [`render`]: spec and observed state to desired Kubernetes objects; pure.
//! - [`controller`]: watches, server-side apply, status, Events, leader election; the only I/O.
//! - [`autoscale`]: reserved for the group autoscaler.
//! - [`metrics`]: the operator's own Prometheus metrics.

pub mod api;
pub mod autoscale;
pub mod controller;
pub mod crd;
mod error;
pub mod metrics;
pub mod render;

#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};
