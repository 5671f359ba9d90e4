//! The device memory plan: weights, a workspace for the largest step, and KV pages from what is
//! left. A pure function of the config, the weight size and the free memory, so it is tested
//! without a GPU; the executor logs the plan it runs with. [`placement`] applies the same plan
//! to one replica spread over N GPUs by expert parallelism, from `config.json` alone: what
//! `deepseek-engine plan` prints.

use serde::Serialize;

use super::CudaError;
use super::weights::{DType, config_weight_split};
use crate::model::ModelConfig;

/// Share of free memory the plan may use; the rest is left to the driver, NVRTC modules and
/// allocator fragmentation.
pub const USABLE_FRACTION: f64 = 0.92;

/// How device memory is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Free device memory when planning, bytes.
    pub free_bytes: usize,
    /// `free_bytes` × [`USABLE_FRACTION`].
    pub usable_bytes: usize,
    /// All weights on the device, bytes.
    pub weight_bytes: usize,
    /// Activations of one step of `max_batch_tokens` tokens, bytes.
    pub workspace_bytes: usize,
    /// The most tokens one step may carry (the workspace is sized for it).
    pub max_batch_tokens: usize,
    /// Latent plus indexer-key cache of one token slot over all layers, bytes.
    pub kv_bytes_per_slot: usize,
    /// Token slots per block.
    pub block_size: usize,
    /// Blocks the plan gives the KV cache.
    pub num_blocks: usize,
}

impl MemoryPlan {
    pub fn kv_bytes(&self) -> usize {
        self.num_blocks * self.block_size * self.kv_bytes_per_slot
    }
}

/// Bytes of one token slot of the latent (`[c_kv | k_pe]`) and indexer-key caches, all layers.
pub fn kv_bytes_per_slot(cfg: &ModelConfig, cache: DType) -> usize {
    let (latent, index) = super::weights::cache_row_len(cfg, cache);
    cfg.num_hidden_layers * (latent + index) * cache.bytes()
}

/// Activation bytes of a step of `tokens` tokens whose longest context is `context`: the widest
/// per-token buffers of one layer (they are freed between layers) plus the indexer's score rows.
pub fn workspace_bytes(cfg: &ModelConfig, tokens: usize, context: usize) -> usize {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let attn = cfg.q_lora_rank
        + heads * cfg.qk_head_dim()
        + cfg.latent_dim()
        + cfg.index_n_heads * cfg.index_head_dim
        + cfg.index_head_dim
        + cfg.index_n_heads
        + 2 * heads * cfg.kv_lora_rank
        + heads * cfg.v_head_dim
        + cfg.index_topk;
    let ffn_dense = 3 * cfg.intermediate_size;
    let ffn_moe = cfg.n_routed_experts
        + cfg.num_experts_per_tok * (h + 3 * cfg.moe_intermediate_size + h)
        + 3 * cfg.moe_intermediate_size * cfg.n_shared_experts.max(1);
    let per_token = 4 * h + attn + ffn_dense.max(ffn_moe) + context;
    tokens * per_token * 4 + tokens.min(4096) * cfg.vocab_size * 4
}

