//! The one-shot commands: score a prompt, generate from one, benchmark prefill and decode, and
//! plan a replica's placement over GPUs.
//! Each returns its result for the caller to print; on a worker rank of a multi-process group,
//! which computes for rank 0, they return `None`.

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};

use super::device::gpu_dtypes;
use super::group::Role;
use super::replica::{Replica, Setup, build_replica, model_config};
use super::{Error, ModelOptions, Result};
use crate::backend::Executor;
use crate::backend::cuda::plan::{Placement, PlacementRequest, placement};
use crate::backend::cuda::{self, DType, Gemm};
use crate::generate::{self, GenerateRequest, Generation, Rng, Sampler, SamplingParams};
use crate::kv::{BlockTable, DEFAULT_BLOCK_SIZE, KvGeometry, PrefixCachingPool};
use crate::model::{LogitsWanted, ModelConfig, SeqChunk};

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
    /// GPU: time the `--model` checkpoint through the serving executor instead of the
    /// synthetic full-width model (always so over an expert-parallel group).
    pub checkpoint: bool,
}

/// With the CUDA backend on one GPU (unless `checkpoint`): a DeepSeek-V3.2-shaped model at full
/// width with fewer layers and random weights generated on the GPU, kernel by kernel. Otherwise
/// the `--model` checkpoint through the serving executor, as one device or as the replica's
/// expert-parallel group (threads or processes), so EP2 and EP1 are timed the same way.
/// Returns the JSON report; a worker rank of a multi-process group returns `None`.
pub fn bench(opts: &ModelOptions, b: &BenchOptions) -> Result<Option<Value>> {
    let setup = Setup::new(opts)?;
    let one_device = matches!(setup.role, Role::Single { ep: 1 });
    if setup.on_gpu() && one_device && !b.checkpoint {
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
        return Ok(Some(cuda::bench::run(&gpu)?));
    }
    let config = model_config(opts)?;
    // The CPU reference times one prompt and batch 1; GPUs take the GPU shapes.
    let shapes = if setup.on_gpu() {
        BenchShapes {
            prefill: b.prefill.clone(),
            batches: b.decode_batches.clone(),
            contexts: b.contexts.clone(),
            decode_steps: b.decode_steps,
        }
    } else {
        BenchShapes {
            prefill: vec![(1, b.prompt_len)],
            batches: vec![1],
            contexts: b.contexts.clone(),
            decode_steps: b.decode_steps,
        }
    };
    let geometry = shapes.geometry(config.max_position_embeddings)?;
    let Replica::Executor(mut ex) = build_replica(opts, &setup, geometry, false, None)? else {
        return Ok(None);
    };
    Ok(Some(bench_executor(ex.as_mut(), &config, &shapes)?))
}

/// What [`bench_executor`] runs: prefill steps of (sequences, tokens each), and decode steps of
/// each batch size after each context length.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchShapes {
    pub prefill: Vec<(usize, usize)>,
    pub batches: Vec<usize>,
    pub contexts: Vec<usize>,
    pub decode_steps: usize,
}

/// Context is filled at most this many tokens per sequence and step, as a server would chunk it.
const FILL_CHUNK: usize = 2048;

