//! The DeepSeek-V3.2 model: configuration, checkpoint loading and the layer graph.
//!
//! Struct and field names follow the checkpoint's tensor names (`self_attn.q_a_proj`,
//! `self_attn.indexer.wq_b`, `mlp.experts.N.gate_proj`, ...) so a reader can match code to
//! weights. The math is in [`forward`]; DEEPSEEK_V32.md §2 is its specification.

pub mod builtin;
pub mod catalog;
pub mod config;
pub mod forward;
pub mod rope;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

use thiserror::Error;

use crate::backend::cpu::Linear;
use crate::dist::ExpertShard;
pub use config::{MlpKind, ModelConfig};
pub use forward::{ForwardError, LogitsWanted, SeqChunk};
use rope::RopeTable;
use weights::{Checkpoint, TensorSource};

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    #[error("invalid config.json: {0}")]
    InvalidConfig(String),
    #[error("{path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("missing tensor {name} (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor {name} in {path} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        path: PathBuf,
    },
    #[error("tensor {name} has unsupported dtype {dtype}")]
    UnsupportedDtype { name: String, dtype: String },
}

/// The lightning indexer of one layer (DSA's token selector).
#[derive(Debug)]
pub struct Indexer {
    pub wq_b: Linear,
    pub wk: Linear,
    pub k_norm_weight: Vec<f32>,
    pub k_norm_bias: Vec<f32>,
    pub weights_proj: Linear,
}

/// Multi-head latent attention with its indexer.
#[derive(Debug)]
pub struct Attention {
    pub q_a_proj: Linear,
    pub q_a_layernorm: Vec<f32>,
    pub q_b_proj: Linear,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: Vec<f32>,
    /// Per head: `qk_nope_head_dim` rows of W_UK then `v_head_dim` rows of W_UV, each `kv_lora_rank` wide.
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
    pub indexer: Indexer,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// Routed experts with a sigmoid, group-limited router and shared experts.
#[derive(Debug)]
pub struct Moe {
    pub gate: Linear,
    pub e_score_correction_bias: Vec<f32>,
    /// Indexed by expert id; `None` for experts another expert-parallel rank holds.
    pub experts: Vec<Option<Mlp>>,
    pub shared_experts: Option<Mlp>,
}

#[derive(Debug)]
pub enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

#[derive(Debug)]
pub struct DecoderLayer {
    pub input_layernorm: Vec<f32>,
    pub self_attn: Attention,
    pub post_attention_layernorm: Vec<f32>,
    pub mlp: FeedForward,
}

#[derive(Debug)]
pub struct Model {
    pub config: ModelConfig,
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<DecoderLayer>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
    pub rope: RopeTable,
    pub softmax_scale: f32,
    /// Which routed experts this process holds.
    pub shard: ExpertShard,
    /// Tokens routed to each expert by this process's router calls, summed over MoE layers
    /// (expert-load statistics for placement decisions).
    pub expert_routed_tokens: Vec<AtomicU64>,
}

/// Receives a model part by part as it is read, so a loader can move each part elsewhere (a
/// GPU) and drop it before reading the next: host memory then holds one part at a time, not
/// the model. Each routed expert comes on its own, before the layer it belongs to; the layer
/// then comes with `experts` all `None`.
pub trait PartSink {
    type Error: From<ModelError>;
    fn expert(&mut self, layer: usize, expert: usize, mlp: Mlp) -> Result<(), Self::Error>;
    fn layer(&mut self, index: usize, layer: DecoderLayer) -> Result<(), Self::Error>;
}

/// Collects the parts into the layers of a host [`Model`].
#[derive(Default)]
struct HostLayers {
    pending: Vec<Option<Mlp>>,
    layers: Vec<DecoderLayer>,
}

impl PartSink for HostLayers {
    type Error = ModelError;

