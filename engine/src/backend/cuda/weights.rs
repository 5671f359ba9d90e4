//! The model's weights in device memory. Matrices (linears, embedding, lm_head) are stored in
//! the chosen [`DType`]; norm weights, biases and the router's correction bias stay f32. Names
//! follow the checkpoint, as in [`crate::model`].
//!
//! With [`DType::Fp8`] the linear projections of attention, the indexer and every MLP are kept
//! as E4M3 codes with one f32 scale per 128×128 block: the checkpoint's own codes when it is an
//! FP8 checkpoint, or quantized at load otherwise. What DeepSeek keeps in higher precision stays
//! bf16: the embedding, lm_head, the router gate and the indexer's `weights_proj`; `kv_b_proj`
//! is dequantized to bf16 because the absorbed attention multiplies by it per head (as vLLM
//! does).

use cudarc::driver::CudaSlice;

use super::CudaError;
use super::device::Device;
use super::load::Uploader;
use super::ops;
use crate::backend::cpu::Linear;
use crate::backend::cpu::fp8::Fp8Weight;
use crate::model::{Attention, FeedForward, Mlp, MlpKind, Model, ModelConfig};

/// Element type of weight matrices (and of the KV cache) in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
    /// E4M3 with f32 block scales: 128×128 blocks for weights; for the caches, the latent row
    /// `[c_kv E4M3 | f32 scale per 128 | k_pe bf16]` (656 bytes for DeepSeek-V3.2) and the
    /// indexer key `[E4M3 | f32 scale per 128]` (132 bytes).
    Fp8,
}

impl DType {
    /// Bytes per element (per code for FP8, scales not counted).
    pub fn bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
            DType::Fp8 => 1,
        }
    }

    /// The kernel-name suffix (`{op}_{dtype}`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::Fp8 => "fp8",
        }
    }

    /// The storage of tensors that are never quantized: bf16 under FP8.
    pub fn dense(self) -> DType {
        match self {
            DType::Fp8 => DType::Bf16,
            d => d,
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::Bf16),
            "fp8" | "fp8_e4m3" | "e4m3" => Some(DType::Fp8),
            _ => None,
        }
    }
}

/// Bytes of one `[rows, cols]` linear stored as `dtype` (FP8 only where `quantizable`).
pub fn linear_bytes(rows: usize, cols: usize, dtype: DType, quantizable: bool) -> usize {
    if dtype == DType::Fp8 && quantizable {
        rows * cols + 4 * rows.div_ceil(128) * cols.div_ceil(128)
    } else {
        rows * cols * dtype.dense().bytes()
    }
}

/// Bytes of one FP8 latent row `[c_kv E4M3 | f32 scale per 128 | k_pe bf16]`, padded to 16
/// (656 for DeepSeek-V3.2: 512 + 16 + 128).
pub fn latent_fp8_stride(kvr: usize, rd: usize) -> usize {
    (kvr + 4 * kvr.div_ceil(128) + 2 * rd).next_multiple_of(16)
}

/// Bytes of one FP8 indexer key `[E4M3 | f32 scale per 128]` (132 for DeepSeek-V3.2).
pub fn index_fp8_stride(id: usize) -> usize {
    id + 4 * id.div_ceil(128)
}

/// Elements (bytes for FP8) of one token slot of the latent cache and of the indexer-key cache.
pub fn cache_row_len(cfg: &ModelConfig, cache: DType) -> (usize, usize) {
    match cache {
        DType::Fp8 => (
            latent_fp8_stride(cfg.kv_lora_rank, cfg.qk_rope_head_dim),
            index_fp8_stride(cfg.index_head_dim),
        ),
        _ => (cfg.latent_dim(), cfg.index_head_dim),
    }
}

