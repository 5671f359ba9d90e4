//! The device memory plan: weights, a workspace for the largest step, and KV pages from what is
//! left. A pure function of the config, the weight size and the free memory, so it is tested
//! without a GPU; the executor logs the plan it runs with.

use super::CudaError;
use super::weights::DType;
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
}