    fn expert(&mut self, _layer: usize, expert: usize, mlp: Mlp) -> Result<(), ModelError> {
        if self.pending.len() <= expert {
            self.pending.resize_with(expert + 1, || None);
        }
        self.pending[expert] = Some(mlp);
        Ok(())
    }
    fn layer(&mut self, _index: usize, mut layer: DecoderLayer) -> Result<(), ModelError> {
        if let FeedForward::Moe(moe) = &mut layer.mlp {
            for (slot, mlp) in moe.experts.iter_mut().zip(self.pending.drain(..)) {
                *slot = mlp;
            }
        }
        self.pending.clear();
        self.layers.push(layer);
        Ok(())
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    /// Keep FP8 linears as codes only (no f32 copy on the host).
    fp8_codes_only: bool,
}

/// How a model is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Keep the linears an FP8 checkpoint stores in FP8 as E4M3 codes and scales only, without
    /// their f32 dequantization: a quarter of the host memory, for a GPU that keeps them in FP8.
    /// Such a model can be uploaded to a GPU but not run by the CPU backend. `kv_b_proj` keeps
    /// its f32 copy (the GPU multiplies by it in bf16).
    pub fp8_codes_only: bool,
}

impl Loader<'_> {
    fn vec(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.src.f32_tensor(name, &[len])
    }
    fn linear(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError> {
        if self.fp8_codes_only {
            let weight = format!("{name}.weight");
            if let Some(q) = self.src.fp8_codes(&weight, &[out_dim, in_dim])? {
                return Ok(Linear {
                    weight: Vec::new(),
                    out_dim,
                    in_dim,
                    fp8: Some(std::sync::Arc::new(q)),
                });
            }
        }
        self.linear_f32(name, out_dim, in_dim)
    }
    /// A linear with its f32 values always read, also under `fp8_codes_only`.
    fn linear_f32(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<Linear, ModelError> {
        let name = format!("{name}.weight");
        let mut l = Linear::new(
            self.src.f32_tensor(&name, &[out_dim, in_dim])?,
            out_dim,
            in_dim,
        );
        l.fp8 = self.src.fp8_tensor(&name).map(std::sync::Arc::new);
        Ok(l)
    }
    fn mlp(&self, prefix: &str, hidden: usize, inter: usize) -> Result<Mlp, ModelError> {
        Ok(Mlp {
            gate_proj: self.linear(&format!("{prefix}.gate_proj"), inter, hidden)?,
            up_proj: self.linear(&format!("{prefix}.up_proj"), inter, hidden)?,
            down_proj: self.linear(&format!("{prefix}.down_proj"), hidden, inter)?,
        })
    }
}

impl Model {
    /// Loads `config.json` and the safetensors checkpoint in `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        Self::load_sharded(dir, ExpertShard::WHOLE)
    }

    /// Loads only this rank's routed experts (plus everything replicated).
    pub fn load_sharded(dir: &Path, shard: ExpertShard) -> Result<Self, ModelError> {
        Self::load_with(dir, shard, LoadOptions::default())
    }

    /// [`Model::load_sharded`] with [`LoadOptions`].
    pub fn load_with(
        dir: &Path,
        shard: ExpertShard,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let block = config
            .quantization
            .as_ref()
            .map(|q| q.block)
            .unwrap_or([128, 128]);
        let ckpt = Checkpoint::open(dir, block)?;
        let model = Self::build(config, &ckpt, shard, options)?;
        let mtp_prefix = format!("model.layers.{}.", model.config.num_hidden_layers);
        let (mtp, other): (Vec<String>, Vec<String>) = ckpt
            .unconsumed()
            .into_iter()
            .partition(|n| n.starts_with(&mtp_prefix));
        if !mtp.is_empty() {
            tracing::info!(
                layer = model.config.num_hidden_layers,
                tensors = mtp.len(),
                "skipping the multi-token-prediction layer (not used for plain decoding)"
            );
        }
        let other: Vec<_> = other
            .into_iter()
            .filter(|n| {
                !(n.ends_with("rotary_emb.inv_freq")
                    || (shard.world > 1 && n.contains(".mlp.experts.")))
            })
            .collect();
        if !other.is_empty() {
            tracing::warn!(count = other.len(), first = %other[0], "checkpoint holds tensors the model does not use");
        }
        Ok(model)
    }

    /// Builds the model from any tensor source, validating every tensor's shape.
    pub fn from_source(config: ModelConfig, src: &dyn TensorSource) -> Result<Self, ModelError> {
        Self::from_source_sharded(config, src, ExpertShard::WHOLE)
    }

    /// Like [`Model::from_source`], reading only the routed experts `shard` owns.
    pub fn from_source_sharded(
        config: ModelConfig,
        src: &dyn TensorSource,
        shard: ExpertShard,
    ) -> Result<Self, ModelError> {
        Self::build(config, src, shard, LoadOptions::default())
    }

    /// Reads every decoder layer of `config` from `src` into `sink`, one part at a time:
    /// routed experts one by one (only those `shard` owns), then the rest of their layer.
    /// Embeddings, the final norm and lm_head are not included.
    pub fn stream_layers<S: PartSink + ?Sized>(
        config: &ModelConfig,
        src: &dyn TensorSource,
        shard: ExpertShard,
        options: LoadOptions,
        sink: &mut S,
    ) -> Result<(), S::Error> {
        if shard.world > 1 && !config.n_routed_experts.is_multiple_of(shard.world) {
            return Err(ModelError::InvalidConfig(format!(
                "n_routed_experts ({}) cannot be split over {} expert-parallel ranks",
                config.n_routed_experts, shard.world
            ))
            .into());
        }
        let l = Loader {
            src,
            fp8_codes_only: options.fp8_codes_only,
        };
        let c = config;
        let h = c.hidden_size;
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let self_attn = Attention {
                q_a_proj: l.linear(&format!("{a}.q_a_proj"), c.q_lora_rank, h)?,
                q_a_layernorm: l.vec(&format!("{a}.q_a_layernorm.weight"), c.q_lora_rank)?,
                q_b_proj: l.linear(
                    &format!("{a}.q_b_proj"),
                    c.num_attention_heads * c.qk_head_dim(),
                    c.q_lora_rank,
                )?,
                kv_a_proj_with_mqa: l.linear(
                    &format!("{a}.kv_a_proj_with_mqa"),
                    c.latent_dim(),
                    h,
                )?,
                kv_a_layernorm: l.vec(&format!("{a}.kv_a_layernorm.weight"), c.kv_lora_rank)?,
                // The GPU multiplies by it head by head in bf16: read as f32 in any case.
                kv_b_proj: l.linear_f32(
                    &format!("{a}.kv_b_proj"),
                    c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                    c.kv_lora_rank,
                )?,
                o_proj: l.linear(
                    &format!("{a}.o_proj"),
                    h,
                    c.num_attention_heads * c.v_head_dim,
                )?,
                indexer: Indexer {
                    wq_b: l.linear(
                        &format!("{a}.indexer.wq_b"),
                        c.index_n_heads * c.index_head_dim,
                        c.q_lora_rank,
                    )?,
                    wk: l.linear(&format!("{a}.indexer.wk"), c.index_head_dim, h)?,
                    k_norm_weight: l
                        .vec(&format!("{a}.indexer.k_norm.weight"), c.index_head_dim)?,
                    k_norm_bias: l.vec(&format!("{a}.indexer.k_norm.bias"), c.index_head_dim)?,
                    weights_proj: l.linear(
                        &format!("{a}.indexer.weights_proj"),
                        c.index_n_heads,
                        h,
                    )?,
                },
            };
            let mlp = match c.mlp_layer_types[i] {
                MlpKind::Dense => {
                    FeedForward::Dense(l.mlp(&format!("{p}.mlp"), h, c.intermediate_size)?)
                }
                MlpKind::Moe => FeedForward::Moe(Moe {
                    gate: l.linear(&format!("{p}.mlp.gate"), c.n_routed_experts, h)?,
                    e_score_correction_bias: l.vec(
                        &format!("{p}.mlp.gate.e_score_correction_bias"),
                        c.n_routed_experts,
                    )?,
                    experts: {
                        for e in 0..c.n_routed_experts {
                            if shard.owns(e, c.n_routed_experts) {
                                let m = l.mlp(
                                    &format!("{p}.mlp.experts.{e}"),
                                    h,
                                    c.moe_intermediate_size,
                                )?;
                                sink.expert(i, e, m)?;
                            }
                        }
                        (0..c.n_routed_experts).map(|_| None).collect()
                    },
                    shared_experts: if c.n_shared_experts > 0 {
                        Some(l.mlp(
                            &format!("{p}.mlp.shared_experts"),
                            h,
                            c.moe_intermediate_size * c.n_shared_experts,
                        )?)
                    } else {
                        None
                    },
                }),
            };
            sink.layer(
                i,
                DecoderLayer {
                    input_layernorm: l.vec(&format!("{p}.input_layernorm.weight"), h)?,
                    self_attn,
                    post_attention_layernorm: l
                        .vec(&format!("{p}.post_attention_layernorm.weight"), h)?,
                    mlp,
                },
            )?;
        }
        Ok(())
    }