impl BenchShapes {
    /// The KV blocks each rank needs to hold the largest step here (every sequence may land on
    /// one rank), checked against the model's context limit; every user number is checked.
    pub fn geometry(&self, limit: usize) -> Result<KvGeometry> {
        let bad = |why: String| Error::Options(why);
        if self.prefill.iter().any(|&(s, t)| s == 0 || t == 0) {
            return Err(bad(
                "every prefill shape needs at least 1 sequence of 1 token".into(),
            ));
        }
        if self.batches.contains(&0) {
            return Err(bad("decode batch sizes must be at least 1".into()));
        }
        if !self.contexts.is_empty() && self.decode_steps == 0 {
            return Err(bad("--decode-steps must be at least 1".into()));
        }
        let blocks = |tokens: usize| tokens.div_ceil(DEFAULT_BLOCK_SIZE);
        let longest_prompt = self.prefill.iter().map(|p| p.1).max().unwrap_or(0);
        let longest_decode = match self.contexts.iter().max() {
            Some(&c) => c
                .checked_add(self.decode_steps)
                .ok_or_else(|| bad("the longest context plus --decode-steps overflows".into()))?,
            None => 0,
        };
        let longest = longest_prompt.max(longest_decode);
        if longest > limit {
            return Err(bad(format!(
                "the longest benchmark sequence ({longest} tokens) exceeds max_position_embeddings ({limit})"
            )));
        }
        let prefill_blocks = self
            .prefill
            .iter()
            .map(|&(s, t)| s.checked_mul(blocks(t)))
            .try_fold(0usize, |most, b| b.map(|b| most.max(b)));
        let widest = if self.contexts.is_empty() {
            0
        } else {
            self.batches.iter().copied().max().unwrap_or(0)
        };
        let decode_blocks = widest.checked_mul(blocks(longest_decode));
        let num_blocks = prefill_blocks
            .zip(decode_blocks)
            .map(|(p, d)| p.max(d).max(1))
            .ok_or_else(|| bad("the benchmark's KV blocks overflow".into()))?;
        Ok(KvGeometry {
            num_blocks,
            block_size: DEFAULT_BLOCK_SIZE,
        })
    }
}

