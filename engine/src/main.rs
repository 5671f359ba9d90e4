//! `deepseek-engine`: serve, run, score and benchmark DeepSeek-V3.2-architecture models.
//!
//! Results go to stdout as JSON; progress and diagnostics go to stderr through tracing.
//! With `--expert-parallel N` a model replica spans N ranks: threads of this process, or, when
//! `RANK`/`WORLD_SIZE`/`LEADER_ADDR` are set (as the operator sets them), one rank per process.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use deepseek_engine::backend::cpu::CpuKvCache;
use deepseek_engine::backend::cuda::{self, CudaExecutor, CudaOptions, DType, Gemm};
use deepseek_engine::backend::ep::{ExpertParallelExecutor, run_worker};
use deepseek_engine::backend::{CpuExecutor, Executor};
use deepseek_engine::chat::{self, ThinkingMode};
use deepseek_engine::dist::{ExpertShard, GroupEnv, TcpOptions, TcpTransport};
use deepseek_engine::generate::{self, GenerateRequest, Rng, SamplingParams};
use deepseek_engine::kv::{
    BlockAllocator, BlockTable, DEFAULT_BLOCK_SIZE, KvGeometry, PrefixCachingPool,
};
use deepseek_engine::metrics::Metrics;
use deepseek_engine::model::builtin::{BUILTIN_MODEL, RandomWeights, builtin_config, is_builtin};
use deepseek_engine::model::{LoadOptions, LogitsWanted, Model, ModelConfig, SeqChunk};
use deepseek_engine::runtime;
use deepseek_engine::sched::{Scheduler, SchedulerConfig};
use deepseek_engine::server::{self, ServerState};
use deepseek_engine::tokenizer::Tokenizer;
use serde_json::json;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "deepseek-engine",
    version,
    about = "Inference engine for DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention + MoE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (chat, completions, streaming, tools, metrics).
    Serve(Box<ServeArgs>),
    /// Print the logits of every prompt position as JSON: {"logits": [[...], ...]}.
    Score {
        #[command(flatten)]
        model: ModelArgs,
        /// Comma-separated prompt token ids.
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        /// Only the last position's logits.
        #[arg(long)]
        last_only: bool,
    },
    /// Generate tokens and print {"token_ids": [...]} (generated ids only).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// 0 disables.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long)]
        seed: Option<u64>,
        /// Extra stop token ids (the model's EOS ids always stop unless --ignore-eos).
        #[arg(long, value_delimiter = ',')]
        stop_ids: Vec<u32>,
        #[arg(long)]
        ignore_eos: bool,
    },
    /// Print the DeepSeek-V3.2 prompt text for a chat request JSON file.
    RenderChat {
        /// JSON with `messages`, optional `tools` and `thinking_mode` ("thinking" or "chat").
        #[arg(long)]
        request: PathBuf,
        /// Overrides the file's `thinking_mode`.
        #[arg(long, value_enum)]
        thinking_mode: Option<ModeArg>,
    },
    /// Parse model output (stdin) into an assistant message (reasoning, content, tool calls).
    ParseCompletion {
        #[arg(long, value_enum, default_value_t = ModeArg::Chat)]
        thinking_mode: ModeArg,
    },
    /// Fetch a model (hf://ORG/NAME[@REVISION]) into a directory, resuming by file.
    Download {
        #[arg(long)]
        source: String,
        #[arg(long)]
        dest: PathBuf,
    },
    /// Measure prefill and decode speed, and decode time per token as the context grows.
    /// On the CPU: the given model. With `--backend cuda`: a DeepSeek-V3.2-shaped model at full
    /// width with fewer layers and random weights generated on the GPU.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        gpu: GpuBenchArgs,
        /// Prompt length for the prefill measurement.
        #[arg(long, default_value_t = 256)]
        prompt_len: usize,
        /// Decode steps timed at each context length.
        #[arg(long, default_value_t = 16)]
        decode_steps: usize,
        /// Context lengths at which decode time per token is measured.
        #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
        contexts: Vec<usize>,
    },
}

