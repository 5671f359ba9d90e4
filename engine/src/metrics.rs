//! Prometheus metrics. Model-server figures keep vLLM's exact names (`vllm:*`, with a
//! `model_name` label) because the autoscalers and routers users already run read them by name;
//! figures of our own go under `deepseek_engine_*`. README.md documents each one.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub kv_cache_usage_perc: Gauge,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_request_latency: Histogram,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub num_preemptions: IntCounter,
    pub request_success: IntCounterVec,
    pub projected_kv_usage: Gauge,
    /// `deepseek_engine_kv_cache_fullest_partition_usage_perc`: the fullest expert-parallel
    /// rank's KV-cache use (equal to `vllm:kv_cache_usage_perc` on a single rank).
    pub fullest_partition_kv_usage: Gauge,
    pub model_load_progress: Gauge,
    pub requests_rejected: IntCounterVec,
    pub indexer_selected_tokens: IntCounter,
    pub attention_resident_tokens: IntCounter,
    pub step_duration: HistogramVec,
    pub ready: IntGauge,
    pub expert_routed_tokens: IntCounterVec,
    pub http_connections: IntGauge,
    pub http_connections_refused: IntCounter,
    cache_config_info: IntGaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];

impl Metrics {
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new();
        let label = |o: Opts| o.const_label("model_name", model_name);
        let hlabel = |o: HistogramOpts| {
            o.const_label("model_name", model_name)
                .buckets(LATENCY_BUCKETS.to_vec())
        };
        macro_rules! reg {
            ($m:expr) => {{
                let m = $m;
                // Names are fixed and distinct; registration can only fail on a programming error.
                registry
                    .register(Box::new(m.clone()))
                    .expect("metric registered once");
                m
            }};
        }
        Metrics {
            num_requests_running: reg!(
                IntGauge::with_opts(label(Opts::new("vllm:num_requests_running", "Requests running on the engine"))).unwrap()
            ),
            num_requests_waiting: reg!(IntGauge::with_opts(label(Opts::new(
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled"
            )))
            .unwrap()),
            kv_cache_usage_perc: reg!(Gauge::with_opts(label(Opts::new(
                "vllm:kv_cache_usage_perc",
                "Fraction of KV-cache blocks in use (0..1)"
            )))
            .unwrap()),
            prompt_tokens: reg!(IntCounter::with_opts(label(Opts::new("vllm:prompt_tokens_total", "Prompt tokens processed"))).unwrap()),
            generation_tokens: reg!(
                IntCounter::with_opts(label(Opts::new("vllm:generation_tokens_total", "Tokens generated"))).unwrap()
            ),
            time_to_first_token: reg!(Histogram::with_opts(hlabel(HistogramOpts::new(
                "vllm:time_to_first_token_seconds",
                "Time from arrival to the first generated token"
            )))
            .unwrap()),
            time_per_output_token: reg!(Histogram::with_opts(hlabel(HistogramOpts::new(
                "vllm:time_per_output_token_seconds",
                "Time between consecutive generated tokens"
            )))
            .unwrap()),
            e2e_request_latency: reg!(Histogram::with_opts(hlabel(HistogramOpts::new(
                "vllm:e2e_request_latency_seconds",
                "Time from arrival to the last token"
            )))
            .unwrap()),
            prefix_cache_queries: reg!(IntCounter::with_opts(label(Opts::new(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache"
            )))
            .unwrap()),
            prefix_cache_hits: reg!(IntCounter::with_opts(label(Opts::new(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens served from the prefix cache"
            )))
            .unwrap()),
            num_preemptions: reg!(IntCounter::with_opts(label(Opts::new(
                "vllm:num_preemptions_total",
                "Sequences preempted for lack of KV blocks (recomputed later)"
            )))
            .unwrap()),
            request_success: reg!(IntCounterVec::new(
                label(Opts::new("vllm:request_success_total", "Finished requests by finish reason")),
                &["finished_reason"]
            )
            .unwrap()),
            cache_config_info: reg!(IntGaugeVec::new(
                label(Opts::new("vllm:cache_config_info", "KV-cache geometry (value is 1)")),
                &["block_size", "num_gpu_blocks"]
            )
            .unwrap()),
            projected_kv_usage: reg!(Gauge::with_opts(Opts::new(
                "deepseek_engine_kv_cache_projected_usage_perc",
                "Blocks in use plus blocks running requests still need for their max_tokens, over all blocks (may exceed 1)"
            ))
            .unwrap()),
            fullest_partition_kv_usage: reg!(Gauge::with_opts(Opts::new(
                "deepseek_engine_kv_cache_fullest_partition_usage_perc",
                "Fraction of blocks in use in the fullest KV partition (one per expert-parallel rank; 0..1)"
            ))
            .unwrap()),
            model_load_progress: reg!(Gauge::with_opts(Opts::new(
                "deepseek_engine_model_load_progress",
                "Fraction of model weight bytes loaded (0..1)"
            ))
            .unwrap()),
            requests_rejected: reg!(IntCounterVec::new(
                Opts::new("deepseek_engine_requests_rejected_total", "Requests refused at admission, by reason"),
                &["reason"]
            )
            .unwrap()),
            indexer_selected_tokens: reg!(IntCounter::with_opts(Opts::new(
                "deepseek_engine_indexer_selected_tokens_total",
                "Key tokens the lightning indexer selected for attention, summed over query tokens (per layer)"
            ))
            .unwrap()),
            attention_resident_tokens: reg!(IntCounter::with_opts(Opts::new(
                "deepseek_engine_attention_resident_tokens_total",
                "Key tokens resident in the cache when each query token attended (per layer); selected/resident is DSA's sparsity"
            ))
            .unwrap()),
            step_duration: reg!(HistogramVec::new(
                HistogramOpts::new("deepseek_engine_step_duration_seconds", "Duration of one engine step")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["kind"]
            )
            .unwrap()),
            ready: reg!(IntGauge::new("deepseek_engine_ready", "1 when the engine accepts work").unwrap()),
            expert_routed_tokens: reg!(IntCounterVec::new(
                Opts::new(
                    "deepseek_engine_expert_routed_tokens_total",
                    "Tokens the router sent to each routed expert, summed over MoE layers (expert load)"
                ),
                &["expert"]
            )
            .unwrap()),
            http_connections: reg!(IntGauge::new(
                "deepseek_engine_http_connections",
                "Open HTTP connections (under the server's connection limit)"
            )
            .unwrap()),
            http_connections_refused: reg!(IntCounter::new(
                "deepseek_engine_http_connections_refused_total",
                "Connections answered 503 (or closed) because the connection limit was reached"
            )
            .unwrap()),
            registry,
        }
    }

    pub fn set_cache_config(&self, block_size: usize, num_blocks: usize) {
        self.cache_config_info
            .with_label_values(&[&block_size.to_string(), &num_blocks.to_string()])
            .set(1);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vllm_names_autoscalers_read_are_exported_verbatim() {
        let m = Metrics::new("m");
        m.set_cache_config(64, 100);
        m.request_success.with_label_values(&["stop"]).inc();
        let text = m.render();
        for name in [
            "vllm:num_requests_running{model_name=\"m\"} 0",
            "vllm:num_requests_waiting{model_name=\"m\"} 0",
            "vllm:kv_cache_usage_perc{model_name=\"m\"} 0",
            "vllm:cache_config_info{block_size=\"64\",model_name=\"m\",num_gpu_blocks=\"100\"} 1",
            "vllm:time_to_first_token_seconds_bucket",
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"m\"} 1",
            "deepseek_engine_kv_cache_projected_usage_perc",
            "deepseek_engine_kv_cache_fullest_partition_usage_perc 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