/// Times `shapes` on `ex` with random tokens and greedy decoding (sampled where the executor
/// samples, on the device for GPUs). A warm-up step runs first so that kernel compilation is
/// not timed.
pub fn bench_executor(
    ex: &mut dyn Executor,
    c: &ModelConfig,
    shapes: &BenchShapes,
) -> Result<Value> {
    let mut pool = PrefixCachingPool::partitioned(ex.kv_geometry(), ex.kv_partitions(), false);
    let mut rng = Rng::new(17);
    let mut tokens = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 2 + (rng.next_u64() % (c.vocab_size as u64 - 2)) as u32)
            .collect()
    };
    let flops = |from: usize, to: usize| (from..to).map(|p| c.flops_per_token(p)).sum::<f64>();

    let mut warm = BlockTable::default();
    pool.reserve(&mut warm, 16)?;
    let warm_tokens = tokens(16);
    ex.forward(&[SeqChunk {
        tokens: &warm_tokens,
        start_pos: 0,
        blocks: &warm,
        logits: LogitsWanted::Last,
    }])?;
    pool.release(&mut warm);

    let mut prefill = Vec::new();
    for &(seqs, len) in &shapes.prefill {
        tracing::info!(sequences = seqs, tokens = len, "timing prefill");
        let prompts: Vec<Vec<u32>> = (0..seqs).map(|_| tokens(len)).collect();
        let mut tables = vec![BlockTable::default(); seqs];
        for t in &mut tables {
            pool.reserve(t, len)?;
        }
        let chunks: Vec<SeqChunk> = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqChunk {
                tokens: p,
                start_pos: 0,
                blocks: t,
                logits: LogitsWanted::Last,
            })
            .collect();
        let t = Instant::now();
        ex.forward(&chunks)?;
        let secs = t.elapsed().as_secs_f64();
        for t in &mut tables {
            pool.release(t);
        }
        let total = (seqs * len) as f64;
        prefill.push(json!({
            "sequences": seqs,
            "tokens": len,
            "seconds": secs,
            "tokens_per_s": total / secs,
            "gflop_per_s": seqs as f64 * flops(0, len) / secs / 1e9,
        }));
    }

    let mut decode = Vec::new();
    let mut contexts = shapes.contexts.clone();
    contexts.sort_unstable();
    contexts.dedup();
    let widest = shapes.batches.iter().copied().max().unwrap_or(0);
    let steps = shapes.decode_steps;
    let mut tables = vec![BlockTable::default(); if contexts.is_empty() { 0 } else { widest }];
    if let Some(&longest) = contexts.last() {
        for t in &mut tables {
            pool.reserve(t, longest + steps)?;
        }
    }
    // Each context extends what the last one filled (decode's own writes are overwritten).
    let mut filled = 0;
    for &ctx in &contexts {
        tracing::info!(context = ctx, sequences = widest, "filling context");
        for t in &tables {
            let mut pos = filled;
            while pos < ctx {
                let n = (ctx - pos).min(FILL_CHUNK);
                let fill = tokens(n);
                ex.forward(&[SeqChunk {
                    tokens: &fill,
                    start_pos: pos,
                    blocks: t,
                    logits: LogitsWanted::None,
                }])?;
                pos += n;
            }
        }
        filled = ctx;
        for &batch in &shapes.batches {
            let mut next: Vec<Vec<u32>> = (0..batch).map(|_| tokens(1)).collect();
            let t = Instant::now();
            for step in 0..steps {
                let chunks: Vec<SeqChunk> = next
                    .iter()
                    .zip(&tables)
                    .map(|(tok, t)| SeqChunk {
                        tokens: tok,
                        start_pos: ctx + step,
                        blocks: t,
                        logits: LogitsWanted::Last,
                    })
                    .collect();
                let mut samplers: Vec<Option<Sampler>> = (0..batch)
                    .map(|_| {
                        Some(Sampler {
                            params: SamplingParams::default(),
                            rng: Rng::new(0),
                            logprobs: None,
                        })
                    })
                    .collect();
                let sampled = ex.forward_sample(&chunks, &mut samplers)?;
                for (n, s) in next.iter_mut().zip(sampled) {
                    if let Some(s) = s {
                        n[0] = s.token;
                    }
                }
            }
            let secs = t.elapsed().as_secs_f64();
            let ms_per_step = 1e3 * secs / steps as f64;
            decode.push(json!({
                "context": ctx,
                "batch": batch,
                "ms_per_step": ms_per_step,
                "tokens_per_s": (batch * steps) as f64 / secs,
                "gflop_per_s": batch as f64 * flops(ctx, ctx + steps) / secs / 1e9,
            }));
        }
    }
    Ok(json!({
        "device": ex.device_name(),
        "ranks": ex.kv_partitions(),
        "threads": rayon::current_num_threads(),
        "prefill": prefill,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(prefill: &[(usize, usize)], batches: &[usize], contexts: &[usize]) -> BenchShapes {
        BenchShapes {
            prefill: prefill.to_vec(),
            batches: batches.to_vec(),
            contexts: contexts.to_vec(),
            decode_steps: 16,
        }
    }

    #[test]
    fn a_bench_holds_its_largest_step_on_one_rank() {
        let g = shapes(&[(1, 4096), (4, 1024)], &[1, 8], &[100, 1000])
            .geometry(1 << 20)
            .unwrap();
        // Decode: 8 sequences of 1016 tokens = 8 x 16 blocks; prefill: 4 x 16 or 1 x 64.
        assert_eq!(g.num_blocks, 128);
        assert_eq!(g.block_size, DEFAULT_BLOCK_SIZE);
        let g = shapes(&[(2, 64)], &[64], &[]).geometry(1 << 20).unwrap();
        assert_eq!(g.num_blocks, 2, "no contexts: only prefill counts");
    }

    #[test]
    fn bench_shapes_that_cannot_run_are_refused_with_the_reason() {
        let err = |s: BenchShapes| s.geometry(4096).unwrap_err().to_string();
        assert!(err(shapes(&[(1, 5000)], &[1], &[])).contains("exceeds max_position_embeddings"));
        assert!(err(shapes(&[(1, 10)], &[1], &[4090])).contains("4106 tokens"));
        assert!(err(shapes(&[(0, 10)], &[1], &[])).contains("at least 1 sequence"));
        assert!(err(shapes(&[(1, 10)], &[0], &[64])).contains("batch sizes"));
        let mut s = shapes(&[(1, 10)], &[1], &[64]);
        s.decode_steps = 0;
        assert!(err(s).contains("--decode-steps"));
        let mut s = shapes(&[(1, 10)], &[1], &[usize::MAX]);
        s.decode_steps = 1;
        assert!(err(s).contains("overflows"));
        let huge = shapes(&[(usize::MAX, 4096)], &[1], &[]);
        assert!(err(huge).contains("overflow"));
    }
}
