//! [`CudaExecutor`]: one forward step over a batch of [`SeqChunk`]s on the GPU, computing the
//! function of `model::forward` (the CPU reference) op for op: embedding; per layer RMSNorm, MLA
//! projections, the latent and indexer-key cache writes, interleaved RoPE on the MLA queries and
//! half-split RoPE on the indexer's, lightning-indexer scores, top-k, absorbed sparse attention,
//! o_proj, RMSNorm and the dense MLP or routed + shared experts; final norm and lm_head on the
//! rows whose logits were asked for.
//!
//! Activations are f32; weights are f32, bf16 or FP8 (E4M3 with 128×128 block scales, activations
//! quantized per token and 128 channels) and the caches f32, bf16 or FP8 (the 656-byte latent
//! row and the 132-byte indexer key of DeepSeek-V3.2) ([`CudaOptions`]). MoE routing is
//! computed on the device and copied back once per MoE layer to group tokens by expert; each
//! expert then runs its three linears over its own tokens.
//!
//! As one rank of an expert-parallel group ([`RankCompute`]) the executor holds its own range
//! of routed experts: each MoE layer sends every (token, expert) row to the rank owning the
//! expert, computes what arrives with its local experts and sends the results back, over the
//! group's [`Transport`] with host staging, in the wire format of the CPU reference.

use super::CudaError;
use super::device::{Device, Gemm};
use super::load::{self, Uploader};
use super::ops::{self, MlaDims, RouteParams};
use super::plan::{self, MemoryPlan};
use super::weights::{
    self, DType, DevBuf, DevFeedForward, DevLayer, DevLinear, DevMlp, DevModel, DevMoe, MoeTables,
};
use crate::backend::Executor;
use crate::backend::ep::RankCompute;
use crate::dist::{ExpertShard, NcclTransport, Reader, Transport, Writer};
use crate::generate::{RowSummary, Sampled, Sampler, sample_candidates, sample_row};
use crate::kv::KvGeometry;
use crate::model::weights::Checkpoint;
use crate::model::{ForwardError, LogitsWanted, Model, ModelConfig, SeqChunk};

/// Precision and sizing choices of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaOptions {
    /// Storage of weight matrices.
    pub weights: DType,
    /// Storage of the latent and indexer-key caches.
    pub cache: DType,
    /// The most tokens one step may carry (sizes the workspace in the memory plan).
    pub max_batch_tokens: usize,
    /// How the linear layers multiply.
    pub gemm: Gemm,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            weights: DType::Bf16,
            cache: DType::Bf16,
            max_batch_tokens: 8192,
            gemm: Gemm::Tiled,
        }
    }
}

/// The model on one GPU with its paged caches.
#[derive(Debug)]
pub struct CudaExecutor {
    dev: Device,
    ordinal: usize,
    cfg: ModelConfig,
    w: DevModel,
    geometry: KvGeometry,
    /// Per layer: `num_slots × (kv_lora_rank + qk_rope_head_dim)`.
    latent: Vec<DevBuf>,
    /// Per layer: `num_slots × index_head_dim`.
    index_k: Vec<DevBuf>,
    attention_factor: f32,
    softmax_scale: f32,
    options: CudaOptions,
    plan: MemoryPlan,
    /// Routed experts that ran (summed over MoE layers) since the last
    /// [`CudaExecutor::take_experts_touched`]: the weight traffic of a decode step.
    experts_touched: std::sync::atomic::AtomicUsize,
    /// Device counters of the on-device MoE sort (`ops::moe_sort_rows`): experts run, and
    /// whether the router ever gave an id out of range.
    moe_status: cudarc::driver::CudaSlice<u64>,
    /// The experts-run counter as last read.
    moe_status_seen: std::sync::atomic::AtomicU64,
    /// MoE layer steps that ran wholly on the device ([`CudaExecutor::moe_on_device`]).
    moe_layers_on_device: std::sync::atomic::AtomicUsize,
    /// Sampled rows the device's candidates could not decide (copied whole to the host).
    whole_rows_sampled: std::sync::atomic::AtomicUsize,
    /// The routed experts this executor holds (all of them outside expert parallelism).
    shard: ExpertShard,
    exchange: std::sync::Mutex<ExchangeStats>,
}

/// The memory plan a new executor was sized with, in one log line.
fn log_plan(
    dev: &Device,
    (free, total): (usize, usize),
    plan: &MemoryPlan,
    options: &CudaOptions,
    shard: ExpertShard,
) {
    const MIB: usize = 1 << 20;
    tracing::info!(
        device = %dev.name,
        arch = %dev.arch,
        total_mib = total / MIB,
        free_mib = free / MIB,
        weights_mib = plan.weight_bytes / MIB,
        weights = ?options.weights,
        workspace_mib = plan.workspace_bytes / MIB,
        kv_mib = plan.kv_bytes() / MIB,
        cache = ?options.cache,
        kv_blocks = plan.num_blocks,
        block_size = plan.block_size,
        rank = shard.rank,
        world = shard.world,
        "CUDA memory plan"
    );
}

fn check_shapes(cfg: &ModelConfig, options: &CudaOptions) -> Result<(), CudaError> {
    if options.cache == DType::Fp8
        && (!cfg.kv_lora_rank.is_multiple_of(4) || !cfg.index_head_dim.is_multiple_of(4))
    {
        return Err(CudaError::Unsupported(format!(
            "the FP8 caches need kv_lora_rank ({}) and index_head_dim ({}) to be multiples of 4",
            cfg.kv_lora_rank, cfg.index_head_dim
        )));
    }
    let rd = cfg.qk_rope_head_dim;
    if !rd.is_multiple_of(2) || rd > cfg.index_head_dim {
        return Err(CudaError::Unsupported(format!(
            "qk_rope_head_dim {rd} must be even and at most index_head_dim {}",
            cfg.index_head_dim
        )));
    }
    if cfg.has_moe() && (cfg.n_routed_experts > ops::MAX_EXPERTS || cfg.n_group > ops::MAX_GROUPS) {
        return Err(CudaError::Unsupported(format!(
            "{} routed experts in {} groups (at most {} and {})",
            cfg.n_routed_experts,
            cfg.n_group,
            ops::MAX_EXPERTS,
            ops::MAX_GROUPS
        )));
    }
    Ok(())
}

impl CudaExecutor {
    /// Uploads `model` to device `device_ordinal` with bf16 weights and cache, after checking
    /// that weights, workspace and `geometry`'s cache fit.
    pub fn new(
        model: &Model,
        geometry: KvGeometry,
        device_ordinal: usize,
    ) -> Result<Self, CudaError> {
        Self::with_options(model, geometry, device_ordinal, CudaOptions::default())
    }

    pub fn with_options(
        model: &Model,
        geometry: KvGeometry,
        device_ordinal: usize,
        options: CudaOptions,
    ) -> Result<Self, CudaError> {
        let cfg = model.config.clone();
        check_shapes(&cfg, &options)?;
        let dev = Device::new(device_ordinal)?;
        let (free, total) = dev.mem_info()?;
        let plan = plan::plan(
            &cfg,
            weights::weight_bytes(model, options.weights),
            options.cache,
            free,
            geometry.block_size,
            options.max_batch_tokens,
            Some(geometry.num_blocks),
        )?;
        log_plan(&dev, (free, total), &plan, &options, model.shard);
        dev.load_all()?;
        dev.set_gemm(options.gemm)?;
        let w = DevModel::upload(&dev, model, options.weights)?;
        let mut ex = Self::assemble(
            dev,
            device_ordinal,
            cfg,
            w,
            geometry,
            options,
            plan,
            (model.rope.attention_factor, model.softmax_scale),
        )?;
        ex.shard = model.shard;
        Ok(ex)
    }

