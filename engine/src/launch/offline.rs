//! The one-shot commands: score a prompt, generate from one, benchmark prefill and decode, and
//! plan a replica's placement over GPUs.
//! Each returns its result for the caller to print; on a worker rank of a multi-process group,
//! which computes for rank 0, they return `None`.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};

use super::device::gpu_dtypes;
use super::replica::{Replica, Setup, build_replica, load_shard, model_config};
use super::{Error, ModelOptions, Result};
use crate::backend::cpu::CpuKvCache;
use crate::backend::cuda::plan::{Placement, PlacementRequest, placement};
use crate::backend::cuda::{self, DType, Gemm};
use crate::dist::ExpertShard;
use crate::generate::{self, GenerateRequest, Generation, Rng};
use crate::kv::{BlockAllocator, BlockTable, DEFAULT_BLOCK_SIZE, KvGeometry};
use crate::model::{LogitsWanted, Model, ModelConfig, SeqChunk};

/// The logits of every prompt position (or only the last), one row per position.
pub fn score(
    opts: &ModelOptions,
    prompt_ids: &[u32],
    last_only: bool,
) -> Result<Option<Vec<Vec<f32>>>> {
    let setup = Setup::new(opts)?;
    let config = model_config(opts)?;
    let geometry = generate::score_geometry(config.max_position_embeddings, prompt_ids)?;
    let Replica::Executor(mut ex) = build_replica(opts, &setup, geometry, false, None)? else {
        return Ok(None);
    };
    tracing::info!(tokens = prompt_ids.len(), "scoring prompt");
    let (geometry, partitions) = (ex.kv_geometry(), ex.kv_partitions());
    let logits = generate::score_with(
        &mut |b| ex.forward(b),
        geometry,
        partitions,
        prompt_ids,
        last_only,
        config.vocab_size,
    )?;
    Ok(Some(logits))
}

/// Generates for one request; the model's EOS ids stop it too unless `ignore_eos`.
pub fn generate(
    opts: &ModelOptions,
    mut req: GenerateRequest,
    ignore_eos: bool,
) -> Result<Option<Generation>> {
    let setup = Setup::new(opts)?;
    let config = model_config(opts)?;
    if !ignore_eos {
        req.stop_token_ids.extend(&config.eos_token_ids);
    }
    let reqs = std::slice::from_ref(&req);
    let geometry = generate::plan_geometry(config.max_position_embeddings, reqs)?;
    let Replica::Executor(mut ex) = build_replica(opts, &setup, geometry, false, None)? else {
        return Ok(None);
    };
    tracing::info!(
        prompt_tokens = req.prompt.len(),
        max_tokens = req.max_tokens,
        "generating"
    );
    let started = Instant::now();
    let (geometry, partitions) = (ex.kv_geometry(), ex.kv_partitions());
    let out =
        generate::generate_with(&mut |b| ex.forward(b), geometry, partitions, reqs)?.remove(0);
    tracing::info!(
        generated = out.token_ids.len(),
        finish_reason = ?out.finish_reason,
        secs = format!("{:.3}", started.elapsed().as_secs_f64()),
        "done"
    );
    Ok(Some(out))
}

/// What `bench` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt length for the prefill measurement (CPU).
    pub prompt_len: usize,
    /// Decode steps timed at each context length.
    pub decode_steps: usize,
    /// Context lengths at which decode time per token is measured.
    pub contexts: Vec<usize>,
    /// Dense (first) layers of the full-width GPU model.
    pub dense_layers: usize,
    /// MoE layers of the full-width GPU model.
    pub moe_layers: usize,
    /// GPU prefill shapes: (sequences, tokens each).
    pub prefill: Vec<(usize, usize)>,
    /// GPU decode batch sizes.
    pub decode_batches: Vec<usize>,
    pub gemm: Gemm,
    /// GPU: also time the single GEMMs and the FP8 crossover sweep.
    pub gemm_timings: bool,
    /// GPU: also time DeepSeek Sparse Attention's kernels alone, each on both caches.
    pub dsa_timings: bool,
}

/// On the CPU: the given model. With the CUDA backend: a DeepSeek-V3.2-shaped model at full
/// width with fewer layers and random weights generated on the GPU. Returns the JSON report.
pub fn bench(opts: &ModelOptions, b: &BenchOptions) -> Result<Value> {
    if opts.expert_parallel.is_some_and(|ep| ep > 1) {
        return Err(Error::Options(
            "bench times one device; time expert parallelism with generate or score over the \
             group's ranks (scripts/cuda_ep_check.sh does, and logs the MoE exchange's cost)"
                .into(),
        ));
    }
    if Setup::whole(opts)?.on_gpu() {
        let (weights, cache) = gpu_dtypes(opts, true)?;
        let gpu = cuda::bench::BenchOptions {
            device: opts.device,
            weights,
            cache,
            dense_layers: b.dense_layers,
            moe_layers: b.moe_layers,
            gemm: b.gemm,
            prefill: b.prefill.clone(),
            decode_batches: b.decode_batches.clone(),
            contexts: b.contexts.clone(),
            decode_steps: b.decode_steps,
            gemm_timings: b.gemm_timings,
            dsa_timings: b.dsa_timings,
            ..cuda::bench::BenchOptions::default()
        };
        return Ok(cuda::bench::run(&gpu)?);
    }
    let model = load_shard(opts, ExpertShard::WHOLE)?;
    bench_cpu(&model, b.prompt_len, b.decode_steps, &b.contexts)
}

