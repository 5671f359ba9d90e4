//! The model's weights in device memory. Matrices (linears, embedding, lm_head) are stored in
//! the chosen [`DType`]; norm weights, biases and the router's correction bias stay f32. Names
//! follow the checkpoint, as in [`crate::model`].
//!
//! Not done yet: FP8 e4m3 storage with 128×128 block scales (the production format); the host
//! model holds dequantized f32, so FP8 checkpoints are uploaded as bf16 or f32 for now.

use cudarc::driver::CudaSlice;

use super::CudaError;
use super::device::Device;
use crate::backend::cpu::Linear;
use crate::model::{Attention, FeedForward, Mlp, MlpKind, Model, ModelConfig};

/// Element type of weight matrices (and of the KV cache) in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The kernel-name suffix (`{op}_{dtype}`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

/// A device buffer of f32 values or of bf16 bit patterns.
#[derive(Debug)]
pub enum DevBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DevBuf {
    pub fn upload(dev: &Device, host: &[f32], dtype: DType) -> Result<Self, CudaError> {
        Ok(match dtype {
            DType::F32 => DevBuf::F32(dev.upload(host)?),
            DType::Bf16 => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                DevBuf::Bf16(dev.upload(&bits)?)
            }
        })
    }

    pub fn zeros(dev: &Device, len: usize, dtype: DType) -> Result<Self, CudaError> {
        Ok(match dtype {
            DType::F32 => DevBuf::F32(dev.zeros(len)?),
            DType::Bf16 => DevBuf::Bf16(dev.zeros(len)?),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            DevBuf::F32(_) => DType::F32,
            DevBuf::Bf16(_) => DType::Bf16,
        }
    }

    pub fn ptr(&self, dev: &Device) -> u64 {
        match self {
            DevBuf::F32(s) => dev.ptr(s, 0),
            DevBuf::Bf16(s) => dev.ptr(s, 0),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.len() * 4,
            DevBuf::Bf16(s) => s.len() * 2,
        }
    }
}

/// A `[out, in]` matrix applied as `y = x · Wᵀ`.
#[derive(Debug)]
pub struct DevLinear {
    pub w: DevBuf,
    pub out_dim: usize,
    pub in_dim: usize,
}

impl DevLinear {
    pub fn upload(dev: &Device, l: &Linear, dtype: DType) -> Result<Self, CudaError> {
        Ok(DevLinear {
            w: DevBuf::upload(dev, &l.weight, dtype)?,
            out_dim: l.out_dim,
            in_dim: l.in_dim,
        })
    }
}

#[derive(Debug)]
pub struct DevMlp {
    pub gate_proj: DevLinear,
    pub up_proj: DevLinear,
    pub down_proj: DevLinear,
}

impl DevMlp {
    fn upload(dev: &Device, m: &Mlp, dtype: DType) -> Result<Self, CudaError> {
        Ok(DevMlp {
            gate_proj: DevLinear::upload(dev, &m.gate_proj, dtype)?,
            up_proj: DevLinear::upload(dev, &m.up_proj, dtype)?,
            down_proj: DevLinear::upload(dev, &m.down_proj, dtype)?,
        })
    }
}

#[derive(Debug)]
pub struct DevIndexer {
    pub wq_b: DevLinear,
    pub wk: DevLinear,
    pub k_norm_weight: CudaSlice<f32>,
    pub k_norm_bias: CudaSlice<f32>,
    pub weights_proj: DevLinear,
}

#[derive(Debug)]
pub struct DevAttention {
    pub q_a_proj: DevLinear,
    pub q_a_layernorm: CudaSlice<f32>,
    pub q_b_proj: DevLinear,
    pub kv_a_proj_with_mqa: DevLinear,
    pub kv_a_layernorm: CudaSlice<f32>,
    pub kv_b_proj: DevLinear,
    pub o_proj: DevLinear,
    pub indexer: DevIndexer,
}