/// Shapes of the GPU benchmark (ignored on the CPU).
#[derive(Args)]
struct GpuBenchArgs {
    /// Dense (first) layers of the full-width model.
    #[arg(long, default_value_t = 1)]
    dense_layers: usize,
    /// MoE layers of the full-width model (256 experts each).
    #[arg(long, default_value_t = 3)]
    moe_layers: usize,
    /// Prefill shapes as SEQUENCESxTOKENS.
    #[arg(long, value_delimiter = ',', default_value = "1x4096,4x1024")]
    prefill: Vec<String>,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    decode_batches: Vec<usize>,
    /// cuBLAS (bf16 tensor cores) or the tiled f32-accumulating kernel.
    #[arg(long, value_enum, default_value_t = GemmArg::Cublas)]
    gemm: GemmArg,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum GemmArg {
    Cublas,
    Tiled,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum ModeArg {
    Thinking,
    Chat,
}

impl From<ModeArg> for ThinkingMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Thinking => ThinkingMode::Thinking,
            ModeArg::Chat => ThinkingMode::Chat,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "0.0.0.0", env = "DEEPSEEK_ENGINE_HOST")]
    host: String,
    #[arg(long, default_value_t = 8000, env = "DEEPSEEK_ENGINE_PORT")]
    port: u16,
    /// tokenizer.json to use (default: the model directory's, or the built-in one).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Name clients use in the `model` field (default: the model directory's name).
    #[arg(long, env = "SERVED_MODEL_NAME")]
    served_model_name: Option<String>,
    /// Longest sequence (prompt plus completion) accepted.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Most sequences running at once.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Token budget of one engine step (chunked prefill).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Requests allowed to wait; beyond this the API answers 429.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// KV-cache blocks (of --block-size tokens); default: sized from --kv-cache-memory-gb.
    #[arg(long)]
    num_kv_blocks: Option<usize>,
    /// Memory for the KV cache when --num-kv-blocks is not given.
    #[arg(long, default_value_t = 1.0)]
    kv_cache_memory_gb: f64,
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    #[arg(long)]
    no_prefix_caching: bool,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory (config.json + safetensors), or `builtin` for the built-in demo model.
    #[arg(long, default_value = BUILTIN_MODEL)]
    model: String,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Expert-parallel ranks of one model replica (threads here, or processes when RANK,
    /// WORLD_SIZE and LEADER_ADDR are set).
    #[arg(long, default_value_t = 1)]
    expert_parallel: usize,
    /// Seconds to wait for every rank of a multi-process group to join.
    #[arg(long, default_value_t = 600)]
    group_timeout_s: u64,
    /// GPU ordinal for the CUDA backend.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Weight storage on GPUs: fp8 (E4M3 with 128x128 block scales), bf16, f32, or auto (fp8
    /// for FP8 checkpoints, else bf16). The CPU backend computes in f32.
    #[arg(long, default_value = "auto")]
    weight_dtype: String,
    /// KV-cache storage on GPUs: fp8 (656-byte latent rows and 132-byte indexer keys for
    /// DeepSeek-V3.2), bf16, f32, or auto (bf16). The CPU backend stores f32.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
}

/// The GPU's weight and cache storage chosen by `--weight-dtype` and `--kv-cache-dtype`.
fn gpu_dtypes(args: &ModelArgs, fp8_checkpoint: bool) -> Result<(DType, DType)> {
    let parse = |flag: &str, v: &str, auto: DType| -> Result<DType> {
        if v == "auto" {
            return Ok(auto);
        }
        DType::parse(v).with_context(|| format!("{flag} must be fp8, bf16, f32 or auto, got {v:?}"))
    };
    let weights = parse(
        "--weight-dtype",
        &args.weight_dtype,
        if fp8_checkpoint {
            DType::Fp8
        } else {
            DType::Bf16
        },
    )?;
    let cache = parse("--kv-cache-dtype", &args.kv_cache_dtype, DType::Bf16)?;
    Ok((weights, cache))
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    Cpu,
    Cuda,
    Auto,
}

/// How this process takes part in its model replica.
enum Role {
    /// The whole replica in this process (with `ep` ranks as threads when ep > 1).
    Single { ep: usize },
    /// One rank of a multi-process group.
    Group(GroupEnv),
}