    fn build(
        config: ModelConfig,
        src: &dyn TensorSource,
        shard: ExpertShard,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let mut host = HostLayers::default();
        Self::stream_layers(&config, src, shard, options, &mut host)?;
        let layers = host.layers;
        let l = Loader {
            src,
            fp8_codes_only: options.fp8_codes_only,
        };
        let c = &config;
        let h = c.hidden_size;
        let embed_tokens = src.f32_tensor("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !src.contains("lm_head.weight") {
            Linear::new(embed_tokens.clone(), c.vocab_size, h)
        } else {
            l.linear("lm_head", c.vocab_size, h)?
        };
        let norm = l.vec("model.norm.weight", h)?;
        let rope = RopeTable::new(c);
        let softmax_scale = c.softmax_scale();
        if shard.world > 1 {
            let per = shard.per_rank(c.n_routed_experts);
            tracing::info!(
                rank = shard.rank,
                world = shard.world,
                experts = format!("{}..{}", shard.rank * per, (shard.rank + 1) * per),
                "holding this rank's routed experts; attention, dense layers and shared experts are replicated"
            );
        }
        let expert_routed_tokens = (0..c.n_routed_experts).map(|_| AtomicU64::new(0)).collect();
        Ok(Model {
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope,
            softmax_scale,
            shard,
            expert_routed_tokens,
            config,
        })
    }
}