impl DevAttention {
    fn upload(dev: &Device, a: &Attention, dtype: DType) -> Result<Self, CudaError> {
        let l = |x: &Linear| DevLinear::upload(dev, x, dtype);
        Ok(DevAttention {
            q_a_proj: l(&a.q_a_proj)?,
            q_a_layernorm: dev.upload(&a.q_a_layernorm)?,
            q_b_proj: l(&a.q_b_proj)?,
            kv_a_proj_with_mqa: l(&a.kv_a_proj_with_mqa)?,
            kv_a_layernorm: dev.upload(&a.kv_a_layernorm)?,
            kv_b_proj: l(&a.kv_b_proj)?,
            o_proj: l(&a.o_proj)?,
            indexer: DevIndexer {
                wq_b: l(&a.indexer.wq_b)?,
                wk: l(&a.indexer.wk)?,
                k_norm_weight: dev.upload(&a.indexer.k_norm_weight)?,
                k_norm_bias: dev.upload(&a.indexer.k_norm_bias)?,
                weights_proj: l(&a.indexer.weights_proj)?,
            },
        })
    }
}

#[derive(Debug)]
pub struct DevMoe {
    pub gate: DevLinear,
    pub e_score_correction_bias: CudaSlice<f32>,
    pub experts: Vec<DevMlp>,
    pub shared_experts: Option<DevMlp>,
}

#[derive(Debug)]
pub enum DevFeedForward {
    Dense(DevMlp),
    Moe(DevMoe),
}

#[derive(Debug)]
pub struct DevLayer {
    pub input_layernorm: CudaSlice<f32>,
    pub self_attn: DevAttention,
    pub post_attention_layernorm: CudaSlice<f32>,
    pub mlp: DevFeedForward,
}

/// Every weight of the model on the device.
#[derive(Debug)]
pub struct DevModel {
    pub embed_tokens: DevBuf,
    pub layers: Vec<DevLayer>,
    pub norm: CudaSlice<f32>,
    pub lm_head: DevLinear,
    pub rope_inv_freq: CudaSlice<f32>,
}

/// Bytes the model's weights take on the device in `dtype` (matrices) and f32 (vectors).
pub fn weight_bytes(model: &Model, dtype: DType) -> usize {
    let lin = |l: &Linear| l.weight.len() * dtype.bytes();
    let mlp = |m: &Mlp| lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj);
    let mut total =
        model.embed_tokens.len() * dtype.bytes() + lin(&model.lm_head) + model.norm.len() * 4;
    for layer in &model.layers {
        let a = &layer.self_attn;
        total += lin(&a.q_a_proj)
            + lin(&a.q_b_proj)
            + lin(&a.kv_a_proj_with_mqa)
            + lin(&a.kv_b_proj)
            + lin(&a.o_proj)
            + lin(&a.indexer.wq_b)
            + lin(&a.indexer.wk)
            + lin(&a.indexer.weights_proj);
        total += 4
            * (a.q_a_layernorm.len() + a.kv_a_layernorm.len() + 2 * a.indexer.k_norm_weight.len());
        total += 4 * (layer.input_layernorm.len() + layer.post_attention_layernorm.len());
        total += match &layer.mlp {
            FeedForward::Dense(m) => mlp(m),
            FeedForward::Moe(moe) => {
                lin(&moe.gate)
                    + 4 * moe.e_score_correction_bias.len()
                    + moe.experts.iter().flatten().map(mlp).sum::<usize>()
                    + moe.shared_experts.as_ref().map(mlp).unwrap_or(0)
            }
        };
    }
    total
}

impl DevModel {
    /// Uploads every weight; routed experts must all be present (no expert parallelism yet).
    pub fn upload(dev: &Device, model: &Model, dtype: DType) -> Result<Self, CudaError> {
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, layer) in model.layers.iter().enumerate() {
            let mlp = match &layer.mlp {
                FeedForward::Dense(m) => DevFeedForward::Dense(DevMlp::upload(dev, m, dtype)?),
                FeedForward::Moe(moe) => {
                    let mut experts = Vec::with_capacity(moe.experts.len());
                    for (e, m) in moe.experts.iter().enumerate() {
                        let m = m.as_ref().ok_or_else(|| {
                            CudaError::Unsupported(format!(
                                "layer {i} expert {e} is held by another expert-parallel rank; the CUDA backend needs every expert on one device"
                            ))
                        })?;
                        experts.push(DevMlp::upload(dev, m, dtype)?);
                    }
                    DevFeedForward::Moe(DevMoe {
                        gate: DevLinear::upload(dev, &moe.gate, dtype)?,
                        e_score_correction_bias: dev.upload(&moe.e_score_correction_bias)?,
                        experts,
                        shared_experts: moe
                            .shared_experts
                            .as_ref()
                            .map(|m| DevMlp::upload(dev, m, dtype))
                            .transpose()?,
                    })
                }
            };
            layers.push(DevLayer {
                input_layernorm: dev.upload(&layer.input_layernorm)?,
                self_attn: DevAttention::upload(dev, &layer.self_attn, dtype)?,
                post_attention_layernorm: dev.upload(&layer.post_attention_layernorm)?,
                mlp,
            });
        }
        Ok(DevModel {
            embed_tokens: DevBuf::upload(dev, &model.embed_tokens, dtype)?,
            layers,
            norm: dev.upload(&model.norm)?,
            lm_head: DevLinear::upload(dev, &model.lm_head, dtype)?,
            rope_inv_freq: dev.upload(&model.rope.inv_freq)?,
        })
    }
}

