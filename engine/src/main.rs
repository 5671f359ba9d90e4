//! `deepseek-engine`: run, score and benchmark DeepSeek-V3.2-architecture models.
//!
//! Results go to stdout as JSON; progress and diagnostics go to stderr through tracing.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use deepseek_engine::backend::cpu::CpuKvCache;
use deepseek_engine::generate::{self, GenerateRequest, Rng, SamplingParams};
use deepseek_engine::kv::{BlockAllocator, BlockTable, DEFAULT_BLOCK_SIZE, KvGeometry};
use deepseek_engine::model::builtin::{BUILTIN_MODEL, builtin_model};
use deepseek_engine::model::{LogitsWanted, Model, SeqChunk};
use serde_json::json;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "deepseek-engine",
    version,
    about = "Inference engine for DeepSeek-V3.2 (MLA + sparse attention + MoE)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    /// Measure prefill and decode speed, and decode time per token as the context grows.
    Bench {
        #[command(flatten)]
        model: ModelArgs,
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
struct ModelArgs {
    /// Model directory (config.json + safetensors), or `builtin` for the built-in demo model.
    #[arg(long, default_value = BUILTIN_MODEL)]
    model: String,
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    backend: Backend,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Backend {
    Cpu,
    Cuda,
    Auto,
}

fn load(args: &ModelArgs) -> Result<Model> {
    match args.backend {
        Backend::Cuda => bail!("this build has no CUDA backend yet; use --backend cpu"),
        Backend::Auto => tracing::info!("backend auto: using the CPU reference backend"),
        Backend::Cpu => {}
    }
    let started = Instant::now();
    let model = if args.model == BUILTIN_MODEL {
        tracing::info!("building the built-in demo model");
        builtin_model()?
    } else {
        let dir = PathBuf::from(&args.model);
        tracing::info!(model = %dir.display(), "loading model");
        Model::load(&dir).with_context(|| format!("loading {}", dir.display()))?
    };
    let c = &model.config;
    tracing::info!(
        layers = c.num_hidden_layers,
        hidden = c.hidden_size,
        experts = c.n_routed_experts,
        index_topk = c.index_topk,
        vocab = c.vocab_size,
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "model ready"
    );
    Ok(model)
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
        Command::Score {
            model,
            prompt_ids,
            last_only,
        } => {
            let model = load(&model)?;
            tracing::info!(tokens = prompt_ids.len(), "scoring prompt");
            let logits = generate::score(&model, &prompt_ids, last_only)?;
            println!("{}", json!({ "logits": logits }));
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
            let model = load(&model)?;
            let mut stop_token_ids = stop_ids;
            if !ignore_eos {
                stop_token_ids.extend(&model.config.eos_token_ids);
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
            tracing::info!(prompt_tokens = req.prompt.len(), max_tokens, "generating");
            let started = Instant::now();
            let out = generate::generate_batch(&model, std::slice::from_ref(&req))?.remove(0);
            tracing::info!(
                generated = out.token_ids.len(),
                finish_reason = ?out.finish_reason,
                secs = format!("{:.3}", started.elapsed().as_secs_f64()),
                "done"
            );
            println!("{}", json!({ "token_ids": out.token_ids }));
        }
        Command::Bench {
            model,
            prompt_len,
            decode_steps,
            contexts,
        } => {
            let model = load(&model)?;
            bench(&model, prompt_len, decode_steps, &contexts)?;
        }
    }
    Ok(())
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
