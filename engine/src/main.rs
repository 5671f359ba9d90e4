//! `deepseek-engine`: serve, run, score and benchmark DeepSeek-V3.2-architecture models.
//!
//! Results go to stdout as JSON; progress and diagnostics go to stderr through tracing.
//! With `--expert-parallel N` a model replica spans N ranks: threads of this process, or, when
//! `RANK`/`WORLD_SIZE`/`LEADER_ADDR` are set (as the operator sets them), one rank per process.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use deepseek_engine::backend::cuda::Gemm;
use deepseek_engine::chat::{self, ThinkingMode};
use deepseek_engine::dist::RowExchange;
use deepseek_engine::generate::{GenerateRequest, SamplingParams};
use deepseek_engine::kv::DEFAULT_BLOCK_SIZE;
use deepseek_engine::launch::logging::{self, LogFormat};
use deepseek_engine::launch::offline::{self, BenchOptions, PlanOptions};
use deepseek_engine::launch::serve::{self, ServeOptions};
use deepseek_engine::launch::{BackendFlag, ModelOptions};
use deepseek_engine::model::catalog::{self, DEFAULT_MODEL};
use deepseek_engine::server::ServeLimits;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "deepseek-engine",
    version,
    about = "Inference engine for DeepSeek-V3.2 (MLA + DeepSeek Sparse Attention + MoE)"
)]
struct Cli {
    /// Log lines as text (plain when stderr is not a terminal) or as one JSON object each.
    #[arg(long, global = true, value_enum, env = "LOG_FORMAT", default_value_t = LogFormatArg::Text)]
    log_format: LogFormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LogFormatArg {
    Text,
    Json,
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
    /// Fetch a model (hf://ORG/NAME[@REVISION] or s3://BUCKET[/PREFIX]) into a directory,
    /// resuming by file.
    Download {
        #[arg(long)]
        source: String,
        #[arg(long)]
        dest: PathBuf,
    },
    /// Print the per-GPU placement of one replica spread over GPUs by expert parallelism, from
    /// config.json alone (no weights are read): replicated weights, each GPU's experts, the
    /// workspace and the KV-cache tokens left. Exits non-zero when the model does not fit.
    Plan(PlanArgs),
    /// Measure prefill and decode speed, and decode time per token as the context grows.
    /// On the CPU: the given model (one prompt of --prompt-len, batch 1). With `--backend cuda`
    /// on one GPU: a DeepSeek-V3.2-shaped model at full width with fewer layers and random
    /// weights generated on the GPU; with --checkpoint or over an expert-parallel group: the
    /// given model through the serving executor, at the GPU shapes.
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

#[derive(Args)]
struct PlanArgs {
    /// The model's config.json, or a checkpoint directory holding one.
    #[arg(long)]
    config: PathBuf,
    /// GPUs of one replica (its expert-parallel ranks).
    #[arg(long)]
    gpus: usize,
    /// Memory of each GPU, GiB (e.g. 140 for an H200, 80 for an H100).
    #[arg(long)]
    gpu_memory_gib: f64,
    /// Weight storage: fp8 (E4M3 with 128x128 block scales) or bf16.
    #[arg(long, default_value = "fp8")]
    weight_dtype: String,
    /// KV-cache storage: fp8 (656-byte latent rows, 132-byte indexer keys) or bf16.
    #[arg(long, default_value = "fp8")]
    kv_cache_dtype: String,
    /// Longest sequence to serve (default: the config's max_position_embeddings).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Sequences the replica runs at once.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens one step of one rank carries (sizes the workspace).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Shapes of the GPU benchmark (the CPU times --prompt-len at batch 1), and where else the
/// report goes.
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
    /// Leave out the single-GEMM timings and the FP8 crossover sweep (for a profiler run of the
    /// model's own steps).
    #[arg(long)]
    no_gemm_timings: bool,
    /// Leave out the timings of the sparse-attention kernels alone (indexer, top-k, sparse
    /// MLA on both caches).
    #[arg(long)]
    no_dsa_timings: bool,
    /// Time the --model checkpoint through the serving executor instead of the synthetic
    /// full-width model (always so over an expert-parallel group, which times the checkpoint
    /// end to end: the same command with --expert-parallel 1 and 2 compares EP2 with EP1).
    #[arg(long)]
    checkpoint: bool,
    /// Also write the JSON report here (CPU or GPU).
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
    /// KV-cache blocks (of --block-size tokens) per rank; an expert-parallel group holds its
    /// ranks' together. Default: sized from --kv-cache-memory-gb.
    #[arg(long)]
    num_kv_blocks: Option<usize>,
    /// Memory for the KV cache when --num-kv-blocks is not given.
    #[arg(long, default_value_t = 1.0)]
    kv_cache_memory_gb: f64,
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: usize,
    #[arg(long)]
    no_prefix_caching: bool,
    /// On SIGTERM or SIGINT, seconds in-flight requests may run before they are failed (with
    /// an error event and [DONE]); no new connections are taken meanwhile.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Seconds a client may take to send a request's headers (also how long an idle
    /// keep-alive connection stays open).
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    http_header_read_timeout_seconds: u64,
    /// Seconds a client may take to send a request's body once its headers are in (then 408).
    #[arg(long, env = "HTTP_BODY_READ_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    http_body_read_timeout_seconds: u64,
    /// Most HTTP connections open at once; beyond it a connection gets a 503 and is closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: u64,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory (config.json + safetensors), the name of a bundled model (default: the
    /// trained deepseek-v3.2-mini), or `builtin` for random weights (tests).
    #[arg(long, default_value = DEFAULT_MODEL, value_parser = catalog::resolve)]
    model: String,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
    /// Expert-parallel ranks of one model replica (threads here, or processes when RANK,
    /// WORLD_SIZE and LEADER_ADDR are set). Default: WORLD_SIZE x LOCAL_WORLD_SIZE when those
    /// are set, else 1.
    #[arg(long)]
    expert_parallel: Option<usize>,
    /// Seconds to wait for every rank of a multi-process group to join.
    #[arg(long, env = "GROUP_JOIN_TIMEOUT_SECONDS", default_value_t = 600)]
    group_join_timeout_seconds: u64,
    /// Seconds a rank of a multi-process group may be silent (ranks heartbeat several times
    /// within it) before it is declared lost: in-flight requests fail, rank 0 turns not-ready
    /// and /health fails; a worker rank exits.
    #[arg(long, env = "GROUP_TIMEOUT_SECONDS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    group_timeout_seconds: u64,
    /// How expert-parallel GPU ranks move the MoE rows: nccl (device to device; every rank
    /// needs its own GPU), host (through host memory over the group's links), or auto (nccl
    /// when every rank of the group can use it, else host, with the reason logged).
    #[arg(long, env = "MOE_EXCHANGE", default_value = "auto", value_parser = parse_moe_exchange)]
    moe_exchange: RowExchange,
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

fn parse_moe_exchange(s: &str) -> Result<RowExchange, String> {
    s.parse()
        .map_err(|e: deepseek_engine::dist::DistError| e.to_string())
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    Cpu,
    Cuda,
    Auto,
}

impl From<Backend> for BackendFlag {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Cpu => BackendFlag::Cpu,
            Backend::Cuda => BackendFlag::Cuda,
            Backend::Auto => BackendFlag::Auto,
        }
    }
}

impl From<ModelArgs> for ModelOptions {
    fn from(a: ModelArgs) -> Self {
        ModelOptions {
            model: a.model,
            backend: a.backend.into(),
            expert_parallel: a.expert_parallel,
            group_join_timeout: Duration::from_secs(a.group_join_timeout_seconds),
            group_timeout: Duration::from_secs(a.group_timeout_seconds),
            moe_exchange: a.moe_exchange,
            device: a.device,
            weight_dtype: a.weight_dtype,
            kv_cache_dtype: a.kv_cache_dtype,
            ..ModelOptions::default()
        }
    }
}

impl From<ServeArgs> for ServeOptions {
    fn from(a: ServeArgs) -> Self {
        ServeOptions {
            model: a.model.into(),
            host: a.host,
            port: a.port,
            tokenizer: a.tokenizer,
            served_model_name: a.served_model_name,
            max_model_len: a.max_model_len,
            max_num_seqs: a.max_num_seqs,
            max_num_batched_tokens: a.max_num_batched_tokens,
            max_waiting: a.max_waiting,
            num_kv_blocks: a.num_kv_blocks,
            kv_cache_memory_gb: a.kv_cache_memory_gb,
            block_size: a.block_size,
            prefix_caching: !a.no_prefix_caching,
            shutdown_grace: Duration::from_secs(a.shutdown_grace_seconds),
            http_limits: ServeLimits {
                header_read_timeout: Duration::from_secs(a.http_header_read_timeout_seconds),
                body_read_timeout: Duration::from_secs(a.http_body_read_timeout_seconds),
                max_connections: usize::try_from(a.max_connections).unwrap_or(usize::MAX),
                ..ServeLimits::default()
            },
        }
    }
}

/// `--prefill` shapes as (sequences, tokens each).
fn prefill_shapes(shapes: &[String]) -> Result<Vec<(usize, usize)>> {
    shapes
        .iter()
        .map(|s| {
            let (a, b) = s
                .split_once('x')
                .with_context(|| format!("--prefill {s:?}: expected SEQUENCESxTOKENS"))?;
            Ok((a.parse()?, b.parse()?))
        })
        .collect()
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    logging::init(match cli.log_format {
        LogFormatArg::Text => LogFormat::Text,
        LogFormatArg::Json => LogFormat::Json,
    });
    match cli.command {
        Command::Serve(args) => serve::serve((*args).into())?,
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
            println!(
                "{}",
                serde_json::to_string_pretty(&chat::parse_completion(&text, thinking_mode.into()))?
            );
        }
        Command::Score {
            model,
            prompt_ids,
            last_only,
        } => {
            if let Some(logits) = offline::score(&model.into(), &prompt_ids, last_only)? {
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
            let req = GenerateRequest {
                prompt: prompt_ids,
                max_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_p,
                    top_k,
                    seed,
                },
                stop_token_ids: stop_ids,
            };
            if let Some(out) = offline::generate(&model.into(), req, ignore_eos)? {
                println!("{}", json!({ "token_ids": out.token_ids }));
            }
        }
        Command::Download { source, dest } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(deepseek_engine::download::download(&source, &dest))?;
        }
        Command::Plan(a) => {
            let p = offline::plan(&PlanOptions {
                config: a.config,
                gpus: a.gpus,
                gpu_memory_gib: a.gpu_memory_gib,
                weight_dtype: a.weight_dtype,
                kv_cache_dtype: a.kv_cache_dtype,
                max_model_len: a.max_model_len,
                max_num_seqs: a.max_num_seqs,
                max_num_batched_tokens: a.max_num_batched_tokens,
            })?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", p.table());
            }
            if let Some(why) = &p.reason {
                anyhow::bail!("{why}");
            }
        }
        Command::Bench {
            model,
            gpu,
            prompt_len,
            decode_steps,
            contexts,
        } => {
            let opts = BenchOptions {
                prompt_len,
                decode_steps,
                contexts,
                dense_layers: gpu.dense_layers,
                moe_layers: gpu.moe_layers,
                prefill: prefill_shapes(&gpu.prefill)?,
                decode_batches: gpu.decode_batches,
                gemm: match gpu.gemm {
                    GemmArg::Cublas => Gemm::Cublas,
                    GemmArg::Tiled => Gemm::Tiled,
                },
                gemm_timings: !gpu.no_gemm_timings,
                dsa_timings: !gpu.no_dsa_timings,
                checkpoint: gpu.checkpoint,
            };
            let Some(report) = offline::bench(&model.into(), &opts)? else {
                return Ok(());
            };
            if let Some(path) = &gpu.out {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{report}");
        }
    }
    Ok(())
}