    /// Streams the weights rank `shard` holds from `ckpt` to device `ordinal` (see
    /// [`DevModel::load`]: part by part through pinned staging, nothing whole on the host).
    /// The memory plan is checked from the config before any weight is read; with
    /// `auto_blocks` the cache takes every block of `geometry.block_size` that fits.
    pub fn load(
        ckpt: &Checkpoint,
        cfg: &ModelConfig,
        shard: ExpertShard,
        geometry: KvGeometry,
        auto_blocks: bool,
        ordinal: usize,
        options: CudaOptions,
    ) -> Result<Self, CudaError> {
        cfg.validate()
            .map_err(|e| CudaError::Unsupported(format!("config: {e}")))?;
        check_shapes(cfg, &options)?;
        let dev = Device::new(ordinal)?;
        let (free, total) = dev.mem_info()?;
        let weight_bytes = weights::config_weight_split(cfg, options.weights).per_rank(shard.world);
        let plan = plan::plan(
            cfg,
            weight_bytes,
            options.cache,
            free,
            geometry.block_size,
            options.max_batch_tokens,
            (!auto_blocks).then_some(geometry.num_blocks),
        )?;
        log_plan(&dev, (free, total), &plan, &options, shard);
        dev.load_all()?;
        dev.set_gemm(options.gemm)?;
        let w = {
            let mut up = Uploader::staged(&dev, load::STAGING_CHUNK)?;
            DevModel::load(&mut up, ckpt, cfg, options.weights, shard)?
        };
        let rope = crate::model::rope::RopeTable::new(cfg);
        let geometry = KvGeometry {
            num_blocks: plan.num_blocks,
            block_size: geometry.block_size,
        };
        let mut ex = Self::assemble(
            dev,
            ordinal,
            cfg.clone(),
            w,
            geometry,
            options,
            plan,
            (rope.attention_factor, cfg.softmax_scale()),
        )?;
        ex.shard = shard;
        Ok(ex)
    }

