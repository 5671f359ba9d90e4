//! Group autoscaling: reading each group leader's `vllm:kv_cache_usage_perc` and
//! `vllm:num_requests_waiting`, and deciding the number of groups from that history.
//!
//! Reserved for the autoscaling work. The settings it will consume, `spec.autoscaling`
//! ([`crate::api::AutoscalingSpec`]), are defined and validated already; while this module is
//! empty the operator never changes `spec.replicas`, so the scale subresource (an external
//! HPA or KEDA) or a person sets it.