/// Splits `free_bytes`: weights first, the workspace for `max_batch_tokens` at full context next,
/// then as many KV blocks as fit (`requested_blocks` caps them when given).
pub fn plan(
    cfg: &ModelConfig,
    weight_bytes: usize,
    cache: DType,
    free_bytes: usize,
    block_size: usize,
    max_batch_tokens: usize,
    requested_blocks: Option<usize>,
) -> Result<MemoryPlan, CudaError> {
    let usable = (free_bytes as f64 * USABLE_FRACTION) as usize;
    let workspace = workspace_bytes(cfg, max_batch_tokens, cfg.max_position_embeddings);
    let per_slot = kv_bytes_per_slot(cfg, cache);
    let per_block = per_slot * block_size.max(1);
    let left = usable.saturating_sub(weight_bytes + workspace);
    let fit_blocks = left / per_block.max(1);
    let num_blocks = requested_blocks.unwrap_or(fit_blocks);
    const MIB: usize = 1 << 20;
    if weight_bytes + workspace + num_blocks * per_block > usable || num_blocks == 0 {
        return Err(CudaError::DoesNotFit {
            weights_mib: weight_bytes.div_ceil(MIB),
            workspace_mib: workspace.div_ceil(MIB),
            kv_mib: (num_blocks.max(1) * per_block).div_ceil(MIB),
            usable_mib: usable / MIB,
            free_mib: free_bytes / MIB,
        });
    }
    Ok(MemoryPlan {
        free_bytes,
        usable_bytes: usable,
        weight_bytes,
        workspace_bytes: workspace,
        max_batch_tokens,
        kv_bytes_per_slot: per_slot,
        block_size,
        num_blocks,
    })
}

/// Send and receive buffers of one rank's expert-parallel all-to-all, bytes: bf16 hidden rows,
/// one per (token, chosen expert) of a local step, each way. A rank may be sent more rows than
/// that when routing is skewed (at most `world × tokens × min(top-k, experts per rank)`); it
/// takes them in rounds of this size, as DeepEP's normal mode does with its fixed buffers, so
/// the buffers do not grow with the world. Expert GEMMs run per round, inside
/// [`workspace_bytes`]. Zero without expert parallelism.
pub fn dispatch_bytes(cfg: &ModelConfig, world: usize, tokens: usize) -> usize {
    if world <= 1 || !cfg.has_moe() {
        return 0;
    }
    let rows = tokens * cfg.num_experts_per_tok;
    2 * rows * cfg.hidden_size * DType::Bf16.bytes()
}

/// What `deepseek-engine plan` is asked: one replica over `gpus` devices of `gpu_memory_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest {
    /// GPUs of one replica (the expert-parallel world).
    pub gpus: usize,
    /// Memory of each GPU, bytes (the plan takes it as free).
    pub gpu_memory_bytes: usize,
    pub weights: DType,
    pub cache: DType,
    /// Token slots per KV block.
    pub block_size: usize,
    /// The most tokens one step of one rank carries (`--max-num-batched-tokens`).
    pub max_batch_tokens: usize,
    /// The longest sequence to serve; the config's `max_position_embeddings` when `None`.
    pub max_model_len: Option<usize>,
    /// Sequences the replica runs at once (`--max-num-seqs`); attention is data-parallel, so
    /// they spread over the GPUs, and each sequence's KV cache lives on one GPU.
    pub max_num_seqs: usize,
}

/// The per-GPU placement of one replica. Every byte figure is per GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// Whether the replica can be served as asked.
    pub fits: bool,
    /// Why not, when it does not fit.
    pub reason: Option<String>,
    pub gpus: usize,
    pub gpu_memory_bytes: usize,
    /// Memory the plan may use ([`USABLE_FRACTION`] of the GPU).
    pub usable_bytes: usize,
    pub weight_dtype: &'static str,
    pub kv_cache_dtype: &'static str,
    /// Routed experts each GPU holds, per MoE layer.
    pub experts_per_gpu: usize,
    /// Weights every GPU holds (attention, indexers, dense layers, shared experts, embeddings).
    pub replicated_weight_bytes: usize,
    /// This GPU's share of the routed experts.
    pub routed_expert_bytes_per_gpu: usize,
    /// `replicated_weight_bytes + routed_expert_bytes_per_gpu`.
    pub per_gpu_weight_bytes: usize,
    /// Activations of the largest step, bytes.
    pub workspace_bytes: usize,
    /// Expert-parallel all-to-all buffers, bytes.
    pub dispatch_bytes: usize,
    /// KV-cache bytes per token slot (latent + indexer key, all layers).
    pub kv_bytes_per_token: usize,
    /// Token slots the KV cache of one GPU holds (whole blocks).
    pub kv_tokens_per_gpu: usize,
    pub kv_cache_bytes: usize,
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    /// The context every one of `max_num_seqs` sequences can reach at once, spread evenly
    /// over the GPUs.
    pub max_context_at_max_num_seqs: usize,
}