// ---- random weights generated on the device (benchmarks at full width) ----

/// Hands out one seed per tensor, so every tensor of a random model is distinct and the whole
/// model is a function of one seed.
#[derive(Debug)]
struct Seeds(u64);

impl Seeds {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.0
    }
}

impl DevBuf {
    /// `len` values uniform in `[-scale, scale]`, drawn on the device from `seed`.
    pub fn random(
        dev: &Device,
        len: usize,
        dtype: DType,
        seed: u64,
        scale: f32,
    ) -> Result<Self, CudaError> {
        let buf = match dtype {
            DType::F32 => DevBuf::F32(dev.alloc(len)?),
            DType::Bf16 => DevBuf::Bf16(dev.alloc(len)?),
        };
        let name = format!("fill_uniform_{}", dtype.suffix());
        super::ops::launch(
            dev,
            super::device::Family::Norm,
            &name,
            ((len.div_ceil(256)).clamp(1, 1 << 16) as u32, 1, 1),
            256,
            0,
            &[
                super::ops::Arg::P(buf.ptr(dev)),
                super::ops::Arg::L(len as i64),
                super::ops::Arg::L(seed as i64),
                super::ops::Arg::F(scale),
            ],
        )?;
        Ok(buf)
    }
}

/// `len` f32 values equal to `v`, set on the device.
fn const_f32(dev: &Device, len: usize, v: f32) -> Result<CudaSlice<f32>, CudaError> {
    let buf = dev.alloc::<f32>(len)?;
    super::ops::launch(
        dev,
        super::device::Family::Norm,
        "fill_const_f32",
        ((len.div_ceil(256)).clamp(1, 1 << 16) as u32, 1, 1),
        256,
        0,
        &[
            super::ops::Arg::P(dev.ptr(&buf, 0)),
            super::ops::Arg::L(len as i64),
            super::ops::Arg::F(v),
        ],
    )?;
    Ok(buf)
}

impl DevLinear {
    /// A random `[out, in]` matrix scaled so a unit-variance input gives a unit-variance output
    /// (uniform with variance 1/in).
    fn random(
        dev: &Device,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        seeds: &mut Seeds,
    ) -> Result<Self, CudaError> {
        let scale = (3.0 / in_dim.max(1) as f32).sqrt();
        Ok(DevLinear {
            w: DevBuf::random(dev, out_dim * in_dim, dtype, seeds.next(), scale)?,
            out_dim,
            in_dim,
        })
    }
}

impl DevMlp {
    fn random(
        dev: &Device,
        h: usize,
        inter: usize,
        dtype: DType,
        seeds: &mut Seeds,
    ) -> Result<Self, CudaError> {
        Ok(DevMlp {
            gate_proj: DevLinear::random(dev, inter, h, dtype, seeds)?,
            up_proj: DevLinear::random(dev, inter, h, dtype, seeds)?,
            down_proj: DevLinear::random(dev, h, inter, dtype, seeds)?,
        })
    }
}

/// Bytes of a model of shape `cfg` on the device: matrices in `dtype`, vectors in f32, every
/// routed expert present. The same count as [`weight_bytes`] without a host model.
pub fn config_weight_bytes(cfg: &ModelConfig, dtype: DType) -> usize {
    let (h, b) = (cfg.hidden_size, dtype.bytes());
    let heads = cfg.num_attention_heads;
    let mlp = |inter: usize| 3 * h * inter * b;
    let attn = (h * cfg.q_lora_rank
        + cfg.q_lora_rank * heads * cfg.qk_head_dim()
        + h * cfg.latent_dim()
        + cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        + heads * cfg.v_head_dim * h
        + cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim
        + h * cfg.index_head_dim
        + h * cfg.index_n_heads)
        * b
        + 4 * (cfg.q_lora_rank + cfg.kv_lora_rank + 2 * cfg.index_head_dim + 2 * h);
    let mut total = 2 * cfg.vocab_size * h * b + 4 * h;
    for kind in &cfg.mlp_layer_types {
        total += attn
            + match kind {
                MlpKind::Dense => mlp(cfg.intermediate_size),
                MlpKind::Moe => {
                    cfg.n_routed_experts * h * b
                        + 4 * cfg.n_routed_experts
                        + cfg.n_routed_experts * mlp(cfg.moe_intermediate_size)
                        + if cfg.n_shared_experts > 0 {
                            mlp(cfg.moe_intermediate_size * cfg.n_shared_experts)
                        } else {
                            0
                        }
                }
            };
    }
    total
}