/// Decodes FP8 rows of `q` E4M3 codes, their f32 scales per 128 and `tail` bf16 values (cache
/// rows read back by tests and tools) to f32 rows of `q + tail` values.
pub fn decode_fp8_rows(bytes: &[u8], stride: usize, q: usize, tail: usize) -> Vec<f32> {
    let groups = q.div_ceil(128);
    let mut out = Vec::with_capacity(bytes.len() / stride * (q + tail));
    for row in bytes.chunks_exact(stride) {
        let scale = |g: usize| {
            let b = &row[q + 4 * g..q + 4 * g + 4];
            f32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        for (i, c) in row[..q].iter().enumerate() {
            out.push(crate::model::weights::fp8_e4m3_to_f32(*c) * scale(i / 128));
        }
        let t0 = q + 4 * groups;
        for j in 0..tail {
            out.push(half::bf16::from_le_bytes([row[t0 + 2 * j], row[t0 + 2 * j + 1]]).to_f32());
        }
    }
    out
}

/// A device buffer of f32 values, bf16 bit patterns or raw FP8 bytes.
#[derive(Debug)]
pub enum DevBuf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Fp8(CudaSlice<u8>),
}

impl DevBuf {
    /// Uploads `host` as f32 or bf16 (`dtype.dense()`).
    pub fn upload(up: &mut Uploader, host: &[f32], dtype: DType) -> Result<Self, CudaError> {
        Ok(match dtype.dense() {
            DType::F32 => DevBuf::F32(up.upload(host)?),
            _ => {
                let bits: Vec<u16> = host
                    .iter()
                    .map(|v| half::bf16::from_f32(*v).to_bits())
                    .collect();
                DevBuf::Bf16(up.upload(&bits)?)
            }
        })
    }

    /// `len` zero elements (bytes for FP8).
    pub fn zeros(dev: &Device, len: usize, dtype: DType) -> Result<Self, CudaError> {
        Ok(match dtype {
            DType::F32 => DevBuf::F32(dev.zeros(len)?),
            DType::Bf16 => DevBuf::Bf16(dev.zeros(len)?),
            DType::Fp8 => DevBuf::Fp8(dev.zeros(len)?),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            DevBuf::F32(_) => DType::F32,
            DevBuf::Bf16(_) => DType::Bf16,
            DevBuf::Fp8(_) => DType::Fp8,
        }
    }

    pub fn ptr(&self, dev: &Device) -> u64 {
        match self {
            DevBuf::F32(s) => dev.ptr(s, 0),
            DevBuf::Bf16(s) => dev.ptr(s, 0),
            DevBuf::Fp8(s) => dev.ptr(s, 0),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            DevBuf::F32(s) => s.len() * 4,
            DevBuf::Bf16(s) => s.len() * 2,
            DevBuf::Fp8(s) => s.len(),
        }
    }
}

/// A `[out, in]` matrix applied as `y = x · Wᵀ`.
#[derive(Debug)]
pub struct DevLinear {
    /// f32 or bf16 values, or E4M3 codes when `scale_inv` is set.
    pub w: DevBuf,
    pub out_dim: usize,
    pub in_dim: usize,
    /// FP8 only: `[ceil(out/128), ceil(in/128)]` block scales.
    pub scale_inv: Option<CudaSlice<f32>>,
    /// FP8 only: activation scales rounded up to powers of two (`scale_fmt: ue8m0`).
    pub pow2_act: bool,
}

impl DevLinear {
    /// Uploads `l` as `dtype`. Under [`DType::Fp8`] a `quantizable` weight keeps the
    /// checkpoint's codes (128×128 blocks), or is quantized here when it has none; the rest go
    /// up as bf16.
    pub fn upload(
        up: &mut Uploader,
        l: &Linear,
        dtype: DType,
        quantizable: bool,
        pow2_act: bool,
    ) -> Result<Self, CudaError> {
        if dtype == DType::Fp8 && quantizable {
            let q = match &l.fp8 {
                Some(q) if q.block == [128, 128] => std::borrow::Cow::Borrowed(q.as_ref()),
                _ => std::borrow::Cow::Owned(Fp8Weight::quantize(
                    &host_values(l),
                    l.out_dim,
                    l.in_dim,
                    [128, 128],
                )),
            };
            return Self::upload_fp8(up, &q, pow2_act);
        }
        Ok(DevLinear {
            w: DevBuf::upload(up, &host_values(l), dtype)?,
            out_dim: l.out_dim,
            in_dim: l.in_dim,
            scale_inv: None,
            pow2_act: false,
        })
    }

