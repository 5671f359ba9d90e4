//! The CUDA benchmark at DeepSeek-V3.2's full width: hidden 7168, 128 heads, the released MLA,
//! indexer and MoE shapes, with fewer layers so weights fit one GPU, random weights drawn on the
//! device. Times prefill and decode steps after a warm-up (wall time around whole synchronised
//! steps, so host work such as the MoE routing copy is included), and measures the device's
//! ceilings in the same run: a bf16 cuBLAS matrix product and a device-to-device copy.
//!
//! Decode at long contexts shares one prefix of cached (random) latent and indexer-key rows
//! between the sequences of a batch, each sequence appending into its own block: every sequence
//! still reads its whole context, while the cache takes one context's memory, not `batch` of them.

use std::time::Instant;

use serde_json::{Value, json};

use super::device::{Device, Gemm};
use super::executor::{CudaExecutor, CudaOptions};
use super::ops::{self, CuType};
use super::weights::DType;
use super::{CudaError, unavailable_reason};
use crate::backend::Executor;
use crate::kv::{BlockTable, KvGeometry};
use crate::model::{LogitsWanted, MlpKind, ModelConfig, SeqChunk};

const BLOCK: usize = 64;

/// What to time.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    pub device: usize,
    pub dense_layers: usize,
    pub moe_layers: usize,
    pub gemm: Gemm,
    /// Weight storage (FP8 as the released checkpoint, by default).
    pub weights: DType,
    pub cache: DType,
    /// Prefill shapes: (sequences, tokens each).
    pub prefill: Vec<(usize, usize)>,
    pub decode_batches: Vec<usize>,
    /// Cached tokens before the first timed decode step.
    pub contexts: Vec<usize>,
    /// Timed steps per decode shape (after one warm-up step); the median is reported.
    pub decode_steps: usize,
    /// Timed runs per prefill shape (after one warm-up run).
    pub prefill_runs: usize,
    /// Time the single GEMMs and the FP8 crossover sweep (thousands of launches; a profiler
    /// run of the model's steps leaves them out).
    pub gemm_timings: bool,
    /// Time DeepSeek Sparse Attention's kernels alone at the released shapes, each kernel on
    /// both caches (`dsa` in the report).
    pub dsa_timings: bool,
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            device: 0,
            dense_layers: 1,
            moe_layers: 3,
            gemm: Gemm::Cublas,
            weights: DType::Fp8,
            cache: DType::Bf16,
            prefill: vec![(1, 4096), (4, 1024)],
            decode_batches: vec![1, 8, 32, 64],
            contexts: vec![1024, 8192, 32768, 131072],
            decode_steps: 5,
            prefill_runs: 2,
            gemm_timings: true,
            dsa_timings: true,
            seed: 7,
        }
    }
}