impl DevModel {
    /// A model of shape `cfg` with random weights drawn on the device from `seed` (no host copy:
    /// a full-width model is tens of gigabytes). Norm weights are one, biases zero; matrices
    /// are scaled to keep activations near unit variance.
    pub fn random(
        dev: &Device,
        cfg: &ModelConfig,
        dtype: DType,
        seed: u64,
    ) -> Result<Self, CudaError> {
        let mut s = Seeds(seed);
        let h = cfg.hidden_size;
        let heads = cfg.num_attention_heads;
        let mut layers = Vec::with_capacity(cfg.mlp_layer_types.len());
        for kind in &cfg.mlp_layer_types {
            let mut lin = |o: usize, i: usize| DevLinear::random(dev, o, i, dtype, &mut s);
            let self_attn = DevAttention {
                q_a_proj: lin(cfg.q_lora_rank, h)?,
                q_a_layernorm: const_f32(dev, cfg.q_lora_rank, 1.0)?,
                q_b_proj: lin(heads * cfg.qk_head_dim(), cfg.q_lora_rank)?,
                kv_a_proj_with_mqa: lin(cfg.latent_dim(), h)?,
                kv_a_layernorm: const_f32(dev, cfg.kv_lora_rank, 1.0)?,
                kv_b_proj: lin(
                    heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                    cfg.kv_lora_rank,
                )?,
                o_proj: lin(h, heads * cfg.v_head_dim)?,
                indexer: DevIndexer {
                    wq_b: lin(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)?,
                    wk: lin(cfg.index_head_dim, h)?,
                    k_norm_weight: const_f32(dev, cfg.index_head_dim, 1.0)?,
                    k_norm_bias: const_f32(dev, cfg.index_head_dim, 0.0)?,
                    weights_proj: lin(cfg.index_n_heads, h)?,
                },
            };
            let mlp = match kind {
                MlpKind::Dense => DevFeedForward::Dense(DevMlp::random(
                    dev,
                    h,
                    cfg.intermediate_size,
                    dtype,
                    &mut s,
                )?),
                MlpKind::Moe => {
                    let mut experts = Vec::with_capacity(cfg.n_routed_experts);
                    for _ in 0..cfg.n_routed_experts {
                        experts.push(DevMlp::random(
                            dev,
                            h,
                            cfg.moe_intermediate_size,
                            dtype,
                            &mut s,
                        )?);
                    }
                    DevFeedForward::Moe(DevMoe {
                        gate: DevLinear::random(dev, cfg.n_routed_experts, h, dtype, &mut s)?,
                        e_score_correction_bias: const_f32(dev, cfg.n_routed_experts, 0.0)?,
                        experts,
                        shared_experts: if cfg.n_shared_experts > 0 {
                            Some(DevMlp::random(
                                dev,
                                h,
                                cfg.moe_intermediate_size * cfg.n_shared_experts,
                                dtype,
                                &mut s,
                            )?)
                        } else {
                            None
                        },
                    })
                }
            };
            layers.push(DevLayer {
                input_layernorm: const_f32(dev, h, 1.0)?,
                self_attn,
                post_attention_layernorm: const_f32(dev, h, 1.0)?,
                mlp,
            });
        }
        let rope = crate::model::rope::RopeTable::new(cfg);
        Ok(DevModel {
            embed_tokens: DevBuf::random(dev, cfg.vocab_size * h, dtype, s.next(), 1.0)?,
            layers,
            norm: const_f32(dev, h, 1.0)?,
            lm_head: DevLinear::random(dev, cfg.vocab_size, h, dtype, &mut s)?,
            rope_inv_freq: dev.upload(&rope.inv_freq)?,
        })
    }
}