/// Places one replica of `cfg` over `req.gpus` GPUs: experts split into equal contiguous ranges,
/// everything else replicated, and [`plan`] on each GPU for the rest. Never fails: a request
/// that cannot be served comes back with `fits: false` and the reason.
pub fn placement(cfg: &ModelConfig, req: &PlacementRequest) -> Placement {
    let gpus = req.gpus.max(1);
    let split = config_weight_split(cfg, req.weights);
    let experts_per_gpu = cfg.n_routed_experts / gpus;
    let max_model_len = req.max_model_len.unwrap_or(cfg.max_position_embeddings);
    let workspace = workspace_bytes(cfg, req.max_batch_tokens, cfg.max_position_embeddings);
    let dispatch = dispatch_bytes(cfg, gpus, req.max_batch_tokens);
    let per_gpu_weights = split.per_rank(gpus);
    let mut p = Placement {
        fits: false,
        reason: None,
        gpus: req.gpus,
        gpu_memory_bytes: req.gpu_memory_bytes,
        usable_bytes: (req.gpu_memory_bytes as f64 * USABLE_FRACTION) as usize,
        weight_dtype: req.weights.suffix(),
        kv_cache_dtype: req.cache.suffix(),
        experts_per_gpu,
        replicated_weight_bytes: split.replicated,
        routed_expert_bytes_per_gpu: split.routed_experts / gpus,
        per_gpu_weight_bytes: per_gpu_weights,
        workspace_bytes: workspace,
        dispatch_bytes: dispatch,
        kv_bytes_per_token: kv_bytes_per_slot(cfg, req.cache),
        kv_tokens_per_gpu: 0,
        kv_cache_bytes: 0,
        max_model_len,
        max_num_seqs: req.max_num_seqs,
        max_context_at_max_num_seqs: 0,
    };
    if req.gpus == 0 {
        p.reason = Some("--gpus must be at least 1".into());
        return p;
    }
    if cfg.n_routed_experts > 0 && !cfg.n_routed_experts.is_multiple_of(req.gpus) {
        p.reason = Some(format!(
            "{} routed experts cannot be split evenly over {} GPUs",
            cfg.n_routed_experts, req.gpus
        ));
        return p;
    }
    match plan(
        cfg,
        per_gpu_weights + dispatch,
        req.cache,
        req.gpu_memory_bytes,
        req.block_size,
        req.max_batch_tokens,
        None,
    ) {
        Err(e) => p.reason = Some(e.to_string()),
        Ok(m) => {
            p.kv_tokens_per_gpu = m.num_blocks * m.block_size;
            p.kv_cache_bytes = m.kv_bytes();
            let per_gpu_seqs = req.max_num_seqs.div_ceil(gpus).max(1);
            p.max_context_at_max_num_seqs = (p.kv_tokens_per_gpu / per_gpu_seqs).min(max_model_len);
            if p.kv_tokens_per_gpu < max_model_len {
                p.reason = Some(format!(
                    "the KV cache holds {} tokens per GPU, fewer than one sequence of max_model_len {max_model_len}",
                    p.kv_tokens_per_gpu
                ));
            } else {
                p.fits = true;
            }
        }
    }
    p
}