    /// The executor around uploaded weights: allocates the zeroed caches.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dev: Device,
        ordinal: usize,
        cfg: ModelConfig,
        w: DevModel,
        geometry: KvGeometry,
        options: CudaOptions,
        plan: MemoryPlan,
        (attention_factor, softmax_scale): (f32, f32),
    ) -> Result<Self, CudaError> {
        let mut w = w;
        for layer in &mut w.layers {
            if let DevFeedForward::Moe(moe) = &mut layer.mlp {
                moe.tables = MoeTables::build(&dev, &moe.experts)?;
            }
        }
        let moe_status = dev.zeros::<u64>(2)?;
        let slots = geometry.num_slots();
        let layers = cfg.mlp_layer_types.len();
        let (latent_row, index_row) = weights::cache_row_len(&cfg, options.cache);
        let mut latent = Vec::with_capacity(layers);
        let mut index_k = Vec::with_capacity(layers);
        for _ in 0..layers {
            latent.push(DevBuf::zeros(&dev, slots * latent_row, options.cache)?);
            index_k.push(DevBuf::zeros(&dev, slots * index_row, options.cache)?);
        }
        dev.stream.synchronize()?;
        Ok(CudaExecutor {
            dev,
            ordinal,
            attention_factor,
            softmax_scale,
            cfg,
            w,
            geometry,
            latent,
            index_k,
            options,
            plan,
            experts_touched: Default::default(),
            moe_status,
            moe_status_seen: Default::default(),
            moe_layers_on_device: Default::default(),
            whole_rows_sampled: Default::default(),
            shard: ExpertShard::WHOLE,
            exchange: Default::default(),
        })
    }

    /// Uses at most `num_blocks` of the blocks its cache was sized for (the rest stays
    /// allocated): the blocks every rank of its group holds.
    pub fn limit_blocks(&mut self, num_blocks: usize) {
        self.geometry.num_blocks = self.geometry.num_blocks.min(num_blocks);
    }

    /// MoE layer steps that ran wholly on the device since the executor was built.
    pub fn moe_layers_on_device(&self) -> usize {
        self.moe_layers_on_device
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sampled rows that had to be copied whole to the host since the executor was built.
    pub fn whole_rows_sampled(&self) -> usize {
        self.whole_rows_sampled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Routed experts run since the last call, summed over MoE layers; resets the count.
    pub fn take_experts_touched(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        let on_host = self.experts_touched.swap(0, Relaxed);
        let on_device = match self.dev.download(&self.moe_status, 2) {
            Ok(status) => {
                if status[1] != 0 {
                    tracing::error!(
                        device = %self.dev.name,
                        "the router chose an expert id out of range; its rows ran through expert 0"
                    );
                }
                status[0] - self.moe_status_seen.swap(status[0], Relaxed)
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the device's expert counter");
                0
            }
        };
        on_host + on_device as usize
    }

    /// A model of shape `cfg` with random weights generated on device `device_ordinal` from
    /// `seed` (see [`DevModel::random`]): benchmarks at full width without tens of gigabytes
    /// of host weights. Checks the same memory plan as [`CudaExecutor::with_options`].
    pub fn random(
        cfg: &ModelConfig,
        geometry: KvGeometry,
        device_ordinal: usize,
        options: CudaOptions,
        seed: u64,
    ) -> Result<Self, CudaError> {
        cfg.validate()
            .map_err(|e| CudaError::Unsupported(format!("config: {e}")))?;
        check_shapes(cfg, &options)?;
        let dev = Device::new(device_ordinal)?;
        let (free, _) = dev.mem_info()?;
        let plan = plan::plan(
            cfg,
            weights::config_weight_bytes(cfg, options.weights),
            options.cache,
            free,
            geometry.block_size,
            options.max_batch_tokens,
            Some(geometry.num_blocks),
        )?;
        dev.load_all()?;
        dev.set_gemm(options.gemm)?;
        let w = DevModel::random(&dev, cfg, options.weights, seed)?;
        let rope = crate::model::rope::RopeTable::new(cfg);
        Self::assemble(
            dev,
            device_ordinal,
            cfg.clone(),
            w,
            geometry,
            options,
            plan,
            (rope.attention_factor, cfg.softmax_scale()),
        )
    }

    /// Fills the latent and indexer-key caches with random values (uniform in [-1, 1]), so
    /// timed steps over long contexts read realistic data instead of zeros.
    pub fn randomize_caches(&mut self, seed: u64) -> Result<(), CudaError> {
        for (i, buf) in self
            .latent
            .iter_mut()
            .chain(self.index_k.iter_mut())
            .enumerate()
        {
            let len = buf.bytes() / buf.dtype().bytes();
            *buf = DevBuf::random(&self.dev, len, buf.dtype(), seed ^ (i as u64 + 1), 1.0)?;
        }
        self.dev.stream.synchronize()?;
        Ok(())
    }

    /// The device this executor runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The plan for `model` on device `device_ordinal` with as many KV blocks of `block_size`
    /// as fit; use its `num_blocks` for the [`KvGeometry`] passed to [`CudaExecutor::new`].
    pub fn plan_for(
        model: &Model,
        device_ordinal: usize,
        block_size: usize,
        options: CudaOptions,
    ) -> Result<MemoryPlan, CudaError> {
        check_shapes(&model.config, &options)?;
        let dev = Device::new(device_ordinal)?;
        let (free, _) = dev.mem_info()?;
        plan::plan(
            &model.config,
            weights::weight_bytes(model, options.weights),
            options.cache,
            free,
            block_size,
            options.max_batch_tokens,
            None,
        )
    }

    pub fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    pub fn options(&self) -> CudaOptions {
        self.options
    }

    /// The step on the device; the requested rows' logits stay there. With `comm`, MoE layers
    /// exchange tokens with the other ranks of the group (every rank calls this every step,
    /// even with an empty batch); without it every routed expert must be here.
    fn forward_impl(
        &mut self,
        batch: &[SeqChunk],
        mut comm: Option<&mut dyn Transport>,
    ) -> Result<StepLogits, ForwardError> {
        if self.shard.world > 1 && comm.is_none() {
            return Err(ForwardError::Backend(format!(
                "this executor holds the experts of rank {} of {}; it runs only within its group",
                self.shard.rank, self.shard.world
            )));
        }
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        let (num_blocks, block_size) = (self.geometry.num_blocks, self.geometry.block_size);
        let mut ids = Vec::new();
        let mut pos = Vec::new();
        let mut tok_slot = Vec::new();
        let mut table_base = Vec::new();
        let mut ctx_len = Vec::new();
        // The kernels find cached positions through each sequence's block table, so a step
        // uploads one entry per block, not one per cached position.
        let mut flat_tables: Vec<i32> = Vec::new();
        for chunk in batch {
            let end = chunk.start_pos + chunk.tokens.len();
            if end > cfg.max_position_embeddings {
                return Err(ForwardError::PositionTooLarge {
                    pos: end - 1,
                    max: cfg.max_position_embeddings,
                });
            }
            if end == 0 {
                continue;
            }
            if chunk.blocks.block_size != block_size {
                return Err(ForwardError::Backend(format!(
                    "a block table of {}-token blocks for a cache of {block_size}-token blocks",
                    chunk.blocks.block_size
                )));
            }
            // The last position maps, so every earlier one does.
            chunk.blocks.slot(end - 1)?;
            let table = &chunk.blocks.blocks[..end.div_ceil(block_size)];
            if let Some(bad) = table.iter().find(|b| **b as usize >= num_blocks) {
                return Err(ForwardError::Backend(format!(
                    "block {bad} is outside the cache's {num_blocks} blocks"
                )));
            }
            let base = flat_tables.len();
            flat_tables.extend(table.iter().map(|b| *b as i32));
            for (i, &t) in chunk.tokens.iter().enumerate() {
                if t as usize >= cfg.vocab_size {
                    return Err(ForwardError::TokenOutOfVocab {
                        token: t,
                        vocab: cfg.vocab_size,
                    });
                }
                let p = chunk.start_pos + i;
                ids.push(t as i32);
                pos.push(p as i32);
                tok_slot.push(chunk.blocks.slot(p)? as i32);
                table_base.push(base as i32);
                ctx_len.push(p as i32 + 1);
            }
        }
        let n = ids.len();
        if n == 0 {
            if let Some(comm) = comm {
                self.dev
                    .ctx
                    .bind_to_thread()
                    .map_err(CudaError::from)
                    .map_err(backend)?;
                // No tokens of its own, but this rank's experts still serve the others.
                for layer in &self.w.layers {
                    if let DevFeedForward::Moe(moe) = &layer.mlp {
                        self.moe_exchange(moe, 0, 0, comm)?;
                    }
                }
            }
            return Ok(StepLogits {
                logits: None,
                per_chunk: vec![0; batch.len()],
            });
        }
        self.dev
            .ctx
            .bind_to_thread()
            .map_err(CudaError::from)
            .map_err(backend)?;
        let max_ctx = ctx_len.iter().copied().max().unwrap_or(0) as usize;
        let dev = &self.dev;
        let step = Step {
            n,
            max_ctx,
            pos: dev.upload(&pos).map_err(backend)?,
            tok_slot: dev.upload(&tok_slot).map_err(backend)?,
            table_base: dev.upload(&table_base).map_err(backend)?,
            ctx_len: dev.upload(&ctx_len).map_err(backend)?,
            tables: dev.upload(&flat_tables).map_err(backend)?,
        };
        let d_ids = dev.upload(&ids).map_err(backend)?;
        let x = dev.alloc::<f32>(n * h).map_err(backend)?;
        let px = dev.ptr(&x, 0);
        ops::embedding(dev, px, &self.w.embed_tokens, dev.ptr(&d_ids, 0), n, h).map_err(backend)?;
        let xn = dev.alloc::<f32>(n * h).map_err(backend)?;
        let pxn = dev.ptr(&xn, 0);
        for (li, layer) in self.w.layers.iter().enumerate() {
            ops::rms_norm(
                dev,
                pxn,
                px,
                dev.ptr(&layer.input_layernorm, 0),
                n,
                h,
                cfg.rms_norm_eps,
            )
            .map_err(backend)?;
            let attn = self.attention(li, layer, pxn, &step).map_err(backend)?;
            ops::add(dev, px, dev.ptr(&attn, 0), n * h).map_err(backend)?;
            drop(attn);
            ops::rms_norm(
                dev,
                pxn,
                px,
                dev.ptr(&layer.post_attention_layernorm, 0),
                n,
                h,
                cfg.rms_norm_eps,
            )
            .map_err(backend)?;
            let ffn = match (&layer.mlp, comm.as_deref_mut()) {
                (DevFeedForward::Dense(m), _) => self.mlp(m, pxn, n).map_err(backend)?,
                (DevFeedForward::Moe(moe), None) => self.moe(moe, pxn, n).map_err(backend)?,
                (DevFeedForward::Moe(moe), Some(comm)) => self.moe_exchange(moe, pxn, n, comm)?,
            };
            ops::add(dev, px, dev.ptr(&ffn, 0), n * h).map_err(backend)?;
        }

        // Final norm and lm_head on the requested rows only.
        let mut rows: Vec<i32> = Vec::new();
        let mut per_chunk = Vec::with_capacity(batch.len());
        let mut row = 0usize;
        for chunk in batch {
            let len = chunk.tokens.len();
            let r: Vec<usize> = match chunk.logits {
                LogitsWanted::None => vec![],
                LogitsWanted::Last if len > 0 => vec![row + len - 1],
                LogitsWanted::Last => vec![],
                LogitsWanted::All => (row..row + len).collect(),
            };
            per_chunk.push(r.len());
            rows.extend(r.iter().map(|v| *v as i32));
            row += len;
        }
        let v = cfg.vocab_size;
        if rows.is_empty() {
            return Ok(StepLogits {
                logits: None,
                per_chunk,
            });
        }
        let m = rows.len();
        let d_rows = dev.upload(&rows).map_err(backend)?;
        let hs = dev.alloc::<f32>(m * h).map_err(backend)?;
        let phs = dev.ptr(&hs, 0);
        ops::gather_rows(dev, phs, px, dev.ptr(&d_rows, 0), m, h).map_err(backend)?;
        ops::rms_norm(
            dev,
            phs,
            phs,
            dev.ptr(&self.w.norm, 0),
            m,
            h,
            cfg.rms_norm_eps,
        )
        .map_err(backend)?;
        let out = dev.alloc::<f32>(m * v).map_err(backend)?;
        ops::linear(dev, dev.ptr(&out, 0), phs, &self.w.lm_head, m).map_err(backend)?;
        Ok(StepLogits {
            logits: Some(out),
            per_chunk,
        })
    }

    /// The step's logits copied to the host, per chunk.
    fn download_logits(&self, step: &StepLogits) -> Result<Vec<Vec<f32>>, CudaError> {
        let v = self.cfg.vocab_size;
        let total: usize = step.per_chunk.iter().sum();
        let host = match &step.logits {
            Some(d) => self.dev.download(d, total * v)?,
            None => Vec::new(),
        };
        self.dev.stream.synchronize()?;
        let mut out = Vec::with_capacity(step.per_chunk.len());
        let mut at = 0;
        for &cnt in &step.per_chunk {
            out.push(host[at * v..(at + cnt) * v].to_vec());
            at += cnt;
        }
        Ok(out)
    }

    /// Samples the one-row chunks that have a sampler where their logits are: per row the max,
    /// the softmax sums and the [`SAMPLE_CANDIDATES`] best logits are computed on the device and
    /// only those come back; a row whose draw the candidates cannot decide (a nucleus or
    /// top-k wider than them) is copied whole and sampled on the host, as are chunks without a
    /// sampler (their logits are returned whole by [`Executor::forward`]).
    fn sample_on_device(
        &self,
        step: &StepLogits,
        samplers: &mut [Option<Sampler>],
    ) -> Result<Vec<Option<Sampled>>, CudaError> {
        let (dev, v) = (&self.dev, self.cfg.vocab_size);
        let mut out: Vec<Option<Sampled>> = vec![None; step.per_chunk.len()];
        let Some(logits) = &step.logits else {
            return Ok(out);
        };
        // (chunk, row of the step's logits) of every row sampled here.
        let mut picks = Vec::new();
        let mut row = 0usize;
        for (c, &cnt) in step.per_chunk.iter().enumerate() {
            if cnt == 1 && samplers.get(c).is_some_and(|s| s.is_some()) {
                picks.push((c, row));
            }
            row += cnt;
        }
        if picks.is_empty() {
            return Ok(out);
        }
        let m = picks.len();
        let k = SAMPLE_CANDIDATES.min(v);
        let rows: Vec<i32> = picks.iter().map(|(_, r)| *r as i32).collect();
        let temps: Vec<f32> = picks
            .iter()
            .map(|(c, _)| samplers[*c].as_ref().map_or(0.0, |s| s.params.temperature))
            .collect();
        let d_rows = dev.upload(&rows)?;
        let d_temps = dev.upload(&temps)?;
        let sel = dev.alloc::<f32>(m * v)?;
        ops::gather_rows(
            dev,
            dev.ptr(&sel, 0),
            dev.ptr(logits, 0),
            dev.ptr(&d_rows, 0),
            m,
            v,
        )?;
        let maxes = dev.alloc::<f32>(m)?;
        let sums = dev.alloc::<f64>(2 * m)?;
        ops::row_softmax_stats(
            dev,
            dev.ptr(&maxes, 0),
            dev.ptr(&sums, 0),
            dev.ptr(&sel, 0),
            dev.ptr(&d_temps, 0),
            m,
            v,
        )?;
        let lens = dev.upload(&vec![v as i32; m])?;
        let ids = dev.alloc::<i32>(m * k)?;
        let count = dev.alloc::<i32>(m)?;
        ops::topk_select(
            dev,
            dev.ptr(&ids, 0),
            dev.ptr(&count, 0),
            dev.ptr(&sel, 0),
            dev.ptr(&lens, 0),
            m,
            v,
            k,
        )?;
        let vals = dev.alloc::<f32>(m * k)?;
        ops::gather_candidates(
            dev,
            dev.ptr(&vals, 0),
            dev.ptr(&sel, 0),
            dev.ptr(&ids, 0),
            m,
            v,
            k,
        )?;
        let (h_ids, h_vals) = (dev.download(&ids, m * k)?, dev.download(&vals, m * k)?);
        let (h_max, h_sums) = (dev.download(&maxes, m)?, dev.download(&sums, 2 * m)?);
        dev.stream.synchronize()?;
        // Rows the candidates cannot decide are sampled whole; all rows come back at once.
        let mut whole: Option<Vec<f32>> = None;
        for (i, (c, _)) in picks.iter().enumerate() {
            let Some(sampler) = samplers[*c].as_mut() else {
                continue;
            };
            let cands: Vec<(u32, f32)> = (0..k)
                .map(|j| (h_ids[i * k + j] as u32, h_vals[i * k + j]))
                .collect();
            let summary = RowSummary {
                max: h_max[i],
                sum_exp: h_sums[2 * i],
                sum_exp_t: h_sums[2 * i + 1],
            };
            out[*c] = match sample_candidates(&cands, v, &summary, sampler) {
                Some(s) => Some(s),
                None => {
                    self.whole_rows_sampled
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if whole.is_none() {
                        whole = Some(dev.download(&sel, m * v)?);
                    }
                    let rows = whole.as_deref().unwrap_or_default();
                    Some(sample_row(&rows[i * v..(i + 1) * v], sampler))
                }
            };
        }
        Ok(out)
    }

    /// MLA with the lightning indexer for every token of the step; returns `[n, hidden]`.
    fn attention(
        &self,
        li: usize,
        layer: &DevLayer,
        xn: u64,
        s: &Step,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        let (dev, c, a) = (&self.dev, &self.cfg, &layer.self_attn);
        let n = s.n;
        let d = MlaDims {
            heads: c.num_attention_heads,
            nope: c.qk_nope_head_dim,
            rd: c.qk_rope_head_dim,
            vd: c.v_head_dim,
            kvr: c.kv_lora_rank,
        };
        let qk = d.nope + d.rd;
        let (ih, id) = (c.index_n_heads, c.index_head_dim);
        let inv_freq = dev.ptr(&self.w.rope_inv_freq, 0);
        let (pos, tok_slot) = (dev.ptr(&s.pos, 0), dev.ptr(&s.tok_slot, 0));

        let ql = dev.alloc::<f32>(n * c.q_lora_rank)?;
        let pql = dev.ptr(&ql, 0);
        ops::linear(dev, pql, xn, &a.q_a_proj, n)?;
        ops::rms_norm(
            dev,
            pql,
            pql,
            dev.ptr(&a.q_a_layernorm, 0),
            n,
            c.q_lora_rank,
            c.rms_norm_eps,
        )?;
        let q = dev.alloc::<f32>(n * d.heads * qk)?;
        ops::linear(dev, dev.ptr(&q, 0), pql, &a.q_b_proj, n)?;
        let kv = dev.alloc::<f32>(n * c.latent_dim())?;
        ops::linear(dev, dev.ptr(&kv, 0), xn, &a.kv_a_proj_with_mqa, n)?;
        let iq = dev.alloc::<f32>(n * ih * id)?;
        ops::linear(dev, dev.ptr(&iq, 0), pql, &a.indexer.wq_b, n)?;
        let ik = dev.alloc::<f32>(n * id)?;
        ops::linear(dev, dev.ptr(&ik, 0), xn, &a.indexer.wk, n)?;
        let iw = dev.alloc::<f32>(n * ih)?;
        ops::linear(dev, dev.ptr(&iw, 0), xn, &a.indexer.weights_proj, n)?;
        // ReLU commutes with the positive scales, so both fold into the head weights.
        let w_scale = (ih as f32).powf(-0.5) * (id as f32).powf(-0.5);
        ops::scale(dev, dev.ptr(&iw, 0), w_scale, n * ih)?;

        ops::kv_store(
            dev,
            &self.latent[li],
            dev.ptr(&kv, 0),
            dev.ptr(&a.kv_a_layernorm, 0),
            tok_slot,
            pos,
            inv_freq,
            self.attention_factor,
            n,
            d.kvr,
            d.rd,
            c.rms_norm_eps,
        )?;
        ops::index_key_store(
            dev,
            &self.index_k[li],
            dev.ptr(&ik, 0),
            dev.ptr(&a.indexer.k_norm_weight, 0),
            dev.ptr(&a.indexer.k_norm_bias, 0),
            tok_slot,
            pos,
            inv_freq,
            self.attention_factor,
            n,
            id,
            d.rd,
            1e-6,
        )?;
        let half = d.rd / 2;
        ops::rope(
            dev,
            dev.ptr(&q, 0),
            pos,
            inv_freq,
            self.attention_factor,
            n,
            d.heads,
            d.heads * qk,
            qk,
            d.nope,
            half,
            true,
        )?;
        ops::rope(
            dev,
            dev.ptr(&iq, 0),
            pos,
            inv_freq,
            self.attention_factor,
            n,
            ih,
            ih * id,
            id,
            0,
            half,
            false,
        )?;

        let scores = dev.alloc::<f32>(n * s.max_ctx)?;
        let (tables, table_base, ctx_len) = (
            dev.ptr(&s.tables, 0),
            dev.ptr(&s.table_base, 0),
            dev.ptr(&s.ctx_len, 0),
        );
        let bs = self.geometry.block_size;
        ops::indexer_scores(
            dev,
            dev.ptr(&scores, 0),
            dev.ptr(&iq, 0),
            dev.ptr(&iw, 0),
            &self.index_k[li],
            tables,
            table_base,
            bs,
            ctx_len,
            n,
            ih,
            id,
            s.max_ctx,
        )?;
        let k = c.index_topk.min(s.max_ctx).max(1);
        let sel = dev.alloc::<i32>(n * k)?;
        let count = dev.alloc::<i32>(n)?;
        ops::topk_select(
            dev,
            dev.ptr(&sel, 0),
            dev.ptr(&count, 0),
            dev.ptr(&scores, 0),
            ctx_len,
            n,
            s.max_ctx,
            k,
        )?;
        drop(scores);

        let q_lat = dev.alloc::<f32>(n * d.heads * d.kvr)?;
        ops::absorb_q(dev, dev.ptr(&q_lat, 0), dev.ptr(&q, 0), &a.kv_b_proj, n, d)?;
        let o_lat = dev.alloc::<f32>(n * d.heads * d.kvr)?;
        ops::sparse_mla(
            dev,
            dev.ptr(&o_lat, 0),
            dev.ptr(&q_lat, 0),
            dev.ptr(&q, 0),
            &self.latent[li],
            dev.ptr(&sel, 0),
            dev.ptr(&count, 0),
            tables,
            table_base,
            bs,
            n,
            d,
            k,
            self.softmax_scale,
        )?;
        let o = dev.alloc::<f32>(n * d.heads * d.vd)?;
        ops::absorb_v(dev, dev.ptr(&o, 0), dev.ptr(&o_lat, 0), &a.kv_b_proj, n, d)?;
        let out = dev.alloc::<f32>(n * c.hidden_size)?;
        ops::linear(dev, dev.ptr(&out, 0), dev.ptr(&o, 0), &a.o_proj, n)?;
        Ok(out)
    }

    /// `down(silu(gate(x)) ⊙ up(x))` over `n` rows at `x`, written to `y`.
    fn mlp_into(&self, m: &DevMlp, x: u64, n: usize, y: u64) -> Result<(), CudaError> {
        let dev = &self.dev;
        let inter = m.gate_proj.out_dim;
        let g = dev.alloc::<f32>(n * inter)?;
        let u = dev.alloc::<f32>(n * inter)?;
        ops::linear(dev, dev.ptr(&g, 0), x, &m.gate_proj, n)?;
        ops::linear(dev, dev.ptr(&u, 0), x, &m.up_proj, n)?;
        ops::silu_mul(
            dev,
            dev.ptr(&g, 0),
            dev.ptr(&g, 0),
            dev.ptr(&u, 0),
            n * inter,
        )?;
        ops::linear(dev, y, dev.ptr(&g, 0), &m.down_proj, n)
    }

    fn mlp(
        &self,
        m: &DevMlp,
        x: u64,
        n: usize,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        let y = self.dev.alloc::<f32>(n * self.cfg.hidden_size)?;
        self.mlp_into(m, x, n, self.dev.ptr(&y, 0))?;
        Ok(y)
    }

    /// Routed experts plus the shared experts: wholly on the device for decode-sized steps
    /// ([`Self::moe_on_device`]), else grouped by expert on the host.
    fn moe(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        if let Some(tables) = self.device_moe_tables(moe, n) {
            return self.moe_on_device(moe, tables, xn, n);
        }
        let (dev, c) = (&self.dev, &self.cfg);
        let (h, e, k) = (c.hidden_size, c.n_routed_experts, c.num_experts_per_tok);
        let (host_ids, wts) = self.route(moe, xn, n)?;
        // Sorted rows: by expert, then token. perm[row] = token; row_of[t·k + i] = row.
        let mut counts = vec![0usize; e];
        for &x in &host_ids {
            counts[x as usize] += 1;
        }
        let mut offsets = vec![0usize; e + 1];
        for x in 0..e {
            offsets[x + 1] = offsets[x] + counts[x];
        }
        let mut fill = offsets.clone();
        let mut perm = vec![0i32; n * k];
        let mut row_of = vec![0i32; n * k];
        for (r, &x) in host_ids.iter().enumerate() {
            let x = x as usize;
            perm[fill[x]] = (r / k) as i32;
            row_of[r] = fill[x] as i32;
            fill[x] += 1;
        }
        let d_perm = dev.upload(&perm)?;
        let d_row_of = dev.upload(&row_of)?;
        let xs = dev.alloc::<f32>(n * k * h)?;
        ops::gather_rows(dev, dev.ptr(&xs, 0), xn, dev.ptr(&d_perm, 0), n * k, h)?;
        let ys = dev.alloc::<f32>(n * k * h)?;
        self.experts_sorted(moe, &counts, &offsets, &xs, &ys, n * k)?;
        let y = dev.alloc::<f32>(n * h)?;
        ops::moe_combine(
            dev,
            dev.ptr(&y, 0),
            dev.ptr(&ys, 0),
            dev.ptr(&d_row_of, 0),
            dev.ptr(&wts, 0),
            n,
            k,
            h,
        )?;
        if let Some(shared) = &moe.shared_experts {
            let s = self.mlp(shared, xn, n)?;
            ops::add(dev, dev.ptr(&y, 0), dev.ptr(&s, 0), n * h)?;
        }
        Ok(y)
    }

    /// The tables to run a step of `n` tokens through [`Self::moe_on_device`], when it can: the
    /// grouped path applies ([`Self::grouped_experts_apply`]'s conditions; with at most one
    /// tile of tokens no expert can have more rows than a tile) and the rows fit one sort block.
    fn moe_device_tables_ok(&self, n: usize) -> bool {
        let c = &self.cfg;
        self.dev.device_moe()
            && self.dev.grouped_experts()
            && self.dev.gemm() == super::Gemm::Cublas
            && c.hidden_size.is_multiple_of(128)
            && c.moe_intermediate_size.is_multiple_of(128)
            && n <= ops::GROUPED_TILE_ROWS
            && n.checked_mul(c.num_experts_per_tok)
                .is_some_and(|r| r <= ops::MOE_SORT_MAX_ROWS)
            && c.n_routed_experts <= ops::MAX_EXPERTS
    }

    fn device_moe_tables<'m>(&self, moe: &'m DevMoe, n: usize) -> Option<&'m MoeTables> {
        moe.tables.as_ref().filter(|_| self.moe_device_tables_ok(n))
    }

    /// An MoE step with no host round trip: route, sort the rows by expert and plan the
    /// grouped GEMMs' tiles on the device (`ops::moe_sort_rows`), run every expert's gate, up
    /// and down projections as one launch each (tiles pick their expert from `tables`), and
    /// combine. The tiles, rows and kernels are those of the host-sorted grouped path, so the
    /// results are the same bit for bit.
    fn moe_on_device(
        &self,
        moe: &DevMoe,
        tables: &MoeTables,
        xn: u64,
        n: usize,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        let (dev, c) = (&self.dev, &self.cfg);
        let (h, e, k, inter) = (
            c.hidden_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            c.moe_intermediate_size,
        );
        let rows = n * k;
        self.moe_layers_on_device
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (ids, wts) = self.route_on_device(moe, xn, n)?;
        let sorted = ops::moe_sort_rows(
            dev,
            dev.ptr(&ids, 0),
            rows,
            e,
            k,
            dev.ptr(&self.moe_status, 0),
        )?;
        let xs = dev.alloc::<f32>(rows * h)?;
        ops::gather_rows(dev, dev.ptr(&xs, 0), xn, dev.ptr(&sorted.perm, 0), rows, h)?;
        let g = dev.alloc::<f32>(rows * inter)?;
        let u = dev.alloc::<f32>(rows * inter)?;
        let (pg, pu) = (dev.ptr(&g, 0), dev.ptr(&u, 0));
        let xq = ops::quantize_rows(dev, dev.ptr(&xs, 0), rows, h, tables.gate.pow2_act())?;
        ops::linear_fp8_grouped_table(dev, pg, &xq, &tables.gate, &sorted)?;
        ops::linear_fp8_grouped_table(dev, pu, &xq, &tables.up, &sorted)?;
        ops::silu_mul(dev, pg, pg, pu, rows * inter)?;
        let gq = ops::quantize_rows(dev, pg, rows, inter, tables.down.pow2_act())?;
        let ys = dev.alloc::<f32>(rows * h)?;
        ops::linear_fp8_grouped_table(dev, dev.ptr(&ys, 0), &gq, &tables.down, &sorted)?;
        let y = dev.alloc::<f32>(n * h)?;
        ops::moe_combine(
            dev,
            dev.ptr(&y, 0),
            dev.ptr(&ys, 0),
            dev.ptr(&sorted.row_of, 0),
            dev.ptr(&wts, 0),
            n,
            k,
            h,
        )?;
        if let Some(shared) = &moe.shared_experts {
            let s = self.mlp(shared, xn, n)?;
            ops::add(dev, dev.ptr(&y, 0), dev.ptr(&s, 0), n * h)?;
        }
        Ok(y)
    }

    /// Every active expert's MLP over its rows of `xs` (`rows` of them, sorted by expert) into
    /// `ys`: grouped where [`Self::grouped_experts_apply`] says so, else one expert at a time.
    /// A whole layer and an expert-parallel rank's share of one take the same path, so a group
    /// computes what one GPU does.
    fn experts_sorted(
        &self,
        moe: &DevMoe,
        counts: &[usize],
        offsets: &[usize],
        xs: &cudarc::driver::CudaSlice<f32>,
        ys: &cudarc::driver::CudaSlice<f32>,
        rows: usize,
    ) -> Result<(), CudaError> {
        let ran = counts.iter().filter(|c| **c > 0).count();
        self.experts_touched
            .fetch_add(ran, std::sync::atomic::Ordering::Relaxed);
        if self.grouped_experts_apply(moe, counts) {
            let dev = &self.dev;
            self.experts_grouped(moe, counts, offsets, dev.ptr(xs, 0), rows, dev.ptr(ys, 0))
        } else {
            self.experts_one_by_one(moe, counts, offsets, xs, ys)
        }
    }

    /// Grouped GEMMs pay where experts have few rows each (decode), and on Hopper at any rows
    /// (the warpgroup kernel: one launch per projection instead of one library GEMM per
    /// expert): FP8 experts on the cuBLAS path, every active one held here, K of both
    /// projections a multiple of 128 (one activation scale per 128 channels), and no expert
    /// with more rows than one grouped tile unless the warpgroup kernel takes both K.
    fn grouped_experts_apply(&self, moe: &DevMoe, counts: &[usize]) -> bool {
        let c = &self.cfg;
        let any_rows = self.dev.grouped_gemm() != super::GroupedGemm::Mma
            && ops::grouped_wgmma_applies(&self.dev, c.hidden_size)
            && ops::grouped_wgmma_applies(&self.dev, c.moe_intermediate_size);
        self.dev.grouped_experts()
            && self.dev.gemm() == super::Gemm::Cublas
            && c.hidden_size.is_multiple_of(128)
            && c.moe_intermediate_size.is_multiple_of(128)
            && (any_rows || counts.iter().all(|n| *n <= ops::GROUPED_TILE_ROWS))
            && moe.experts.iter().zip(counts).all(|(m, n)| {
                *n == 0
                    || m.as_ref()
                        .is_some_and(|m| m.gate_proj.w.dtype() == DType::Fp8)
            })
    }

    /// Every active expert's MLP over its rows of `xs` (sorted by expert) into `ys`, one launch
    /// per projection for all of them, each input quantized once.
    fn experts_grouped(
        &self,
        moe: &DevMoe,
        counts: &[usize],
        offsets: &[usize],
        xs: u64,
        rows: usize,
        ys: u64,
    ) -> Result<(), CudaError> {
        let dev = &self.dev;
        let inter = self.cfg.moe_intermediate_size;
        let active: Vec<(&DevMlp, usize, usize)> = moe
            .experts
            .iter()
            .zip(counts)
            .zip(offsets)
            .filter(|((_, n), _)| **n > 0)
            .filter_map(|((m, n), off)| m.as_ref().map(|m| (m, *off, *n)))
            .collect();
        let proj = |f: fn(&DevMlp) -> &DevLinear| -> Vec<(&DevLinear, usize, usize)> {
            active.iter().map(|(m, off, n)| (f(m), *off, *n)).collect()
        };
        let Some(&(first, ..)) = active.first() else {
            return Ok(());
        };
        let g = dev.alloc::<f32>(rows * inter)?;
        let u = dev.alloc::<f32>(rows * inter)?;
        let (pg, pu) = (dev.ptr(&g, 0), dev.ptr(&u, 0));
        // Gate and up read the same rows: quantized once for both.
        let xq = ops::quantize_rows(
            dev,
            xs,
            rows,
            self.cfg.hidden_size,
            first.gate_proj.pow2_act,
        )?;
        ops::linear_fp8_grouped(dev, pg, &xq, &proj(|m| &m.gate_proj))?;
        ops::linear_fp8_grouped(dev, pu, &xq, &proj(|m| &m.up_proj))?;
        ops::silu_mul(dev, pg, pg, pu, rows * inter)?;
        let gq = ops::quantize_rows(dev, pg, rows, inter, first.down_proj.pow2_act)?;
        ops::linear_fp8_grouped(dev, ys, &gq, &proj(|m| &m.down_proj))
    }

    /// Every active expert's MLP, one expert at a time.
    fn experts_one_by_one(
        &self,
        moe: &DevMoe,
        counts: &[usize],
        offsets: &[usize],
        xs: &cudarc::driver::CudaSlice<f32>,
        ys: &cudarc::driver::CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (dev, h) = (&self.dev, self.cfg.hidden_size);
        for (x, m) in moe.experts.iter().enumerate() {
            let cnt = counts[x];
            if cnt == 0 {
                continue;
            }
            let m = m.as_ref().ok_or_else(|| {
                CudaError::Unsupported(format!("expert {x} is held by another rank"))
            })?;
            let off = offsets[x] * h;
            self.mlp_into(m, dev.ptr(xs, off), cnt, dev.ptr(ys, off))?;
        }
        Ok(())
    }

    /// Routes `n` tokens on the device. Returns the chosen experts `[n·k]` on the host and the
    /// device buffer of their weights.
    fn route(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
    ) -> Result<(Vec<i32>, cudarc::driver::CudaSlice<f32>), CudaError> {
        let e = self.cfg.n_routed_experts;
        let k = self.cfg.num_experts_per_tok;
        let (ids, wts) = self.route_on_device(moe, xn, n)?;
        let host_ids = self.dev.download(&ids, n * k)?;
        if let Some(bad) = host_ids.iter().find(|x| **x < 0 || **x as usize >= e) {
            return Err(CudaError::Unsupported(format!(
                "router chose expert {bad} of {e}"
            )));
        }
        Ok((host_ids, wts))
    }

    /// Routes `n` tokens on the device: the chosen experts `[n·k]` (ascending per token) and
    /// their weights, both on the device.
    fn route_on_device(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
    ) -> Result<
        (
            cudarc::driver::CudaSlice<i32>,
            cudarc::driver::CudaSlice<f32>,
        ),
        CudaError,
    > {
        let (dev, c) = (&self.dev, &self.cfg);
        let (e, k) = (c.n_routed_experts, c.num_experts_per_tok);
        let logits = dev.alloc::<f32>(n * e)?;
        ops::linear(dev, dev.ptr(&logits, 0), xn, &moe.gate, n)?;
        let ids = dev.alloc::<i32>(n * k)?;
        let wts = dev.alloc::<f32>(n * k)?;
        let params = RouteParams {
            n_experts: e,
            n_group: c.n_group,
            topk_group: c.topk_group,
            top_k: k,
            normalize: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
        };
        ops::moe_route(
            dev,
            dev.ptr(&ids, 0),
            dev.ptr(&wts, 0),
            dev.ptr(&logits, 0),
            dev.ptr(&moe.e_score_correction_bias, 0),
            n,
            params,
        )?;
        Ok((ids, wts))
    }

    /// Runs the local experts over `rows` (host values `[rows·h]`, expert ids per row);
    /// returns the outputs in the rows' order, on the host.
    fn run_local_experts(
        &self,
        moe: &DevMoe,
        experts: &[usize],
        rows: &[f32],
    ) -> Result<Vec<f32>, CudaError> {
        if experts.is_empty() {
            return Ok(Vec::new());
        }
        let d_rows = self.dev.upload(rows)?;
        let out = self.run_local_experts_on_device(moe, experts, &d_rows)?;
        self.dev
            .download(&out, experts.len() * self.cfg.hidden_size)
    }

    /// Runs the local experts over the device rows `rows` (`[experts.len(), h]`, expert ids
    /// per row), grouped by expert on the device; returns the outputs in the rows' order.
    fn run_local_experts_on_device(
        &self,
        moe: &DevMoe,
        experts: &[usize],
        rows: &cudarc::driver::CudaSlice<f32>,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        let (dev, h, e) = (&self.dev, self.cfg.hidden_size, self.cfg.n_routed_experts);
        let m = experts.len();
        let out = dev.alloc::<f32>(m.max(1) * h)?;
        if m == 0 {
            return Ok(out);
        }
        let mut counts = vec![0usize; e];
        for &x in experts {
            counts[x] += 1;
        }
        let mut offsets = vec![0usize; e + 1];
        for x in 0..e {
            offsets[x + 1] = offsets[x] + counts[x];
        }
        // sorted[slot] = row; slot_of[row] = slot.
        let mut fill = offsets.clone();
        let mut sorted = vec![0i32; m];
        let mut slot_of = vec![0i32; m];
        for (r, &x) in experts.iter().enumerate() {
            sorted[fill[x]] = r as i32;
            slot_of[r] = fill[x] as i32;
            fill[x] += 1;
        }
        let d_sorted = dev.upload(&sorted)?;
        let xs = dev.alloc::<f32>(m * h)?;
        ops::gather_rows(
            dev,
            dev.ptr(&xs, 0),
            dev.ptr(rows, 0),
            dev.ptr(&d_sorted, 0),
            m,
            h,
        )?;
        let ys = dev.alloc::<f32>(m * h)?;
        self.experts_sorted(moe, &counts, &offsets, &xs, &ys, m)?;
        // Back to the rows' order.
        let d_slot_of = dev.upload(&slot_of)?;
        ops::gather_rows(
            dev,
            dev.ptr(&out, 0),
            dev.ptr(&ys, 0),
            dev.ptr(&d_slot_of, 0),
            m,
            h,
        )?;
        Ok(out)
    }

    /// Routes `n` tokens and lays their (token, expert) rows out by expert, which is also by
    /// owning rank (expert ranges are contiguous). Returns the rows `[n·k, h]` on the device,
    /// their experts in that order, `row_of[t·k + i]` (the sorted slot of token t's i-th
    /// choice, what `moe_combine` reads), and the routing weights on the device.
    fn route_sorted(&self, moe: &DevMoe, xn: u64, n: usize) -> Result<SortedRows, CudaError> {
        let (dev, c) = (&self.dev, &self.cfg);
        let (h, k) = (c.hidden_size, c.num_experts_per_tok);
        let (ids, wts) = self.route(moe, xn, n)?;
        let mut order: Vec<usize> = (0..n * k).collect();
        order.sort_by_key(|&r| ids[r]);
        let mut row_of = vec![0i32; n * k];
        let mut perm = vec![0i32; n * k];
        for (slot, &r) in order.iter().enumerate() {
            row_of[r] = slot as i32;
            perm[slot] = (r / k) as i32;
        }
        let d_perm = dev.upload(&perm)?;
        let xs = dev.alloc::<f32>(n * k * h)?;
        ops::gather_rows(dev, dev.ptr(&xs, 0), xn, dev.ptr(&d_perm, 0), n * k, h)?;
        Ok(SortedRows {
            xs,
            experts: order.iter().map(|&r| ids[r] as usize).collect(),
            row_of,
            wts,
        })
    }

    /// Combines the expert outputs `ys` (sorted like [`SortedRows`]) with the routing weights
    /// and adds the shared experts: the MoE layer's output for the `n` tokens.
    fn combine(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
        ys: &cudarc::driver::CudaSlice<f32>,
        sorted: &SortedRows,
    ) -> Result<cudarc::driver::CudaSlice<f32>, CudaError> {
        let (dev, c) = (&self.dev, &self.cfg);
        let (h, k) = (c.hidden_size, c.num_experts_per_tok);
        let y = dev.alloc::<f32>(n.max(1) * h)?;
        let d_row_of = dev.upload(&sorted.row_of)?;
        ops::moe_combine(
            dev,
            dev.ptr(&y, 0),
            dev.ptr(ys, 0),
            dev.ptr(&d_row_of, 0),
            dev.ptr(&sorted.wts, 0),
            n,
            k,
            h,
        )?;
        if let Some(shared) = &moe.shared_experts {
            let s = self.mlp(shared, xn, n)?;
            ops::add(dev, dev.ptr(&y, 0), dev.ptr(&s, 0), n * h)?;
        }
        Ok(y)
    }

    /// Exchange timing so far: (MoE layers exchanged, seconds in dispatch, seconds in
    /// combine, rows sent).
    pub fn exchange_stats(&self) -> ExchangeStats {
        *self.exchange.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record_exchange(&self, dispatch: f64, combine: f64, rows: usize) {
        let mut s = self.exchange.lock().unwrap_or_else(|e| e.into_inner());
        s.layers += 1;
        s.dispatch_secs += dispatch;
        s.combine_secs += combine;
        s.rows_sent += rows as u64;
    }

    /// Expert-parallel MoE: route on the device, send each (token, expert) row to the rank
    /// owning the expert, run the local experts on what arrives, send the results back and
    /// combine them with the routing weights on the device, plus the shared experts. With
    /// `n == 0` the rank only serves the others. Over NCCL the rows move device to device
    /// ([`Self::moe_exchange_nccl`]); over a host transport they are staged through host memory
    /// in the CPU reference's messages (`Model::forward_with`), so ranks agree whatever each
    /// computes with.
    fn moe_exchange(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
        comm: &mut dyn Transport,
    ) -> Result<cudarc::driver::CudaSlice<f32>, ForwardError> {
        let world = comm.world_size();
        if world != self.shard.world {
            return Err(ForwardError::Backend(format!(
                "a group of {world} ranks, but this executor holds 1/{} of the experts",
                self.shard.world
            )));
        }
        if let Some(nccl) = comm.as_nccl() {
            return self.moe_exchange_nccl(moe, xn, n, nccl);
        }
        let (dev, h, e) = (&self.dev, self.cfg.hidden_size, self.cfg.n_routed_experts);
        let sorted = if n > 0 {
            Some(self.route_sorted(moe, xn, n).map_err(backend)?)
        } else {
            None
        };
        let started = std::time::Instant::now();
        let mut sent_rows = vec![0usize; world];
        if let Some(sorted) = &sorted {
            for &x in &sorted.experts {
                sent_rows[self.shard.owner(x, e)] += 1;
            }
        }
        // Each row: expert id, length, values.
        let row_bytes = 4 + 8 + 4 * h;
        let mut writers: Vec<Writer> = sent_rows
            .iter()
            .map(|rows| Writer::with_capacity(4 + rows * row_bytes))
            .collect();
        if let Some(sorted) = &sorted {
            let host_xs = dev
                .download(&sorted.xs, sorted.experts.len() * h)
                .map_err(backend)?;
            for (dest, w) in writers.iter_mut().enumerate() {
                w.u32(sent_rows[dest] as u32);
            }
            for (slot, &x) in sorted.experts.iter().enumerate() {
                writers[self.shard.owner(x, e)]
                    .u32(x as u32)
                    .f32s(&host_xs[slot * h..(slot + 1) * h]);
            }
        } else {
            for w in &mut writers {
                w.u32(0);
            }
        }
        let received = comm.all_to_all(writers.into_iter().map(Writer::finish).collect())?;

        // Every row that arrived, from every rank, through the local experts at once.
        let mut experts = Vec::new();
        let arrived: usize = received.iter().map(Vec::len).sum();
        let mut rows = Vec::with_capacity(arrived / 4);
        let mut per_source = Vec::with_capacity(world);
        for (src, bytes) in received.iter().enumerate() {
            let mut r = Reader::new(bytes, src);
            let count = if bytes.is_empty() {
                0
            } else {
                r.u32()? as usize
            };
            for _ in 0..count {
                let x = r.u32()? as usize;
                let len = r.f32s_into(&mut rows)?;
                if x >= e || len != h || !self.shard.owns(x, e) {
                    return Err(ForwardError::Backend(format!(
                        "rank {src} sent a row for expert {x} that this rank cannot compute"
                    )));
                }
                experts.push(x);
            }
            per_source.push(count);
        }
        let dispatched = started.elapsed().as_secs_f64();
        let out = self
            .run_local_experts(moe, &experts, &rows)
            .map_err(backend)?;
        let combining = std::time::Instant::now();
        let mut replies = Vec::with_capacity(world);
        let mut at = 0;
        for count in per_source {
            let mut w = Writer::with_capacity(8 + 4 * count * h);
            w.f32s(&out[at * h..(at + count) * h]);
            replies.push(w.finish());
            at += count;
        }
        let results = comm.all_to_all(replies)?;
        let Some(sorted) = sorted else {
            self.record_exchange(dispatched, combining.elapsed().as_secs_f64(), 0);
            return dev.alloc::<f32>(h).map_err(backend);
        };
        // The results come back in the order sent: by destination rank, then by expert,
        // which is the sorted order `row_of` indexes.
        let mut ys = Vec::with_capacity(sorted.experts.len() * h);
        for (dest, bytes) in results.iter().enumerate() {
            let len = Reader::new(bytes, dest).f32s_into(&mut ys)?;
            if len != sent_rows[dest] * h {
                return Err(ForwardError::Backend(format!(
                    "rank {dest} returned {len} values for {} rows",
                    sent_rows[dest]
                )));
            }
        }
        let d_ys = dev.upload(&ys).map_err(backend)?;
        self.record_exchange(
            dispatched,
            combining.elapsed().as_secs_f64(),
            sorted.experts.len(),
        );
        self.combine(moe, xn, n, &d_ys, &sorted).map_err(backend)
    }

    /// [`Self::moe_exchange`] over NCCL: only the routing plan (each row's expert) goes
    /// through the transport's byte exchange; the rows and their results move between the
    /// GPUs' buffers and never visit host memory.
    fn moe_exchange_nccl(
        &self,
        moe: &DevMoe,
        xn: u64,
        n: usize,
        nccl: &mut NcclTransport,
    ) -> Result<cudarc::driver::CudaSlice<f32>, ForwardError> {
        let (dev, h, e) = (&self.dev, self.cfg.hidden_size, self.cfg.n_routed_experts);
        let world = nccl.world_size();
        let sorted = if n > 0 {
            Some(self.route_sorted(moe, xn, n).map_err(backend)?)
        } else {
            None
        };
        let started = std::time::Instant::now();
        let mut sent_rows = vec![0usize; world];
        let mut plans: Vec<Vec<u32>> = vec![Vec::new(); world];
        if let Some(sorted) = &sorted {
            for &x in &sorted.experts {
                let dest = self.shard.owner(x, e);
                sent_rows[dest] += 1;
                plans[dest].push(x as u32);
            }
        }
        let parts = plans
            .iter()
            .map(|p| {
                let mut w = Writer::default();
                w.u32s(p);
                w.finish()
            })
            .collect();
        let received = nccl.all_to_all(parts)?;
        let mut experts = Vec::new();
        let mut recv_rows = Vec::with_capacity(world);
        for (src, bytes) in received.iter().enumerate() {
            let plan = Reader::new(bytes, src).u32s()?;
            for &x in &plan {
                let x = x as usize;
                if x >= e || !self.shard.owns(x, e) {
                    return Err(ForwardError::Backend(format!(
                        "rank {src} sent a row for expert {x} that this rank cannot compute"
                    )));
                }
                experts.push(x);
            }
            recv_rows.push(plan.len());
        }
        let nothing = dev.alloc::<f32>(h).map_err(backend)?;
        let send = sorted.as_ref().map_or(&nothing, |s| &s.xs);
        let mut rows = dev
            .alloc::<f32>(experts.len().max(1) * h)
            .map_err(backend)?;
        let exchange = |nccl: &mut NcclTransport,
                        send: &cudarc::driver::CudaSlice<f32>,
                        send_counts: &[usize],
                        recv: &mut cudarc::driver::CudaSlice<f32>,
                        recv_counts: &[usize]|
         -> Result<(), ForwardError> {
            // The rows were written on this executor's stream; NCCL runs on its own.
            dev.stream.synchronize().map_err(|e| backend(e.into()))?;
            nccl.all_to_all_rows(send, send_counts, recv, recv_counts, h)?;
            // Polls, watching the peers: NCCL alone would wait forever on a lost rank.
            nccl.wait()?;
            Ok(())
        };
        exchange(nccl, send, &sent_rows, &mut rows, &recv_rows)?;
        let dispatched = started.elapsed().as_secs_f64();
        let out = self
            .run_local_experts_on_device(moe, &experts, &rows)
            .map_err(backend)?;
        let combining = std::time::Instant::now();
        let total: usize = sent_rows.iter().sum();
        let mut ys = dev.alloc::<f32>(total.max(1) * h).map_err(backend)?;
        exchange(nccl, &out, &recv_rows, &mut ys, &sent_rows)?;
        self.record_exchange(dispatched, combining.elapsed().as_secs_f64(), total);
        match &sorted {
            Some(sorted) => self.combine(moe, xn, n, &ys, sorted).map_err(backend),
            None => Ok(nothing),
        }
    }
}