fn role(args: &ModelArgs) -> Result<Role> {
    match GroupEnv::from_env()? {
        Some(env) if env.world_size > 1 => {
            let local: usize = std::env::var("LOCAL_WORLD_SIZE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            if local > 1 {
                bail!(
                    "LOCAL_WORLD_SIZE={local}: several ranks per process need the CUDA backend with NCCL, \
                     which this build does not have"
                );
            }
            if args.expert_parallel != env.world_size * local {
                bail!(
                    "--expert-parallel {} does not match WORLD_SIZE {} x LOCAL_WORLD_SIZE {local}",
                    args.expert_parallel,
                    env.world_size
                );
            }
            Ok(Role::Group(env))
        }
        _ if args.expert_parallel == 0 => bail!("--expert-parallel must be at least 1"),
        _ => Ok(Role::Single {
            ep: args.expert_parallel,
        }),
    }
}

/// Whether this run computes on the GPU: `--backend cuda`, or `auto` with a usable GPU.
fn use_cuda(args: &ModelArgs) -> Result<bool> {
    match args.backend {
        Backend::Cpu => Ok(false),
        Backend::Cuda => match cuda::unavailable_reason() {
            None => Ok(true),
            Some(why) => bail!("--backend cuda: CUDA is not available: {why}"),
        },
        Backend::Auto => {
            let gpu = cuda::is_available();
            tracing::info!(backend = if gpu { "cuda" } else { "cpu" }, "backend auto");
            Ok(gpu)
        }
    }
}

/// The single-device executor: the model on GPU `device` or on the CPU. With `auto_blocks`
/// the GPU's KV cache takes every block that fits after weights and workspace.
fn single_executor(
    args: &ModelArgs,
    geometry: KvGeometry,
    auto_blocks: bool,
) -> Result<Box<dyn Executor>> {
    // Flags are checked before hundreds of gigabytes are read.
    let (weights, cache) = gpu_dtypes(args, model_config(args)?.quantization.is_some())?;
    let cuda = use_cuda(args)?;
    // A GPU that keeps FP8 weights needs no f32 copy of them on the host.
    let options = LoadOptions {
        fp8_codes_only: cuda && weights == DType::Fp8,
    };
    let model = Arc::new(load_shard_with(args, ExpertShard::WHOLE, options)?);
    if !cuda {
        if args.weight_dtype != "auto" || args.kv_cache_dtype != "auto" {
            tracing::warn!(
                weight_dtype = %args.weight_dtype,
                kv_cache_dtype = %args.kv_cache_dtype,
                "--weight-dtype and --kv-cache-dtype apply to GPUs; the CPU backend computes and caches in f32"
            );
        }
        return Ok(Box::new(CpuExecutor::new(model, geometry)));
    }
    // Tensor cores for serving (cuBLAS bf16, or the FP8 block-scaled kernel); the tiled
    // kernels are the exact-check path.
    let opts = CudaOptions {
        weights,
        cache,
        gemm: Gemm::Cublas,
        ..CudaOptions::default()
    };
    tracing::info!(weights = ?weights, kv_cache = ?cache, "GPU storage");
    let geometry = if auto_blocks {
        let plan = CudaExecutor::plan_for(&model, args.device, geometry.block_size, opts)?;
        KvGeometry {
            num_blocks: plan.num_blocks,
            block_size: geometry.block_size,
        }
    } else {
        geometry
    };
    Ok(Box::new(CudaExecutor::with_options(
        &model,
        geometry,
        args.device,
        opts,
    )?))
}

fn model_config(args: &ModelArgs) -> Result<ModelConfig> {
    if is_builtin(&args.model) {
        return Ok(builtin_config());
    }
    let path = PathBuf::from(&args.model).join("config.json");
    ModelConfig::from_file(&path).with_context(|| format!("reading {}", path.display()))
}

/// Loads the routed experts of `shard` and everything replicated.
fn load_shard(args: &ModelArgs, shard: ExpertShard) -> Result<Model> {
    load_shard_with(args, shard, LoadOptions::default())
}