impl Placement {
    /// The placement as a table for people (`deepseek-engine plan` without `--json`).
    pub fn table(&self) -> String {
        let gib = |b: usize| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64);
        let rows: Vec<(&str, String)> = vec![
            ("GPUs per replica", self.gpus.to_string()),
            ("GPU memory", gib(self.gpu_memory_bytes)),
            ("usable (plan)", gib(self.usable_bytes)),
            (
                "weights / KV cache",
                format!("{} / {}", self.weight_dtype, self.kv_cache_dtype),
            ),
            (
                "routed experts per GPU",
                format!("{} per MoE layer", self.experts_per_gpu),
            ),
            ("replicated weights", gib(self.replicated_weight_bytes)),
            ("routed experts", gib(self.routed_expert_bytes_per_gpu)),
            ("weights per GPU", gib(self.per_gpu_weight_bytes)),
            ("step workspace", gib(self.workspace_bytes)),
            ("all-to-all buffers", gib(self.dispatch_bytes)),
            ("KV cache", gib(self.kv_cache_bytes)),
            ("KV bytes per token", self.kv_bytes_per_token.to_string()),
            ("KV tokens per GPU", self.kv_tokens_per_gpu.to_string()),
            ("max_model_len", self.max_model_len.to_string()),
            (
                "context per sequence",
                format!(
                    "{} at max-num-seqs {}",
                    self.max_context_at_max_num_seqs, self.max_num_seqs
                ),
            ),
        ];
        let mut out = String::from("per GPU\n");
        for (k, v) in rows {
            out.push_str(&format!("  {k:<24} {v}\n"));
        }
        match &self.reason {
            None => out.push_str("fits: yes\n"),
            Some(r) => out.push_str(&format!("fits: no: {r}\n")),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn released() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-deep/config.json");
        let mut c = ModelConfig::from_file(&path).unwrap();
        // The released shapes that matter for the plan (DEEPSEEK_V32.md §1).
        c.num_hidden_layers = 61;
        c.kv_lora_rank = 512;
        c.qk_rope_head_dim = 64;
        c.index_head_dim = 128;
        c
    }

    #[test]
    fn a_bf16_slot_of_the_released_model_takes_61_layers_of_704_values() {
        // 576 latent + 128 indexer values, 2 bytes each, 61 layers.
        assert_eq!(kv_bytes_per_slot(&released(), DType::Bf16), 61 * 704 * 2);
        assert_eq!(kv_bytes_per_slot(&released(), DType::F32), 61 * 704 * 4);
    }

    #[test]
    fn an_fp8_slot_takes_the_656_byte_latent_row_and_the_132_byte_key() {
        // FlashMLA's V3.2 row (512 E4M3 + 4 f32 scales + 64 bf16) and DeepGEMM's indexer key
        // (128 E4M3 + 1 f32 scale): 48.1 KB per token over 61 layers.
        assert_eq!(kv_bytes_per_slot(&released(), DType::Fp8), 61 * (656 + 132));
    }

    #[test]
    fn blocks_fill_what_weights_and_workspace_leave() {
        let c = released();
        let free = 100 << 30;
        let p = plan(&c, 40 << 30, DType::Bf16, free, 64, 256, None).unwrap();
        let used = p.weight_bytes + p.workspace_bytes + p.kv_bytes();
        assert!(used <= p.usable_bytes);
        // One more block would not fit.
        assert!(used + 64 * p.kv_bytes_per_slot > p.usable_bytes);
        assert!(p.num_blocks > 1000, "{p:?}");
    }

    #[test]
    fn weights_larger_than_the_device_are_refused_with_sizes() {
        let c = released();
        let err = plan(&c, 700 << 30, DType::Bf16, 140 << 30, 64, 256, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("does not fit") && msg.contains("716800 MiB"),
            "{msg}"
        );
    }

    #[test]
    fn a_requested_cache_that_does_not_fit_is_refused() {
        let c = released();
        assert!(plan(&c, 1 << 30, DType::Bf16, 8 << 30, 64, 16, Some(4)).is_ok());
        assert!(plan(&c, 1 << 30, DType::Bf16, 8 << 30, 64, 16, Some(1_000_000)).is_err());
    }