/// One step's (token, expert) rows of an MoE layer, laid out by expert.
struct SortedRows {
    xs: cudarc::driver::CudaSlice<f32>,
    experts: Vec<usize>,
    row_of: Vec<i32>,
    wts: cudarc::driver::CudaSlice<f32>,
}

/// Where expert-parallel MoE layers spent their exchange time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExchangeStats {
    /// MoE layers that exchanged rows (every rank counts every layer of every step).
    pub layers: u64,
    /// Sending the rows to their experts' ranks, until every row for this rank arrived.
    pub dispatch_secs: f64,
    /// Sending the results back, until every result for this rank's rows arrived.
    pub combine_secs: f64,
    /// (token, expert) rows this rank sent.
    pub rows_sent: u64,
}

/// Per-step index arrays on the device.
struct Step {
    n: usize,
    max_ctx: usize,
    pos: cudarc::driver::CudaSlice<i32>,
    tok_slot: cudarc::driver::CudaSlice<i32>,
    /// Where each token's sequence's block table starts in `tables`.
    table_base: cudarc::driver::CudaSlice<i32>,
    ctx_len: cudarc::driver::CudaSlice<i32>,
    /// The step's sequences' block tables, one after another.
    tables: cudarc::driver::CudaSlice<i32>,
}