fn load_shard_with(args: &ModelArgs, shard: ExpertShard, options: LoadOptions) -> Result<Model> {
    let started = Instant::now();
    let model = if is_builtin(&args.model) {
        tracing::info!("building the built-in demo model (random weights)");
        Model::from_source_sharded(builtin_config(), &RandomWeights { seed: 0x5eed }, shard)?
    } else {
        let dir = PathBuf::from(&args.model);
        tracing::info!(model = %dir.display(), "loading model");
        Model::load_with(&dir, shard, options)
            .with_context(|| format!("loading {}", dir.display()))?
    };
    let c = &model.config;
    tracing::info!(
        layers = c.num_hidden_layers,
        hidden = c.hidden_size,
        experts = c.n_routed_experts,
        index_topk = c.index_topk,
        vocab = c.vocab_size,
        rank = shard.rank,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model ready"
    );
    Ok(model)
}

/// What rank 0 computes with: the whole replica, or the leader side of a group.
enum Replica {
    Executor(Box<dyn Executor>),
    /// A worker rank: it ran its group to the end.
    Worker,
}

/// Builds the replica for `geometry`; on worker ranks, runs the worker loop until rank 0 ends.
fn build_replica(
    args: &ModelArgs,
    geometry: KvGeometry,
    auto_blocks: bool,
    joined: Option<Arc<AtomicBool>>,
) -> Result<Replica> {
    let n_experts = model_config(args)?.n_routed_experts;
    let role = role(args)?;
    if !matches!(role, Role::Single { ep: 1 }) && args.backend == Backend::Cuda {
        bail!(
            "expert parallelism over GPUs (NCCL) is not in this build; use --backend cpu or --expert-parallel 1"
        );
    }
    match role {
        Role::Single { ep: 1 } => Ok(Replica::Executor(single_executor(
            args,
            geometry,
            auto_blocks,
        )?)),
        Role::Single { ep } => {
            tracing::info!(
                ranks = ep,
                "expert parallelism over threads of this process"
            );
            let models = (0..ep)
                .map(|r| {
                    Ok(Arc::new(load_shard(
                        args,
                        ExpertShard::new(r, ep, n_experts)?,
                    )?))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Replica::Executor(Box::new(
                ExpertParallelExecutor::in_process(models, geometry)?,
            )))
        }
        Role::Group(env) => {
            let shard = ExpertShard::new(env.rank, env.world_size, n_experts)?;
            let model = load_shard(args, shard)?;
            let tcp = TcpOptions::new(Duration::from_secs(args.group_timeout_s));
            let mut transport = TcpTransport::connect(&env, tcp)?;
            if env.rank == 0 {
                return Ok(Replica::Executor(Box::new(ExpertParallelExecutor::new(
                    Arc::new(model),
                    geometry,
                    Box::new(transport),
                ))));
            }
            if let Some(flag) = joined {
                flag.store(true, Ordering::Release);
            }
            tracing::info!(
                rank = env.rank,
                "serving as a worker rank until rank 0 ends the group"
            );
            run_worker(&model, geometry, &mut transport)
                .context("the expert-parallel group failed")?;
            Ok(Replica::Worker)
        }
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args)?,
        Command::RenderChat {
            request,
            thinking_mode,
        } => {
            let text = std::fs::read_to_string(&request)
                .with_context(|| format!("reading {}", request.display()))?;
            // From the text, not a serde_json::Value, so tool schemas keep their key order.
            let body = chat::Json::parse(&text)
                .with_context(|| format!("{} is not valid JSON", request.display()))?;
            let mut req = chat::ChatRequest::from_json(&body)?;
            if let Some(m) = thinking_mode {
                req.mode = m.into();
            }
            print!("{}", req.render()?);
        }
        Command::ParseCompletion { thinking_mode } => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading stdin")?;
            let mode = match thinking_mode {
                ModeArg::Thinking => ThinkingMode::Thinking,
                ModeArg::Chat => ThinkingMode::Chat,
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&chat::parse_completion(&text, mode))?
            );
        }
        Command::Score {
            model,
            prompt_ids,
            last_only,
        } => {
            let config = model_config(&model)?;
            let geometry = generate::score_geometry(config.max_position_embeddings, &prompt_ids)?;
            if let Replica::Executor(mut ex) = build_replica(&model, geometry, false, None)? {
                tracing::info!(tokens = prompt_ids.len(), "scoring prompt");
                let logits = generate::score_with(
                    &mut |b| ex.forward(b),
                    geometry,
                    &prompt_ids,
                    last_only,
                    config.vocab_size,
                )?;
                println!("{}", json!({ "logits": logits }));
            }
        }
        Command::Generate {
            model,
            prompt_ids,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop_ids,
            ignore_eos,
        } => {
            let config = model_config(&model)?;
            let mut stop_token_ids = stop_ids;
            if !ignore_eos {
                stop_token_ids.extend(&config.eos_token_ids);
            }
            let req = GenerateRequest {
                prompt: prompt_ids,
                max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_p,
                    top_k,
                    seed,
                },
                stop_token_ids,
            };
            let reqs = std::slice::from_ref(&req);
            let geometry = generate::plan_geometry(config.max_position_embeddings, reqs)?;
            if let Replica::Executor(mut ex) = build_replica(&model, geometry, false, None)? {
                tracing::info!(prompt_tokens = req.prompt.len(), max_tokens, "generating");
                let started = Instant::now();
                let out =
                    generate::generate_with(&mut |b| ex.forward(b), geometry, reqs)?.remove(0);
                tracing::info!(
                    generated = out.token_ids.len(),
                    finish_reason = ?out.finish_reason,
                    secs = format!("{:.3}", started.elapsed().as_secs_f64()),
                    "done"
                );
                println!("{}", json!({ "token_ids": out.token_ids }));
            }
        }
        Command::Download { source, dest } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(deepseek_engine::download::download(&source, &dest))?;
        }
        Command::Bench {
            model,
            gpu,
            prompt_len,
            decode_steps,
            contexts,
        } => {
            if use_cuda(&model)? {
                let prefill = gpu
                    .prefill
                    .iter()
                    .map(|s| {
                        let (a, b) = s.split_once('x').with_context(|| {
                            format!("--prefill {s:?}: expected SEQUENCESxTOKENS")
                        })?;
                        Ok((a.parse()?, b.parse()?))
                    })
                    .collect::<Result<Vec<(usize, usize)>>>()?;
                let (weights, cache) = gpu_dtypes(&model, true)?;
                let opts = cuda::bench::BenchOptions {
                    device: model.device,
                    weights,
                    cache,
                    dense_layers: gpu.dense_layers,
                    moe_layers: gpu.moe_layers,
                    gemm: match gpu.gemm {
                        GemmArg::Cublas => Gemm::Cublas,
                        GemmArg::Tiled => Gemm::Tiled,
                    },
                    prefill,
                    decode_batches: gpu.decode_batches,
                    contexts,
                    decode_steps,
                    ..cuda::bench::BenchOptions::default()
                };
                let report = cuda::bench::run(&opts)?;
                if let Some(path) = &gpu.out {
                    std::fs::write(path, serde_json::to_string_pretty(&report)?)
                        .with_context(|| format!("writing {}", path.display()))?;
                }
                println!("{report}");
                return Ok(());
            }
            let m = load_shard(&model, ExpertShard::WHOLE)?;
            bench(&m, prompt_len, decode_steps, &contexts)?;
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<()> {
    gpu_dtypes(&args.model, false)?;
    let config = model_config(&args.model)?;
    let group = role(&args.model)?;
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        if is_builtin(&args.model.model) {
            "deepseek-v3.2-builtin".to_string()
        } else {
            PathBuf::from(&args.model.model)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| args.model.model.clone())
        }
    });
    let tokenizer = match (&args.tokenizer, is_builtin(&args.model.model)) {
        (Some(path), _) => Tokenizer::from_file(path)?,
        (None, true) => Tokenizer::builtin()?,
        (None, false) => {
            Tokenizer::from_file(PathBuf::from(&args.model.model).join("tokenizer.json"))
                .context("the model directory has no usable tokenizer.json; pass --tokenizer")?
        }
    };
    let max_model_len = args
        .max_model_len
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let num_blocks = args.num_kv_blocks.unwrap_or_else(|| {
        let per_block = CpuKvCache::bytes_per_slot(&config) * args.block_size;
        ((args.kv_cache_memory_gb * 1e9) as usize / per_block.max(1)).max(1)
    });
    let geometry = KvGeometry {
        num_blocks,
        block_size: args.block_size,
    };
    tracing::info!(
        num_blocks,
        block_size = args.block_size,
        tokens = geometry.num_slots(),
        bytes = CpuKvCache::bytes_per_slot(&config) * geometry.num_slots(),
        max_model_len,
        "KV cache plan (the CUDA backend takes the free device memory instead unless --num-kv-blocks is set)"
    );

    let metrics = Metrics::new(&model_name);
    metrics.model_load_progress.set(0.0);
    let mut state = ServerState::new(
        Arc::new(tokenizer),
        metrics.clone(),
        model_name,
        max_model_len,
        config.eos_token_ids.clone(),
    );
    let worker = matches!(&group, Role::Group(env) if env.rank != 0);
    let joined = Arc::new(AtomicBool::new(false));
    if worker {
        state.worker_ready = Some(joined.clone());
    }
    let state = Arc::new(state);
    let addr = format!("{}:{}", args.host, args.port);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr).await.with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "HTTP listening (ready once the model is loaded)");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let http_state = state.clone();
        let http = tokio::spawn(async move {
            let mut stop_rx = stop_rx;
            axum::serve(listener, server::router(http_state))
                .with_graceful_shutdown(async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted; shutting down"),
                        _ = stop_rx.wait_for(|s| *s) => {}
                    }
                })
                .await
        });

        // Load (and, on worker ranks, serve the group) off the async runtime.
        let sched_cfg = SchedulerConfig {
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            max_model_len,
            max_waiting: args.max_waiting,
        };
        let prefix_caching = !args.no_prefix_caching;
        let auto_blocks = args.num_kv_blocks.is_none();
        let model_args = args.model.clone();
        let load_metrics = metrics.clone();
        let load_state = state.clone();
        let index_topk = config.index_topk;
        let outcome = tokio::task::spawn_blocking(move || -> Result<bool> {
            match build_replica(&model_args, geometry, auto_blocks, Some(joined))? {
                Replica::Worker => Ok(false),
                Replica::Executor(ex) => {
                    load_metrics.model_load_progress.set(1.0);
                    let geometry = ex.kv_geometry();
                    load_metrics.set_cache_config(geometry.block_size, geometry.num_blocks);
                    let sched = Scheduler::new(sched_cfg, PrefixCachingPool::new(geometry, prefix_caching));
                    tracing::info!(device = %ex.device_name(), model = %load_state.model_name, "serving the OpenAI-compatible API");
                    load_state.attach_engine(runtime::spawn(ex, sched, load_metrics, index_topk));
                    Ok(true)
                }
            }
        })
        .await
        .context("the loader thread failed")?;
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                // A worker rank whose leader ended the group: exit cleanly.
                let _ = stop_tx.send(true);
            }
            Err(e) => {
                let _ = stop_tx.send(true);
                return Err(e);
            }
        }
        http.await.context("the HTTP server task failed")??;
        Ok::<_, anyhow::Error>(())
    })
}

/// Prefill throughput at `prompt_len`, then decode time per token after contexts of each length.
fn bench(model: &Model, prompt_len: usize, decode_steps: usize, contexts: &[usize]) -> Result<()> {
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
        + decode_steps;
    if longest > c.max_position_embeddings {
        bail!(
            "the longest benchmark context ({longest}) exceeds max_position_embeddings ({})",
            c.max_position_embeddings
        );
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
    println!(
        "{}",
        json!({
            "threads": rayon::current_num_threads(),
            "prefill": {
                "tokens": prompt_len,
                "seconds": prefill_s,
                "tokens_per_s": prompt_len as f64 / prefill_s,
                "gflop_per_s": (0..prompt_len).map(|p| c.flops_per_token(p)).sum::<f64>() / prefill_s / 1e9,
            },
            "decode": decode,
        })
    );
    Ok(())
}