    pub fn upload_fp8(up: &mut Uploader, q: &Fp8Weight, pow2_act: bool) -> Result<Self, CudaError> {
        Ok(DevLinear {
            w: DevBuf::Fp8(up.upload(&q.codes)?),
            out_dim: q.rows,
            in_dim: q.cols,
            scale_inv: Some(up.upload(&q.scale_inv)?),
            pow2_act,
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
    pub(crate) fn upload(
        up: &mut Uploader,
        m: &Mlp,
        dtype: DType,
        pow2: bool,
    ) -> Result<Self, CudaError> {
        Ok(DevMlp {
            gate_proj: DevLinear::upload(up, &m.gate_proj, dtype, true, pow2)?,
            up_proj: DevLinear::upload(up, &m.up_proj, dtype, true, pow2)?,
            down_proj: DevLinear::upload(up, &m.down_proj, dtype, true, pow2)?,
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
    pub(crate) fn upload(
        up: &mut Uploader,
        a: &Attention,
        dtype: DType,
        pow2: bool,
    ) -> Result<Self, CudaError> {
        let l = |up: &mut Uploader, x: &Linear, quantizable: bool| {
            DevLinear::upload(up, x, dtype, quantizable, pow2)
        };
        Ok(DevAttention {
            q_a_proj: l(up, &a.q_a_proj, true)?,
            q_a_layernorm: up.upload(&a.q_a_layernorm)?,
            q_b_proj: l(up, &a.q_b_proj, true)?,
            kv_a_proj_with_mqa: l(up, &a.kv_a_proj_with_mqa, true)?,
            kv_a_layernorm: up.upload(&a.kv_a_layernorm)?,
            kv_b_proj: l(up, &a.kv_b_proj, false)?,
            o_proj: l(up, &a.o_proj, true)?,
            indexer: DevIndexer {
                wq_b: l(up, &a.indexer.wq_b, true)?,
                wk: l(up, &a.indexer.wk, true)?,
                k_norm_weight: up.upload(&a.indexer.k_norm_weight)?,
                k_norm_bias: up.upload(&a.indexer.k_norm_bias)?,
                weights_proj: l(up, &a.indexer.weights_proj, false)?,
            },
        })
    }
}

#[derive(Debug)]
pub struct DevMoe {
    pub gate: DevLinear,
    pub e_score_correction_bias: CudaSlice<f32>,
    /// Indexed by global expert id; `None` for the experts another expert-parallel rank holds.
    pub experts: Vec<Option<DevMlp>>,
    pub shared_experts: Option<DevMlp>,
    /// The routed experts as device tables, when this GPU holds all of them in FP8: decode
    /// steps then route, sort and run them without the host (`CudaExecutor::moe`).
    pub tables: Option<MoeTables>,
}

/// [`DevMoe`]'s experts, one [`ops::ExpertTable`] per projection.
#[derive(Debug)]
pub struct MoeTables {
    pub gate: ops::ExpertTable,
    pub up: ops::ExpertTable,
    pub down: ops::ExpertTable,
}

impl MoeTables {
    /// `None` unless every expert is held here in FP8, one shape per projection.
    pub fn build(dev: &Device, experts: &[Option<DevMlp>]) -> Result<Option<Self>, CudaError> {
        let table = |f: fn(&DevMlp) -> &DevLinear| {
            let ws: Vec<Option<&DevLinear>> = experts.iter().map(|m| m.as_ref().map(f)).collect();
            ops::ExpertTable::build(dev, &ws)
        };
        let (Some(gate), Some(up), Some(down)) = (
            table(|m| &m.gate_proj)?,
            table(|m| &m.up_proj)?,
            table(|m| &m.down_proj)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(MoeTables { gate, up, down }))
    }
}

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer
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
    let lin = |l: &Linear| linear_bytes(l.out_dim, l.in_dim, dtype, true);
    let dense = |l: &Linear| linear_bytes(l.out_dim, l.in_dim, dtype, false);
    let mlp = |m: &Mlp| lin(&m.gate_proj) + lin(&m.up_proj) + lin(&m.down_proj);
    let mut total = model.embed_tokens.len() * dtype.dense().bytes()
        + dense(&model.lm_head)
        + model.norm.len() * 4;
    for layer in &model.layers {
        let a = &layer.self_attn;
        total += lin(&a.q_a_proj)
            + lin(&a.q_b_proj)
            + lin(&a.kv_a_proj_with_mqa)
            + dense(&a.kv_b_proj)
            + lin(&a.o_proj)
            + lin(&a.indexer.wq_b)
            + lin(&a.indexer.wk)
            + dense(&a.indexer.weights_proj);
        total += 4
            * (a.q_a_layernorm.len() + a.kv_a_layernorm.len() + 2 * a.indexer.k_norm_weight.len());
        total += 4 * (layer.input_layernorm.len() + layer.post_attention_layernorm.len());
        total += match &layer.mlp {
            FeedForward::Dense(m) => mlp(m),
            FeedForward::Moe(moe) => {
                dense(&moe.gate)
                    + 4 * moe.e_score_correction_bias.len()
                    + moe.experts.iter().flatten().map(mlp).sum::<usize>()
                    + moe.shared_experts.as_ref().map(mlp).unwrap_or(0)
            }
        };
    }
    total
}

impl DevModel {
    /// Uploads every weight `model` holds: with an expert shard, only its own routed experts.
    pub fn upload(dev: &Device, model: &Model, dtype: DType) -> Result<Self, CudaError> {
        let up = &mut Uploader::direct(dev);
        let pow2 = model
            .config
            .quantization
            .as_ref()
            .map(|q| q.pow2_scales)
            .unwrap_or(true);
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, layer) in model.layers.iter().enumerate() {
            let mlp = match &layer.mlp {
                FeedForward::Dense(m) => DevFeedForward::Dense(DevMlp::upload(up, m, dtype, pow2)?),
                FeedForward::Moe(moe) => {
                    let mut experts = Vec::with_capacity(moe.experts.len());
                    for (e, m) in moe.experts.iter().enumerate() {
                        let owned = model.shard.owns(e, model.config.n_routed_experts);
                        experts.push(match m {
                            Some(m) => Some(DevMlp::upload(up, m, dtype, pow2)?),
                            None if owned => {
                                return Err(CudaError::Unsupported(format!(
                                    "layer {i} expert {e} belongs to this rank but was not loaded"
                                )));
                            }
                            None => None,
                        });
                    }
                    DevFeedForward::Moe(DevMoe {
                        gate: DevLinear::upload(up, &moe.gate, dtype, false, pow2)?,
                        e_score_correction_bias: up.upload(&moe.e_score_correction_bias)?,
                        experts,
                        shared_experts: moe
                            .shared_experts
                            .as_ref()
                            .map(|m| DevMlp::upload(up, m, dtype, pow2))
                            .transpose()?,
                        tables: None,
                    })
                }
            };
            layers.push(DevLayer {
                input_layernorm: up.upload(&layer.input_layernorm)?,
                self_attn: DevAttention::upload(up, &layer.self_attn, dtype, pow2)?,
                post_attention_layernorm: up.upload(&layer.post_attention_layernorm)?,
                mlp,
            });
        }
        Ok(DevModel {
            embed_tokens: DevBuf::upload(up, &model.embed_tokens, dtype)?,
            layers,
            norm: up.upload(&model.norm)?,
            lm_head: DevLinear::upload(up, &model.lm_head, dtype, false, pow2)?,
            rope_inv_freq: up.upload(&model.rope.inv_freq)?,
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
    /// `len` values uniform in `[-scale, scale]`, drawn on the device from `seed`. For FP8
    /// (cache rows) every byte is drawn from 0x20..=0x3f, so codes, scales and bf16 tails all
    /// decode to finite values of moderate size.
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
            DType::Fp8 => DevBuf::Fp8(dev.alloc(len)?),
        };
        let grid = ((len.div_ceil(256)).clamp(1, 1 << 16) as u32, 1, 1);
        let (family, name, last) = match dtype {
            DType::Fp8 => (
                super::device::Family::Norm,
                "fill_bytes".to_string(),
                super::ops::Arg::I(0x20_3f),
            ),
            _ => (
                super::device::Family::Norm,
                format!("fill_uniform_{}", dtype.suffix()),
                super::ops::Arg::F(scale),
            ),
        };
        super::ops::launch(
            dev,
            family,
            &name,
            grid,
            256,
            0,
            &[
                super::ops::Arg::P(buf.ptr(dev)),
                super::ops::Arg::L(len as i64),
                super::ops::Arg::L(seed as i64),
                last,
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
    ///
    /// Under [`DType::Fp8`] a `quantizable` matrix is drawn in f32 and block-quantized on the
    /// device (`quant_weight_blocks`), as an FP8 checkpoint would hold it.
    fn random(
        dev: &Device,
        out_dim: usize,
        in_dim: usize,
        dtype: DType,
        quantizable: bool,
        seeds: &mut Seeds,
    ) -> Result<Self, CudaError> {
        let scale = (3.0 / in_dim.max(1) as f32).sqrt();
        let len = out_dim * in_dim;
        if dtype == DType::Fp8 && quantizable {
            let DevBuf::F32(values) = DevBuf::random(dev, len, DType::F32, seeds.next(), scale)?
            else {
                unreachable!("an f32 draw is an f32 buffer")
            };
            let codes = dev.alloc::<u8>(len)?;
            let scales = dev.alloc::<f32>(out_dim.div_ceil(128) * in_dim.div_ceil(128))?;
            super::ops::quant_weight_blocks(
                dev,
                dev.ptr(&codes, 0),
                dev.ptr(&scales, 0),
                dev.ptr(&values, 0),
                out_dim,
                in_dim,
            )?;
            return Ok(DevLinear {
                w: DevBuf::Fp8(codes),
                out_dim,
                in_dim,
                scale_inv: Some(scales),
                pow2_act: true,
            });
        }
        Ok(DevLinear {
            w: DevBuf::random(dev, len, dtype.dense(), seeds.next(), scale)?,
            out_dim,
            in_dim,
            scale_inv: None,
            pow2_act: false,
        })
    }
}

/// The f32 values of `l`: its own, or the dequantized codes of a model loaded with FP8 codes
/// only.
fn host_values(l: &Linear) -> std::borrow::Cow<'_, [f32]> {
    match &l.fp8 {
        Some(q) if l.weight.is_empty() => std::borrow::Cow::Owned(q.dequantize()),
        _ => std::borrow::Cow::Borrowed(&l.weight),
    }
}

/// A random `[out, in]` linear (see [`DevLinear`]'s random draw), for GEMM benchmarks.
pub fn random_linear(
    dev: &Device,
    out_dim: usize,
    in_dim: usize,
    dtype: DType,
    seed: u64,
) -> Result<DevLinear, CudaError> {
    DevLinear::random(dev, out_dim, in_dim, dtype, true, &mut Seeds(seed))
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
            gate_proj: DevLinear::random(dev, inter, h, dtype, true, seeds)?,
            up_proj: DevLinear::random(dev, inter, h, dtype, true, seeds)?,
            down_proj: DevLinear::random(dev, h, inter, dtype, true, seeds)?,
        })
    }
}

/// Device bytes of a model of shape `cfg`, split into what every expert-parallel rank holds
/// (embeddings, attention, indexers, dense layers, shared experts, routers, norms) and the
/// routed experts, which ranks divide among themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightSplit {
    /// Bytes every rank holds.
    pub replicated: usize,
    /// Bytes of all routed experts of all MoE layers together.
    pub routed_experts: usize,
}

impl WeightSplit {
    /// Bytes one rank of `world` holds: the replicated part and its share of the experts.
    pub fn per_rank(&self, world: usize) -> usize {
        self.replicated + self.routed_experts / world.max(1)
    }
}

/// Bytes of a model of shape `cfg` on the device, matrices in `dtype` and vectors in f32, by
/// what is replicated and what is split over expert-parallel ranks. Counts what
/// [`weight_bytes`] counts, from the config alone.
pub fn config_weight_split(cfg: &ModelConfig, dtype: DType) -> WeightSplit {
    let h = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let lin = |o: usize, i: usize| linear_bytes(o, i, dtype, true);
    let dense = |o: usize, i: usize| linear_bytes(o, i, dtype, false);
    let mlp = |inter: usize| 2 * lin(inter, h) + lin(h, inter);
    let attn = lin(cfg.q_lora_rank, h)
        + lin(heads * cfg.qk_head_dim(), cfg.q_lora_rank)
        + lin(cfg.latent_dim(), h)
        + dense(
            heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
            cfg.kv_lora_rank,
        )
        + lin(h, heads * cfg.v_head_dim)
        + lin(cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank)
        + lin(cfg.index_head_dim, h)
        + dense(cfg.index_n_heads, h)
        + 4 * (cfg.q_lora_rank + cfg.kv_lora_rank + 2 * cfg.index_head_dim + 2 * h);
    let mut split = WeightSplit {
        replicated: 2 * dense(cfg.vocab_size, h) + 4 * h,
        routed_experts: 0,
    };
    for kind in &cfg.mlp_layer_types {
        split.replicated += attn;
        match kind {
            MlpKind::Dense => split.replicated += mlp(cfg.intermediate_size),
            MlpKind::Moe => {
                split.replicated += dense(cfg.n_routed_experts, h) + 4 * cfg.n_routed_experts;
                if cfg.n_shared_experts > 0 {
                    split.replicated += mlp(cfg.moe_intermediate_size * cfg.n_shared_experts);
                }
                split.routed_experts += cfg.n_routed_experts * mlp(cfg.moe_intermediate_size);
            }
        }
    }
    split
}

/// Bytes of a model of shape `cfg` on one device holding every routed expert.
pub fn config_weight_bytes(cfg: &ModelConfig, dtype: DType) -> usize {
    config_weight_split(cfg, dtype).per_rank(1)
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
            let mut lin = |o: usize, i: usize, quantizable: bool| {
                DevLinear::random(dev, o, i, dtype, quantizable, &mut s)
            };
            let self_attn = DevAttention {
                q_a_proj: lin(cfg.q_lora_rank, h, true)?,
                q_a_layernorm: const_f32(dev, cfg.q_lora_rank, 1.0)?,
                q_b_proj: lin(heads * cfg.qk_head_dim(), cfg.q_lora_rank, true)?,
                kv_a_proj_with_mqa: lin(cfg.latent_dim(), h, true)?,
                kv_a_layernorm: const_f32(dev, cfg.kv_lora_rank, 1.0)?,
                kv_b_proj: lin(
                    heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                    cfg.kv_lora_rank,
                    false,
                )?,
                o_proj: lin(h, heads * cfg.v_head_dim, true)?,
                indexer: DevIndexer {
                    wq_b: lin(
                        cfg.index_n_heads * cfg.index_head_dim,
                        cfg.q_lora_rank,
                        true,
                    )?,
                    wk: lin(cfg.index_head_dim, h, true)?,
                    k_norm_weight: const_f32(dev, cfg.index_head_dim, 1.0)?,
                    k_norm_bias: const_f32(dev, cfg.index_head_dim, 0.0)?,
                    weights_proj: lin(cfg.index_n_heads, h, false)?,
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
                        experts.push(Some(DevMlp::random(
                            dev,
                            h,
                            cfg.moe_intermediate_size,
                            dtype,
                            &mut s,
                        )?));
                    }
                    DevFeedForward::Moe(DevMoe {
                        gate: DevLinear::random(
                            dev,
                            cfg.n_routed_experts,
                            h,
                            dtype,
                            false,
                            &mut s,
                        )?,
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
                        tables: None,
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
            embed_tokens: DevBuf::random(dev, cfg.vocab_size * h, dtype.dense(), s.next(), 1.0)?,
            layers,
            norm: const_f32(dev, h, 1.0)?,
            lm_head: DevLinear::random(dev, cfg.vocab_size, h, dtype, false, &mut s)?,
            rope_inv_freq: dev.upload(&rope.inv_freq)?,
        })
    }
}