fn backend(e: CudaError) -> ForwardError {
    ForwardError::Backend(e.to_string())
}

/// The logits of one step's requested rows, on the device, and how many rows each chunk has.
struct StepLogits {
    logits: Option<cudarc::driver::CudaSlice<f32>>,
    per_chunk: Vec<usize>,
}

/// Best logits per sampled row brought back to the host: covers any top-k up to this size and
/// nearly every nucleus of a trained model.
pub const SAMPLE_CANDIDATES: usize = 1024;

impl Executor for CudaExecutor {
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> {
        let step = self.forward_impl(batch, None)?;
        self.download_logits(&step).map_err(backend)
    }

    fn forward_sample(
        &mut self,
        batch: &[SeqChunk],
        samplers: &mut [Option<Sampler>],
    ) -> Result<Vec<Option<Sampled>>, ForwardError> {
        let step = self.forward_impl(batch, None)?;
        self.sample_on_device(&step, samplers).map_err(backend)
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.geometry
    }
    fn device_name(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.ordinal, self.dev.name, self.dev.arch
        )
    }
}

impl RankCompute for CudaExecutor {
    fn forward_rank(
        &mut self,
        batch: &[SeqChunk],
        comm: &mut dyn Transport,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        let step = self.forward_impl(batch, Some(comm))?;
        self.download_logits(&step).map_err(backend)
    }
    fn forward_rank_sample(
        &mut self,
        batch: &[SeqChunk],
        samplers: &mut [Option<Sampler>],
        comm: &mut dyn Transport,
    ) -> Result<Vec<Option<Sampled>>, ForwardError> {
        let step = self.forward_impl(batch, Some(comm))?;
        self.sample_on_device(&step, samplers).map_err(backend)
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.geometry
    }
    fn limit_blocks(&mut self, num_blocks: usize) {
        self.limit_blocks(num_blocks);
    }
    fn device_name(&self) -> String {
        Executor::device_name(self)
    }
}

impl Drop for CudaExecutor {
    /// The MoE exchange's cost over the executor's life, for benchmarks and post-mortems.
    fn drop(&mut self) {
        let s = self.exchange_stats();
        if s.layers > 0 {
            let per = |secs: f64| format!("{:.3}", 1e3 * secs / s.layers as f64);
            tracing::info!(
                rank = self.shard.rank,
                world = self.shard.world,
                layers = s.layers,
                dispatch_ms_mean = per(s.dispatch_secs),
                combine_ms_mean = per(s.combine_secs),
                rows_sent = s.rows_sent,
                "expert-parallel MoE exchanges"
            );
        }
    }
}
