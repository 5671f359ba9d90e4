//! Model loading and executor construction: the whole model on one device, its expert shards
//! on threads of this process, or this process's rank of a multi-process group.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::device::{BackendChoice, Compute, choose_here, gpu_dtypes};
use super::group::{self, Role};
use super::{Error, ModelOptions, Result};
use crate::backend::cuda::{CudaExecutor, CudaOptions, DType, Gemm};
use crate::backend::ep::{ExpertParallelExecutor, run_worker};
use crate::backend::{CpuExecutor, Executor};
use crate::dist::{ExpertShard, TcpOptions, TcpTransport};
use crate::kv::KvGeometry;
use crate::model::builtin::{RandomWeights, builtin_config, is_builtin};
use crate::model::{LoadOptions, Model, ModelConfig};

/// What this process is in its replica and where it computes, decided before any weight is
/// read so that bad flags fail at once.
#[derive(Debug, Clone)]
pub struct Setup {
    pub role: Role,
    pub backend: BackendChoice,
}

impl Setup {
    /// Resolves the role and the backend (logging the choice) and checks the storage flags.
    pub fn new(opts: &ModelOptions) -> Result<Self> {
        let role = group::from_env(opts.expert_parallel)?;
        let backend = choose_here(opts.backend, role.ranks())?;
        gpu_dtypes(opts, false)?;
        Ok(Setup { role, backend })
    }

    /// The setup of a one-device run (benchmarks): the whole model, here.
    pub fn whole(opts: &ModelOptions) -> Result<Self> {
        let backend = choose_here(opts.backend, 1)?;
        gpu_dtypes(opts, false)?;
        Ok(Setup {
            role: Role::Single { ep: 1 },
            backend,
        })
    }

    pub fn on_gpu(&self) -> bool {
        self.backend.compute == Compute::Cuda
    }
}

/// The model's config.json (or the built-in model's), read before any weight.
pub fn model_config(opts: &ModelOptions) -> Result<ModelConfig> {
    if is_builtin(&opts.model) {
        return Ok(builtin_config());
    }
    let path = PathBuf::from(&opts.model).join("config.json");
    ModelConfig::from_file(&path).map_err(|error| Error::ModelConfig { path, error })
}

/// Loads the routed experts of `shard` and everything replicated.
pub fn load_shard(opts: &ModelOptions, shard: ExpertShard) -> Result<Model> {
    load_shard_with(opts, shard, LoadOptions::default())
}

fn load_shard_with(opts: &ModelOptions, shard: ExpertShard, options: LoadOptions) -> Result<Model> {
    let started = Instant::now();
    let model = if is_builtin(&opts.model) {
        tracing::info!("building the built-in demo model (random weights)");
        Model::from_source_sharded(builtin_config(), &RandomWeights { seed: 0x5eed }, shard)?
    } else {
        let dir = PathBuf::from(&opts.model);
        tracing::info!(model = %dir.display(), "loading model");
        Model::load_with(&dir, shard, options).map_err(|error| Error::Load {
            path: dir.clone(),
            error,
        })?
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

/// The single-device executor: the model on GPU `device` or on the CPU. With `auto_blocks`
/// the GPU's KV cache takes every block that fits after weights and workspace.
fn single_executor(
    opts: &ModelOptions,
    cuda: bool,
    geometry: KvGeometry,
    auto_blocks: bool,
) -> Result<Box<dyn Executor>> {
    // Flags are checked before hundreds of gigabytes are read.
    let (weights, cache) = gpu_dtypes(opts, model_config(opts)?.quantization.is_some())?;
    // A GPU that keeps FP8 weights needs no f32 copy of them on the host.
    let options = LoadOptions {
        fp8_codes_only: cuda && weights == DType::Fp8,
    };
    let model = Arc::new(load_shard_with(opts, ExpertShard::WHOLE, options)?);
    if !cuda {
        if opts.weight_dtype != "auto" || opts.kv_cache_dtype != "auto" {
            tracing::warn!(
                weight_dtype = %opts.weight_dtype,
                kv_cache_dtype = %opts.kv_cache_dtype,
                "--weight-dtype and --kv-cache-dtype apply to GPUs; the CPU backend computes and caches in f32"
            );
        }
        return Ok(Box::new(CpuExecutor::new(model, geometry)));
    }
    // Tensor cores for serving (cuBLAS bf16, or the FP8 block-scaled kernel); the tiled
    // kernels are the exact-check path.
    let cuda_opts = CudaOptions {
        weights,
        cache,
        gemm: Gemm::Cublas,
        ..CudaOptions::default()
    };
    tracing::info!(weights = ?weights, kv_cache = ?cache, "GPU storage");
    let geometry = if auto_blocks {
        let plan = CudaExecutor::plan_for(&model, opts.device, geometry.block_size, cuda_opts)?;
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
        opts.device,
        cuda_opts,
    )?))
}

/// What this process computes with: the whole replica, or the leader side of a group.
pub enum Replica {
    Executor(Box<dyn Executor>),
    /// A worker rank: it ran its group to the end.
    Worker,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Replica::Executor(ex) => f.debug_tuple("Executor").field(&ex.device_name()).finish(),
            Replica::Worker => f.write_str("Worker"),
        }
    }
}

/// Builds the replica for `geometry`; on worker ranks, runs the worker loop until rank 0 ends
/// the group. `joined` is set once a worker rank has joined its group.
pub fn build_replica(
    opts: &ModelOptions,
    setup: &Setup,
    geometry: KvGeometry,
    auto_blocks: bool,
    joined: Option<Arc<AtomicBool>>,
) -> Result<Replica> {
    let n_experts = model_config(opts)?.n_routed_experts;
    match setup.role.clone() {
        Role::Single { ep: 1 } => Ok(Replica::Executor(single_executor(
            opts,
            setup.on_gpu(),
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
                        opts,
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
            let model = load_shard(opts, shard)?;
            let tcp = TcpOptions {
                join_timeout: opts.group_join_timeout,
                peer_timeout: opts.group_timeout,
            };
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
            run_worker(&model, geometry, &mut transport).map_err(Error::Group)?;
            Ok(Replica::Worker)
        }
    }
}