/// DeepSeek-V3.2's released shapes with `dense` dense layers followed by `moe` MoE layers.
pub fn full_width_config(dense: usize, moe: usize) -> Result<ModelConfig, CudaError> {
    let kinds: Vec<&str> = std::iter::repeat_n("dense", dense)
        .chain(std::iter::repeat_n("sparse", moe))
        .collect();
    let text = json!({
        "model_type": "deepseek_v32", "architectures": ["DeepseekV32ForCausalLM"],
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": dense + moe,
        "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "norm_topk_prob": true, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 163840, "index_n_heads": 64, "index_head_dim": 128,
        "index_topk": 2048, "mlp_layer_types": kinds, "bos_token_id": 0, "eos_token_id": 1,
        "tie_word_embeddings": false,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
            "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    })
    .to_string();
    ModelConfig::from_json(&text).map_err(|e| CudaError::Unsupported(format!("config: {e}")))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// Device-to-device copy bandwidth (bytes read + written per second) and the bf16 cuBLAS
/// matrix rate on random 8192³ operands, f32 accumulation (FLOP/s).
pub fn ceilings(dev: &Device) -> Result<(f64, f64), CudaError> {
    let bytes = 4usize << 30;
    let a = dev.alloc::<u8>(bytes)?;
    let mut b = dev.alloc::<u8>(bytes)?;
    let mut times = Vec::new();
    for i in 0..8 {
        dev.stream.synchronize()?;
        let t = Instant::now();
        dev.stream.memcpy_dtod(&a, &mut b)?;
        dev.stream.synchronize()?;
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let copy = 2.0 * bytes as f64 / median(times);
    drop((a, b));
    let n = 8192usize;
    let mk = |seed| super::weights::DevBuf::random(dev, n * n, DType::Bf16, seed, 1.0);
    let (x, y, z) = (mk(1)?, mk(2)?, mk(3)?);
    let mut times = Vec::new();
    for i in 0..13 {
        dev.stream.synchronize()?;
        let t = Instant::now();
        ops::gemm_raw(
            dev,
            false,
            n,
            n,
            n,
            (x.ptr(dev), CuType::Bf16, n),
            (y.ptr(dev), CuType::Bf16, n),
            (z.ptr(dev), CuType::Bf16, n),
        )?;
        dev.stream.synchronize()?;
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let flops = 2.0 * (n as f64).powi(3) / median(times);
    Ok((copy, flops))
}

/// Median seconds of one `op`, from runs of `per_run` back-to-back launches between
/// synchronisations (so host overhead is amortised over several launches, as in a step).
fn time_op(
    dev: &Device,
    per_run: usize,
    mut op: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    op()?;
    let mut times = Vec::new();
    for _ in 0..7 {
        dev.stream.synchronize()?;
        let t = Instant::now();
        for _ in 0..per_run {
            op()?;
        }
        dev.stream.synchronize()?;
        times.push(t.elapsed().as_secs_f64() / per_run as f64);
    }
    Ok(median(times))
}

/// The weight shapes `(out, in)` of the model's FP8 linears as the released checkpoint has
/// them: q_a, q_b, kv_a, kv_b, o_proj, an expert's gate/up and down, the indexer's wq_b.
const FP8_SHAPES: [(usize, usize); 8] = [
    (1536, 7168),
    (24576, 1536),
    (576, 7168),
    (32768, 512),
    (7168, 16384),
    (2048, 7168),
    (7168, 2048),
    (8192, 1536),
];

/// Token counts of the crossover sweep.
const SWEEP_TOKENS: [usize; 11] = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The linear layers' rates at model shapes: FP8 block-scaled on both kernels and on the path
/// the engine picks (activation quantization included), and bf16 cuBLAS (activation cast
/// included), all with f32 outputs. Then, per FP8 weight shape, the sweep over token counts
/// that `lt::CROSSOVER` is read from.
fn time_gemms(dev: &Device, mm_flops: f64) -> Result<Value, CudaError> {
    use super::device::Fp8Gemm;
    // (tokens, out, in): an expert's gate/up and down at decode batch 64 and a prefill chunk,
    // q_b_proj and o_proj over a 4096-token prefill.
    let shapes = [
        (64usize, 2048usize, 7168usize),
        (64, 7168, 2048),
        (4096, 2048, 7168),
        (4096, 24576, 1536),
        (4096, 7168, 16384),
    ];
    let fp8_peak = 2.0 * mm_flops;
    // One input and one output buffer, large enough for every shape timed below.
    let all = shapes.iter().copied().chain(
        FP8_SHAPES
            .iter()
            .map(|&(o, k)| (SWEEP_TOKENS[SWEEP_TOKENS.len() - 1], o, k)),
    );
    let (max_x, max_y) = all.fold((0, 0), |(x, y), (n, o, k)| (x.max(n * k), y.max(n * o)));
    let x = super::weights::DevBuf::random(dev, max_x, DType::F32, 99, 1.0)?;
    let y = dev.alloc::<f32>(max_y)?;
    let tflops = |n: usize, o: usize, k: usize, s: f64| 2.0 * (n * o * k) as f64 / s / 1e12;
    let mut out = Vec::new();
    for (i, &(n, o, k)) in shapes.iter().enumerate() {
        let mut rec = json!({"tokens": n, "out": o, "in": k});
        for dtype in [DType::Fp8, DType::Bf16] {
            let w = super::weights::random_linear(dev, o, k, dtype, 7 + i as u64)?;
            let pins: &[(&str, Fp8Gemm)] = if dtype == DType::Fp8 {
                &[
                    ("", Fp8Gemm::Auto),
                    ("_ours", Fp8Gemm::Ours),
                    ("_cublaslt", Fp8Gemm::Library),
                ]
            } else {
                &[("", Fp8Gemm::Auto)]
            };
            for (tag, pin) in pins {
                dev.set_fp8_gemm(*pin);
                let s = time_op(dev, 5, || {
                    ops::linear(dev, dev.ptr(&y, 0), x.ptr(dev), &w, n)
                })?;
                let key = format!("{}{tag}", dtype.suffix());
                rec[key.as_str()] = json!({"us": s * 1e6, "tflops": tflops(n, o, k, s)});
            }
            dev.set_fp8_gemm(Fp8Gemm::Auto);
        }
        rec["fp8_path"] = json!(format!("{:?}", dev.fp8_gemm_path(n, o, k)));
        let (f8, b16) = (
            rec["fp8"]["tflops"].as_f64(),
            rec["bf16"]["tflops"].as_f64(),
        );
        if let (Some(f8), Some(b16)) = (f8, b16) {
            // Hopper's dense FP8 rate is twice its bf16 rate.
            rec["fp8_of_fp8_peak"] = json!(f8 * 1e12 / fp8_peak);
            rec["fp8_over_bf16_cublas"] = json!(f8 / b16);
        }
        tracing::info!(n, o, k, record = %rec, "GEMM timed");
        out.push(rec);
    }
    let mut sweep = Vec::new();
    for (i, &(o, k)) in FP8_SHAPES.iter().enumerate() {
        let w = super::weights::random_linear(dev, o, k, DType::Fp8, 70 + i as u64)?;
        let mut rows = Vec::new();
        let mut crossover = None;
        for &n in &SWEEP_TOKENS {
            let mut row = json!({"tokens": n});
            let mut us = [f64::NAN; 2];
            for (j, (tag, pin)) in [("ours", Fp8Gemm::Ours), ("cublaslt", Fp8Gemm::Library)]
                .into_iter()
                .enumerate()
            {
                dev.set_fp8_gemm(pin);
                if pin == Fp8Gemm::Library
                    && dev.fp8_gemm_path(n, o, k) != super::device::Fp8Path::Library
                {
                    row[tag] = json!(null);
                    continue;
                }
                let s = time_op(dev, 5, || {
                    ops::linear(dev, dev.ptr(&y, 0), x.ptr(dev), &w, n)
                })?;
                us[j] = s * 1e6;
                row[tag] = json!({"us": s * 1e6, "tflops": tflops(n, o, k, s)});
            }
            if ops::few_tokens_apply(n, k) {
                dev.set_fp8_gemm(Fp8Gemm::Few);
                let s = time_op(dev, 5, || {
                    ops::linear(dev, dev.ptr(&y, 0), x.ptr(dev), &w, n)
                })?;
                row["few"] = json!({"us": s * 1e6, "tflops": tflops(n, o, k, s),
                    "weight_gb_per_s": (o * k) as f64 / s / 1e9});
            }
            dev.set_fp8_gemm(Fp8Gemm::Auto);
            if crossover.is_none() && us[1] < us[0] {
                crossover = Some(n);
            }
            rows.push(row);
        }
        tracing::info!(o, k, crossover = ?crossover, "FP8 GEMM sweep");
        sweep.push(json!({"out": o, "in": k, "library_from_tokens": crossover, "rows": rows}));
    }
    Ok(json!({"shapes": out, "fp8_sweep": sweep}))
}

/// Block tables over `rows` cache rows: its `BLOCK`-row blocks in a fixed scrambled order, as an
/// allocator scatters sequences (an odd multiplier modulo a power of two is a permutation).
fn scrambled_blocks(rows: usize) -> Vec<i32> {
    let blocks = rows.div_ceil(BLOCK);
    let span = blocks.next_power_of_two();
    (0..span)
        .map(|b| (b * 40_503 + 17) % span)
        .filter(|b| *b < blocks)
        .map(|b| b as i32)
        .collect()
}

/// DeepSeek Sparse Attention's kernels alone, at the benchmark model's shapes (the released ones:
/// indexer 64 heads x 128, top-k 2,048; MLA 128 heads over 512 + 64 latent columns), on both
/// caches and on each
/// kernel: the indexer with its top-k at decode batch 64 over 4K-128K contexts and batch 1 at
/// 128K, every sequence with its own keys; sparse attention at decode batches 1-64 (own rows)
/// and over a 4,096-token prefill selecting from one 4,096-row context.
fn time_dsa(
    dev: &Device,
    cfg: &ModelConfig,
    copy_bw: f64,
    mm_flops: f64,
) -> Result<Value, CudaError> {
    use super::device::{Attention, Indexer};
    use super::weights::{DevBuf, cache_row_len};
    let (iheads, idim, topk) = (cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk);
    let mut indexer = Vec::new();
    for cache in [DType::Bf16, DType::Fp8] {
        let index_row = cache_row_len(cfg, cache).1;
        let row_bytes = index_row * cache.bytes();
        for (batch, ctx) in [
            (64usize, 4096usize),
            (64, 32_768),
            (64, 65_536),
            (64, 131_072),
            (1, 131_072),
        ] {
            let rows = batch * ctx;
            let keys = DevBuf::random(dev, rows * index_row, cache, 11, 1.0)?;
            let tables = dev.upload(&scrambled_blocks(rows))?;
            let base: Vec<i32> = (0..batch).map(|b| (b * ctx / BLOCK) as i32).collect();
            let base = dev.upload(&base)?;
            let lens = dev.upload(&vec![ctx as i32; batch])?;
            let q = DevBuf::random(dev, batch * iheads * idim, DType::F32, 12, 1.0)?;
            let w = DevBuf::random(dev, batch * iheads, DType::F32, 13, 1.0)?;
            let scores = dev.alloc::<f32>(rows)?;
            let (sel, count) = (dev.alloc::<i32>(batch * topk)?, dev.alloc::<i32>(batch)?);
            let score = || {
                ops::indexer_scores(
                    dev,
                    dev.ptr(&scores, 0),
                    q.ptr(dev),
                    w.ptr(dev),
                    &keys,
                    dev.ptr(&tables, 0),
                    dev.ptr(&base, 0),
                    BLOCK,
                    dev.ptr(&lens, 0),
                    batch,
                    iheads,
                    idim,
                    ctx,
                )
            };
            let mut rec = json!({"cache": format!("{cache:?}"), "batch": batch, "context": ctx});
            let bytes = (rows * row_bytes) as f64;
            let flops = 2.0 * (rows * iheads * idim) as f64;
            for (tag, pin) in [
                ("tensor_cores", Indexer::Auto),
                ("cuda_cores", Indexer::CudaCores),
            ] {
                dev.set_indexer(pin);
                let s = time_op(dev, 3, score)?;
                rec[tag] = json!({
                    "us": s * 1e6, "gb_per_s": bytes / s / 1e9, "of_copy_ceiling": bytes / s / copy_bw,
                    "tflops": flops / s / 1e12,
                });
            }
            dev.set_indexer(Indexer::Auto);
            // The tensor-core kernel at each run of keys per block (the auto choice's table).
            let mut sweep = serde_json::Map::new();
            for keys in ops::INDEXER_KEYS_PER_BLOCK {
                dev.set_indexer_keys_per_block(Some(keys));
                sweep.insert(keys.to_string(), json!(time_op(dev, 3, score)? * 1e6));
            }
            dev.set_indexer_keys_per_block(None);
            rec["tensor_cores"]["keys_per_block"] =
                json!(ops::indexer_keys_per_block(dev, batch, ctx));
            rec["tensor_cores_us_by_keys_per_block"] = Value::Object(sweep);
            let s = time_op(dev, 3, || {
                ops::topk_select(
                    dev,
                    dev.ptr(&sel, 0),
                    dev.ptr(&count, 0),
                    dev.ptr(&scores, 0),
                    dev.ptr(&lens, 0),
                    batch,
                    ctx,
                    topk,
                )
            })?;
            rec["topk_us"] = json!(s * 1e6);
            tracing::info!(record = %rec, "indexer timed");
            indexer.push(rec);
        }
    }
    let d = ops::MlaDims {
        heads: cfg.num_attention_heads,
        nope: cfg.qk_nope_head_dim,
        rd: cfg.qk_rope_head_dim,
        vd: cfg.v_head_dim,
        kvr: cfg.kv_lora_rank,
    };
    let width = d.kvr + d.rd;
    let mut attention = Vec::new();
    for cache in [DType::Bf16, DType::Fp8] {
        let row_len = cache_row_len(cfg, cache).0;
        for (n, prefill) in [
            (1usize, false),
            (8, false),
            (64, false),
            (128, false),
            (4096, true),
        ] {
            let ctx = if prefill { 4096 } else { n * topk };
            let lat = DevBuf::random(dev, ctx * row_len, cache, 21, 1.0)?;
            let tables = dev.upload(&scrambled_blocks(ctx))?;
            let (sel_host, base_host): (Vec<i32>, Vec<i32>) = if prefill {
                let sel = (0..n)
                    .flat_map(|t| (0..topk).map(move |j| (2 * j + (t & 1)) as i32))
                    .collect();
                (sel, vec![0; n])
            } else {
                let sel = (0..n).flat_map(|_| 0..topk as i32).collect();
                (sel, (0..n).map(|t| (t * topk / BLOCK) as i32).collect())
            };
            let (sel, base) = (dev.upload(&sel_host)?, dev.upload(&base_host)?);
            let count = dev.upload(&vec![topk as i32; n])?;
            let q_lat = DevBuf::random(dev, n * d.heads * d.kvr, DType::F32, 22, 1.0)?;
            let q = DevBuf::random(dev, n * d.heads * d.qk(), DType::F32, 23, 1.0)?;
            let out = dev.alloc::<f32>(n * d.heads * d.kvr)?;
            let scale = 1.0 / (d.qk() as f32).sqrt();
            let attend = || {
                ops::sparse_mla(
                    dev,
                    dev.ptr(&out, 0),
                    q_lat.ptr(dev),
                    q.ptr(dev),
                    &lat,
                    dev.ptr(&sel, 0),
                    dev.ptr(&count, 0),
                    dev.ptr(&tables, 0),
                    dev.ptr(&base, 0),
                    BLOCK,
                    n,
                    d,
                    topk,
                    scale,
                )
            };
            let flops = 2.0 * (n * d.heads * topk * (width + d.kvr)) as f64;
            let bytes = (n * topk * row_len * cache.bytes()) as f64;
            let mut rec = json!({"cache": format!("{cache:?}"), "tokens": n, "prefill": prefill});
            let warpgroup = ops::sparse_mla_wgmma_applies(dev, cache, d.kvr, d.rd);
            for (tag, pin) in [
                ("warpgroup", Attention::Warpgroup),
                ("tensor_cores", Attention::TensorCores),
                ("cuda_cores", Attention::CudaCores),
            ] {
                // The CUDA-core kernel needs about half a second per prefill call: one run.
                let per_run = if prefill && pin == Attention::CudaCores {
                    1
                } else {
                    3
                };
                if (prefill && pin == Attention::CudaCores && cache == DType::Fp8)
                    || (pin == Attention::Warpgroup && !warpgroup)
                {
                    continue;
                }
                dev.set_attention(pin);
                let s = time_op(dev, per_run, attend)?;
                rec[tag] = json!({
                    "us": s * 1e6, "tflops": flops / s / 1e12, "of_matmul_ceiling": flops / s / mm_flops,
                    "gb_per_s_selected_rows": bytes / s / 1e9,
                });
            }
            // Each tensor-core kernel at each split of the selected rows (the auto choice's
            // table); prefill steps fill the GPU with one split.
            for (tag, pin) in [
                ("warpgroup", Attention::Warpgroup),
                ("tensor_cores", Attention::TensorCores),
            ] {
                if prefill || (pin == Attention::Warpgroup && !warpgroup) {
                    continue;
                }
                dev.set_attention(pin);
                let mut sweep = serde_json::Map::new();
                for splits in [1usize, 2, 4, 8, 16, 32] {
                    dev.set_sparse_mla_splits(Some(splits));
                    sweep.insert(splits.to_string(), json!(time_op(dev, 3, attend)? * 1e6));
                }
                dev.set_sparse_mla_splits(None);
                if let Some(kernel) = ops::sparse_mla_tensor_kernel(dev, cache, d.kvr, d.rd) {
                    rec[tag]["splits"] =
                        json!(ops::sparse_mla_splits(dev, &kernel, n, d.heads, topk));
                }
                rec[format!("{tag}_us_by_splits")] = Value::Object(sweep);
            }
            dev.set_attention(Attention::Auto);
            tracing::info!(record = %rec, "sparse attention timed");
            attention.push(rec);
        }
    }
    Ok(json!({"indexer": indexer, "sparse_mla": attention}))
}

/// Bytes of the weights a step must read: everything but the routed experts, plus `touched`
/// routed experts.
fn step_weight_bytes(cfg: &ModelConfig, touched: usize, dtype: DType) -> f64 {
    let all = super::weights::config_weight_bytes(cfg, dtype) as f64;
    let moe_layers = cfg
        .mlp_layer_types
        .iter()
        .filter(|k| **k == MlpKind::Moe)
        .count();
    let expert = 3.0
        * super::weights::linear_bytes(cfg.moe_intermediate_size, cfg.hidden_size, dtype, true)
            as f64;
    // The embedding table is gathered by row, not read whole.
    let embed = (cfg.vocab_size * cfg.hidden_size * dtype.dense().bytes()) as f64;
    all - embed - (moe_layers * cfg.n_routed_experts) as f64 * expert + touched as f64 * expert
}

/// Runs the benchmark; the JSON holds the config, the ceilings and one record per shape.
pub fn run(opts: &BenchOptions) -> Result<Value, CudaError> {
    if let Some(why) = unavailable_reason() {
        return Err(CudaError::Unavailable(why));
    }
    let cfg = full_width_config(opts.dense_layers, opts.moe_layers)?;
    let max_ctx = opts.contexts.iter().copied().max().unwrap_or(0);
    let max_batch = opts.decode_batches.iter().copied().max().unwrap_or(0);
    let tail = (opts.decode_steps + 2).div_ceil(BLOCK) + 1;
    let shared_blocks = max_ctx.div_ceil(BLOCK);
    let prefill_blocks = opts
        .prefill
        .iter()
        .map(|(s, t)| s * t.div_ceil(BLOCK))
        .max()
        .unwrap_or(0);
    let num_blocks = shared_blocks + max_batch * tail + prefill_blocks;
    let geometry = KvGeometry {
        block_size: BLOCK,
        num_blocks: num_blocks.max(1),
    };
    let max_tokens = opts
        .prefill
        .iter()
        .map(|(s, t)| s * t)
        .chain(opts.decode_batches.iter().copied())
        .max()
        .unwrap_or(1);
    let options = CudaOptions {
        weights: opts.weights,
        cache: opts.cache,
        max_batch_tokens: max_tokens,
        gemm: opts.gemm,
    };
    let t0 = Instant::now();
    let mut exec = CudaExecutor::random(&cfg, geometry, opts.device, options, opts.seed)?;
    exec.randomize_caches(opts.seed ^ 0x5eed)?;
    let build_s = t0.elapsed().as_secs_f64();
    let (free, total) = exec.device().mem_info()?;
    let (copy_bw, mm_flops) = ceilings(exec.device())?;
    exec.device().set_gemm(opts.gemm)?;
    let gemms = if opts.gemm_timings {
        time_gemms(exec.device(), mm_flops)?
    } else {
        Value::Null
    };
    let dsa = if opts.dsa_timings {
        time_dsa(exec.device(), &cfg, copy_bw, mm_flops)?
    } else {
        Value::Null
    };
    let hv = 2.0 * (cfg.hidden_size * cfg.vocab_size) as f64;
    let fwd = |exec: &mut CudaExecutor, chunks: &[SeqChunk]| -> Result<f64, CudaError> {
        let t = Instant::now();
        exec.forward(chunks)
            .map_err(|e| CudaError::Unsupported(format!("forward: {e}")))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let vocab = cfg.vocab_size as u32;
    let token = |i: usize| ((i as u64 * 2_654_435_761) % vocab as u64) as u32;

    let mut prefill = Vec::new();
    let prefill_base = (shared_blocks + max_batch * tail) as u32;
    for &(seqs, len) in &opts.prefill {
        let per = len.div_ceil(BLOCK) as u32;
        let tables: Vec<BlockTable> = (0..seqs as u32)
            .map(|s| BlockTable {
                blocks: (prefill_base + s * per..prefill_base + (s + 1) * per).collect(),
                block_size: BLOCK,
            })
            .collect();
        let toks: Vec<Vec<u32>> = (0..seqs)
            .map(|s| (0..len).map(|i| token(s * len + i)).collect())
            .collect();
        let chunks: Vec<SeqChunk> = (0..seqs)
            .map(|s| SeqChunk {
                tokens: &toks[s],
                start_pos: 0,
                blocks: &tables[s],
                logits: LogitsWanted::Last,
            })
            .collect();
        let mut times = Vec::new();
        for run in 0..=opts.prefill_runs {
            let t = fwd(&mut exec, &chunks)?;
            if run > 0 {
                times.push(t);
            }
        }
        let s = median(times);
        let flops: f64 =
            seqs as f64 * ((0..len).map(|p| cfg.flops_per_token(p) - hv).sum::<f64>() + hv);
        let tokens = (seqs * len) as f64;
        prefill.push(json!({
            "sequences": seqs, "tokens_each": len, "ms": s * 1e3,
            "tokens_per_s": tokens / s, "tflops": flops / s / 1e12,
            "of_matmul_ceiling": flops / s / mm_flops,
        }));
        tracing::info!(seqs, len, ms = s * 1e3, "prefill timed");
    }

    let mut decode = Vec::new();
    for &ctx in &opts.contexts {
        let shared: Vec<u32> = (0..(ctx / BLOCK) as u32).collect();
        for &batch in &opts.decode_batches {
            let tables: Vec<BlockTable> = (0..batch)
                .map(|b| {
                    let own = (shared_blocks + b * tail) as u32;
                    let mut blocks = shared.clone();
                    blocks.extend(own..own + tail as u32);
                    BlockTable {
                        blocks,
                        block_size: BLOCK,
                    }
                })
                .collect();
            // The same steps twice: as served (MoE wholly on the device where it applies),
            // then with the expert ids sorted on the host, to show what the device path saves.
            let mut medians = Vec::new();
            let mut touched = Vec::new();
            for device_moe in [true, false] {
                exec.device().set_device_moe(device_moe);
                let mut times = Vec::new();
                for step in 0..=opts.decode_steps {
                    let toks: Vec<[u32; 1]> = (0..batch).map(|b| [token(b + step * 977)]).collect();
                    let chunks: Vec<SeqChunk> = (0..batch)
                        .map(|b| SeqChunk {
                            tokens: &toks[b],
                            start_pos: ctx + step,
                            blocks: &tables[b],
                            logits: LogitsWanted::Last,
                        })
                        .collect();
                    exec.take_experts_touched();
                    let t = fwd(&mut exec, &chunks)?;
                    if step > 0 {
                        times.push(t);
                        if device_moe {
                            touched.push(exec.take_experts_touched());
                        }
                    }
                }
                medians.push(median(times));
            }
            exec.device().set_device_moe(true);
            let (s, s_host_sort) = (medians[0], medians[1]);
            let touched = touched.iter().sum::<usize>() / touched.len().max(1);
            let flops = batch as f64 * cfg.flops_per_token(ctx);
            let layers = cfg.mlp_layer_types.len() as f64;
            let (latent_row, index_row) = super::weights::cache_row_len(&cfg, opts.cache);
            let kv = batch as f64
                * layers
                * ((ctx * index_row) as f64 + (ctx.min(cfg.index_topk) * latent_row) as f64)
                * opts.cache.bytes() as f64;
            let bytes = step_weight_bytes(&cfg, touched, opts.weights) + kv;
            decode.push(json!({
                "context": ctx, "batch": batch, "ms_per_step": s * 1e3,
                "ms_per_step_moe_sorted_on_host": s_host_sort * 1e3,
                "tokens_per_s": batch as f64 / s, "tflops": flops / s / 1e12,
                "of_matmul_ceiling": flops / s / mm_flops,
                "experts_touched": touched, "gb_read_min": bytes / 1e9,
                "gb_per_s": bytes / s / 1e9, "of_copy_ceiling": bytes / s / copy_bw,
            }));
            tracing::info!(ctx, batch, ms = s * 1e3, "decode timed");
        }
    }
    Ok(json!({
        "device": exec.device().name, "arch": exec.device().arch,
        "gemm": format!("{:?}", opts.gemm),
        "layers": {"dense": opts.dense_layers, "moe": opts.moe_layers},
        "weights": format!("{:?} (random, generated on the device)", opts.weights),
        "cache": format!("{:?}", opts.cache),
        "weight_gib": super::weights::config_weight_bytes(&cfg, opts.weights) as f64 / (1u64 << 30) as f64,
        "gemms": gemms,
        "dsa": dsa,
        "memory_gib": {"free_after_build": free as f64 / (1u64 << 30) as f64, "total": total as f64 / (1u64 << 30) as f64},
        "build_s": build_s,
        "ceilings": {"copy_gb_per_s": copy_bw / 1e9, "bf16_matmul_tflops": mm_flops / 1e12},
        "prefill": prefill, "decode": decode,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_width_config_has_the_released_shapes() {
        let c = full_width_config(1, 3).unwrap();
        assert_eq!((c.hidden_size, c.num_attention_heads), (7168, 128));
        assert_eq!(
            (c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim),
            (1536, 512, 64)
        );
        assert_eq!(
            (c.index_n_heads, c.index_head_dim, c.index_topk),
            (64, 128, 2048)
        );
        assert_eq!(
            (c.n_routed_experts, c.num_experts_per_tok, c.n_group),
            (256, 8, 8)
        );
        assert_eq!(c.mlp_layer_types.len(), 4);
        // 3 MoE layers of 256 experts of 3 x 7168 x 2048 bf16 values dominate: about 68 GB.
        let gb = super::super::weights::config_weight_bytes(&c, DType::Bf16) as f64 / 1e9;
        assert!((70.0..80.0).contains(&gb), "{gb}");
    }
}
