//! The built-in demo model: a small DeepSeek-V3.2-architecture network (MLA, lightning indexer,
//! sparse attention, group-limited MoE with a shared expert, YaRN to 128K positions) whose
//! weights are generated deterministically in memory, so the engine runs with no download.
//! Its output is not meaningful text; it exists to exercise every code path end to end.

use super::config::{MlpKind, ModelConfig, RopeConfig, Yarn};
use super::weights::TensorSource;
use super::{Model, ModelError};

/// Name accepted wherever a model directory is expected.
pub const BUILTIN_MODEL: &str = "builtin";
/// Whether a `--model` value names the built-in model (`builtin`, or the operator's
/// `builtin://tiny` source).
pub fn is_builtin(model: &str) -> bool {
    model == BUILTIN_MODEL || model.starts_with("builtin://")
}

/// Vocabulary of the built-in model (matches the built-in tokenizer's size).
pub const BUILTIN_VOCAB: usize = crate::tokenizer::BUILTIN_VOCAB_SIZE;

pub fn builtin_config() -> ModelConfig {
    ModelConfig {
        vocab_size: BUILTIN_VOCAB,
        hidden_size: 128,
        intermediate_size: 256,
        moe_intermediate_size: 64,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        q_lora_rank: 64,
        kv_lora_rank: 64,
        qk_nope_head_dim: 32,
        qk_rope_head_dim: 16,
        v_head_dim: 32,
        n_routed_experts: 16,
        n_shared_experts: 1,
        num_experts_per_tok: 4,
        n_group: 4,
        topk_group: 2,
        routed_scaling_factor: 2.5,
        norm_topk_prob: true,
        rms_norm_eps: 1e-6,
        max_position_embeddings: 131072,
        rope: RopeConfig {
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 32.0,
                original_max_position_embeddings: 4096.0,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
            }),
        },
        index_n_heads: 4,
        index_head_dim: 32,
        index_topk: 64,
        mlp_layer_types: vec![MlpKind::Dense, MlpKind::Moe, MlpKind::Moe, MlpKind::Moe],
        quantization: None,
        bos_token_id: Some(0),
        eos_token_ids: vec![1],
        tie_word_embeddings: false,
        num_nextn_predict_layers: 0,
    }
}

/// Deterministic pseudo-random weights keyed by tensor name, scaled by 1/sqrt(fan_in).
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights {
    pub seed: u64,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl TensorSource for RandomWeights {
    fn contains(&self, _name: &str) -> bool {
        true
    }

    fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ModelError> {
        let len: usize = shape.iter().product();
        let mut state = name
            .bytes()
            .fold(self.seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut uniform = || (splitmix(&mut state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if name.ends_with("k_norm.bias") {
            return Ok(vec![0.0; len]);
        }
        if name.contains("norm") {
            return Ok(vec![1.0; len]);
        }
        if name.ends_with("e_score_correction_bias") {
            return Ok((0..len).map(|_| 0.05 * uniform()).collect());
        }
        // Uniform(-a, a) has variance a²/3; a = sqrt(3 / fan_in) gives unit-variance outputs.
        let fan_in = if name.contains("embed_tokens") {
            1
        } else {
            *shape.last().unwrap_or(&1)
        };
        let a = (3.0 / fan_in as f32).sqrt();
        Ok((0..len).map(|_| a * uniform()).collect())
    }
}

pub fn builtin_model() -> Result<Model, ModelError> {
    Model::from_source(builtin_config(), &RandomWeights { seed: 0x5eed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_config_is_valid_and_reaches_128k_positions() {
        let c = builtin_config();
        c.validate().unwrap();
        assert_eq!(c.max_position_embeddings, 131072);
        assert!(
            c.index_topk < 128,
            "top-k must be small enough that sparsity selects in tests"
        );
    }

    #[test]
    fn random_weights_are_deterministic_per_name() {
        let r = RandomWeights { seed: 1 };
        assert_eq!(
            r.f32_tensor("a.weight", &[4, 4]).unwrap(),
            r.f32_tensor("a.weight", &[4, 4]).unwrap()
        );
        assert_ne!(
            r.f32_tensor("a.weight", &[4, 4]).unwrap(),
            r.f32_tensor("b.weight", &[4, 4]).unwrap()
        );
    }
}
