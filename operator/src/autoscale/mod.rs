//! Group autoscaling on KV-cache pressure and queue depth.
//!
//! - [`decide`]: the scaling decision, pure: policy, current count, each group's signals and
//!   the window of earlier recommendations in; desired count, reason and limits out.
//! - [`drain`]: which group leaves (the one with the least in-flight work, after draining) and
//!   which indices new groups take. Pure.
//! - [`sim`]: `deepseek-operator autoscale-sim`, replaying a metrics trace through [`decide`].
//! - [`promtext`]: the Prometheus text-format reader for the leaders' `/metrics`.
//! - [`scrape`]: the I/O edge: reading each group leader's `/metrics`, or a Prometheus server's
//!   query API, with a timeout.
//!
//! With `spec.autoscaling.enabled` the controller runs [`decide`] every poll interval and keeps
//! the result in `status.desiredReplicas`; `spec.replicas` stays as written, so GitOps tools see
//! no drift. Without it, `spec.replicas` rules and an external HPA or KEDA may set it through
//! the scale subresource.

pub mod decide;
pub mod drain;
pub mod promtext;
pub mod scrape;
pub mod sim;

#[cfg(test)]
mod tests;