    fn v32() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/deepseek-v3.2/config.json");
        ModelConfig::from_file(&path).unwrap()
    }

    const GIB: usize = 1 << 30;

    fn ask(gpus: usize, gib: usize) -> PlacementRequest {
        PlacementRequest {
            gpus,
            gpu_memory_bytes: gib * GIB,
            weights: DType::Fp8,
            cache: DType::Fp8,
            block_size: 64,
            max_batch_tokens: 2048,
            max_model_len: Some(131072),
            max_num_seqs: 64,
        }
    }

    #[test]
    fn the_released_model_weighs_about_690_gb_in_fp8() {
        let split = config_weight_split(&v32(), DType::Fp8);
        let total = split.per_rank(1) as f64 / 1e9;
        // 671B parameters, most of them E4M3 codes plus 128x128 scales; embeddings, lm_head,
        // routers and kv_b_proj in bf16. The MTP layer is not served.
        assert!((640.0..720.0).contains(&total), "{total} GB");
        // 58 MoE layers x 256 experts x 3 matrices of 7168 x 2048.
        let experts = 58 * 256 * 3 * (7168 * 2048 + 4 * 56 * 16);
        assert_eq!(split.routed_experts, experts);
    }

    #[test]
    fn the_released_model_fits_on_8_gpus_of_140_gib_with_fp8_weights() {
        let p = placement(&v32(), &ask(8, 140));
        assert!(p.fits, "{}", p.table());
        assert_eq!(p.experts_per_gpu, 32);
        // What remains for the KV cache: several full-length sequences per GPU.
        assert!(p.kv_tokens_per_gpu > 4 * 131072, "{}", p.table());
        assert_eq!(p.kv_tokens_per_gpu % 64, 0);
        // 64 sequences over 8 GPUs: 8 share each GPU's cache.
        assert_eq!(
            p.max_context_at_max_num_seqs,
            (p.kv_tokens_per_gpu / 8).min(131072)
        );
        assert!(
            p.per_gpu_weight_bytes + p.workspace_bytes + p.dispatch_bytes + p.kv_cache_bytes
                <= p.usable_bytes
        );
    }

    #[test]
    fn the_released_model_does_not_fit_on_8_gpus_of_80_gib() {
        let p = placement(&v32(), &ask(8, 80));
        assert!(!p.fits);
        let why = p.reason.unwrap();
        assert!(why.contains("does not fit"), "{why}");
    }

    #[test]
    fn the_released_model_fits_on_16_gpus_of_80_gib() {
        let p = placement(&v32(), &ask(16, 80));
        assert!(p.fits, "{}", p.table());
        assert_eq!(p.experts_per_gpu, 16);
        assert!(p.kv_tokens_per_gpu >= 131072, "{}", p.table());
    }

    #[test]
    fn an_uneven_expert_split_and_zero_gpus_are_refused_with_the_reason() {
        let p = placement(&v32(), &ask(3, 140));
        assert!(!p.fits && p.reason.unwrap().contains("256 routed experts"));
        let p = placement(&v32(), &ask(0, 140));
        assert!(!p.fits && p.reason.unwrap().contains("--gpus"));
    }

    #[test]
    fn a_kv_cache_shorter_than_max_model_len_does_not_fit() {
        let mut r = ask(16, 80);
        r.max_model_len = Some(10_000_000);
        let p = placement(&v32(), &r);
        assert!(!p.fits);
        assert!(p.reason.unwrap().contains("fewer than one sequence"));
    }

    #[test]
    fn bf16_weights_need_twice_the_expert_bytes() {
        let mut r = ask(8, 140);
        r.weights = DType::Bf16;
        let p = placement(&v32(), &r);
        assert!(!p.fits, "{}", p.table());
        let fp8 = placement(&v32(), &ask(8, 140));
        let ratio = p.routed_expert_bytes_per_gpu as f64 / fp8.routed_expert_bytes_per_gpu as f64;
        assert!((1.95..2.0).contains(&ratio), "{ratio}");
    }
}