/// Prefill throughput at `prompt_len`, then decode time per token after contexts of each length.
fn bench_cpu(
    model: &Model,
    prompt_len: usize,
    decode_steps: usize,
    contexts: &[usize],
) -> Result<Value> {
    let c = &model.config;
    let mut rng = Rng::new(17);
    let mut tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 2 + (rng.next_u64() % (c.vocab_size as u64 - 2)) as u32)
            .collect()
    };
    let longest = contexts
        .iter()
        .copied()
        .chain([prompt_len])
        .max()
        .unwrap_or(0)
        .saturating_add(decode_steps);
    if longest > c.max_position_embeddings {
        return Err(Error::Options(format!(
            "the longest benchmark context ({longest}) exceeds max_position_embeddings ({})",
            c.max_position_embeddings
        )));
    }
    let geometry = KvGeometry {
        num_blocks: longest.div_ceil(DEFAULT_BLOCK_SIZE),
        block_size: DEFAULT_BLOCK_SIZE,
    };
    let mut cache = CpuKvCache::new(c, geometry);
    let mut alloc = BlockAllocator::new(geometry);
    let mut table = BlockTable::default();
    alloc.reserve(&mut table, longest)?;

    let prompt = tokens(prompt_len);
    let t = Instant::now();
    model.forward(
        &mut cache,
        &[SeqChunk {
            tokens: &prompt,
            start_pos: 0,
            blocks: &table,
            logits: LogitsWanted::Last,
        }],
    )?;
    let prefill_s = t.elapsed().as_secs_f64();
    let mut decode = Vec::new();
    for &ctx in contexts {
        let ctx_tokens = tokens(ctx);
        tracing::info!(context = ctx, "filling context");
        model.forward(
            &mut cache,
            &[SeqChunk {
                tokens: &ctx_tokens,
                start_pos: 0,
                blocks: &table,
                logits: LogitsWanted::None,
            }],
        )?;
        let mut next = tokens(1);
        let t = Instant::now();
        for step in 0..decode_steps {
            let out = model.forward(
                &mut cache,
                &[SeqChunk {
                    tokens: &next,
                    start_pos: ctx + step,
                    blocks: &table,
                    logits: LogitsWanted::Last,
                }],
            )?;
            next = vec![generate::argmax(&out[0])];
        }
        let per_token_ms = 1e3 * t.elapsed().as_secs_f64() / decode_steps.max(1) as f64;
        let gflops = c.flops_per_token(ctx + decode_steps / 2) / per_token_ms / 1e6;
        decode.push(json!({
            "context": ctx,
            "ms_per_token": per_token_ms,
            "tokens_per_s": 1e3 / per_token_ms,
            "gflop_per_s": gflops,
        }));
    }
    Ok(json!({
        "threads": rayon::current_num_threads(),
        "prefill": {
            "tokens": prompt_len,
            "seconds": prefill_s,
            "tokens_per_s": prompt_len as f64 / prefill_s,
            "gflop_per_s": (0..prompt_len).map(|p| c.flops_per_token(p)).sum::<f64>() / prefill_s / 1e9,
        },
        "decode": decode,
    }))
}

/// What `plan` is asked: one replica over `gpus` GPUs of `gpu_memory_gib` each.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The model's config.json, or a checkpoint directory holding one.
    pub config: PathBuf,
    pub gpus: usize,
    pub gpu_memory_gib: f64,
    /// fp8 or bf16.
    pub weight_dtype: String,
    /// fp8 or bf16.
    pub kv_cache_dtype: String,
    /// Default: the config's max_position_embeddings.
    pub max_model_len: Option<usize>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// The per-GPU placement of one replica, from config.json alone (no weights are read). A
/// replica that does not fit comes back with `fits: false` and the reason.
pub fn plan(o: &PlanOptions) -> Result<Placement> {
    let path = if o.config.is_dir() {
        o.config.join("config.json")
    } else {
        o.config.clone()
    };
    let cfg = ModelConfig::from_file(&path).map_err(|error| Error::ModelConfig { path, error })?;
    let dtype = |flag: &str, value: &str| {
        DType::parse(value)
            .filter(|d| *d != DType::F32)
            .ok_or_else(|| Error::Options(format!("{flag} must be fp8 or bf16, got {value}")))
    };
    let gib = o.gpu_memory_gib;
    if !(gib.is_finite() && gib > 0.0 && gib <= 1e6) {
        return Err(Error::Options(format!(
            "--gpu-memory-gib must be between 0 and 1e6 GiB, got {gib}"
        )));
    }
    let gpu_memory_bytes = (gib * (1u64 << 30) as f64) as usize;
    for (flag, v) in [
        ("--gpus", o.gpus),
        ("--max-num-seqs", o.max_num_seqs),
        ("--max-num-batched-tokens", o.max_num_batched_tokens),
    ] {
        if v == 0 {
            return Err(Error::Options(format!("{flag} must be at least 1")));
        }
    }
    let req = PlacementRequest {
        gpus: o.gpus,
        gpu_memory_bytes,
        weights: dtype("--weight-dtype", &o.weight_dtype)?,
        cache: dtype("--kv-cache-dtype", &o.kv_cache_dtype)?,
        block_size: DEFAULT_BLOCK_SIZE,
        max_batch_tokens: o.max_num_batched_tokens,
        max_model_len: o.max_model_len,
        max_num_seqs: o.max_num_seqs,
    };
    Ok(placement(&cfg, &req))
}
