//! Model loading and executor construction: the whole model on one device, its expert shards
//! on threads of this process, or this process's rank of a multi-process group.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::device::{BackendChoice, Compute, choose_here, gpu_dtypes};
use super::group::{self, Role};
use super::{Error, ModelOptions, Result};
use crate::backend::cuda::load::rank_reads;
use crate::backend::cuda::{CudaExecutor, CudaOptions, Gemm};
use crate::backend::ep::{ExpertParallelExecutor, RankCompute, run_worker_with};
use crate::backend::{CpuExecutor, Executor};
use crate::dist::{
    ExpertShard, NcclTransport, Reader, RowExchange, TcpOptions, TcpTransport, Transport, Writer,
};
use crate::kv::KvGeometry;
use crate::model::builtin::{RandomWeights, builtin_config, is_builtin};
use crate::model::weights::Checkpoint;
use crate::model::{Model, ModelConfig};

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
    let started = Instant::now();
    let model = if is_builtin(&opts.model) {
        tracing::info!("building the built-in demo model (random weights)");
        Model::from_source_sharded(builtin_config(), &RandomWeights { seed: 0x5eed }, shard)?
    } else {
        let dir = PathBuf::from(&opts.model);
        tracing::info!(model = %dir.display(), "loading model");
        Model::load_sharded(&dir, shard).map_err(|error| Error::Load {
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
    if cuda {
        return Ok(Box::new(cuda_executor(
            opts,
            ExpertShard::WHOLE,
            opts.device,
            geometry,
            auto_blocks,
        )?));
    }
    let model = Arc::new(load_shard(opts, ExpertShard::WHOLE)?);
    warn_gpu_flags_on_cpu(opts);
    Ok(Box::new(CpuExecutor::new(model, geometry)))
}

fn warn_gpu_flags_on_cpu(opts: &ModelOptions) {
    if opts.weight_dtype != "auto" || opts.kv_cache_dtype != "auto" {
        tracing::warn!(
            weight_dtype = %opts.weight_dtype,
            kv_cache_dtype = %opts.kv_cache_dtype,
            "--weight-dtype and --kv-cache-dtype apply to GPUs; the CPU backend computes and caches in f32"
        );
    }
}

/// The routed experts of `shard` and everything replicated, on GPU `ordinal`. A checkpoint
/// streams from its files to the device part by part (host memory stays bounded whatever
/// its size); the built-in model is generated on the host. With `auto_blocks` the KV cache
/// takes every block that fits after weights and workspace.
fn cuda_executor(
    opts: &ModelOptions,
    shard: ExpertShard,
    ordinal: usize,
    geometry: KvGeometry,
    auto_blocks: bool,
) -> Result<CudaExecutor> {
    let config = model_config(opts)?;
    // Flags are checked before hundreds of gigabytes are read.
    let (weights, cache) = gpu_dtypes(opts, config.quantization.is_some())?;
    // Tensor cores for serving (cuBLAS bf16, or the FP8 block-scaled kernel); the tiled
    // kernels are the exact-check path.
    let cuda_opts = CudaOptions {
        weights,
        cache,
        gemm: Gemm::Cublas,
        ..CudaOptions::default()
    };
    tracing::info!(weights = ?weights, kv_cache = ?cache, device = ordinal, rank = shard.rank, "GPU storage");
    if !is_builtin(&opts.model) {
        let dir = PathBuf::from(&opts.model);
        let load_err = |error| Error::Load {
            path: dir.clone(),
            error,
        };
        let block = config
            .quantization
            .as_ref()
            .map(|q| q.block)
            .unwrap_or([128, 128]);
        let mut ckpt = Checkpoint::open(&dir, block)
            .map_err(load_err)?
            .with_progress(opts.load_progress.clone());
        ckpt.expect_bytes(|name| rank_reads(&config, shard, name));
        tracing::info!(
            model = %dir.display(),
            rank = shard.rank,
            world = shard.world,
            bytes = ckpt.progress().1,
            "streaming this rank's weights to the GPU"
        );
        let ex = CudaExecutor::load(
            &ckpt,
            &config,
            shard,
            geometry,
            auto_blocks,
            ordinal,
            cuda_opts,
        )
        .map_err(|e| match e {
            crate::backend::cuda::CudaError::Model(error) => load_err(error),
            other => Error::Cuda(other),
        })?;
        let missed: Vec<String> = ckpt
            .unconsumed()
            .into_iter()
            .filter(|n| rank_reads(&config, shard, n))
            .collect();
        if let Some(first) = missed.first() {
            tracing::warn!(count = missed.len(), first = %first, "checkpoint holds tensors the model does not use");
        }
        return Ok(ex);
    }
    let model = load_shard(opts, shard)?;
    let geometry = if auto_blocks {
        let plan = CudaExecutor::plan_for(&model, ordinal, geometry.block_size, cuda_opts)?;
        KvGeometry {
            num_blocks: plan.num_blocks,
            block_size: geometry.block_size,
        }
    } else {
        geometry
    };
    Ok(CudaExecutor::with_options(
        &model, geometry, ordinal, cuda_opts,
    )?)
}

/// The KV blocks every rank of a GPU group can hold: each rank planned its own cache, and the
/// leader's scheduler hands out block ids that any rank may be asked to store.
fn agree_on_blocks(transport: &mut dyn Transport, own: usize) -> Result<usize> {
    let world = transport.world_size();
    let mut w = Writer::default();
    w.u64(own as u64);
    let bytes = w.finish();
    let got = transport.all_to_all(vec![bytes; world])?;
    let mut least = own;
    for (rank, b) in got.iter().enumerate() {
        let n = Reader::new(b, rank).u64()?;
        least = least.min(usize::try_from(n).unwrap_or(usize::MAX));
    }
    Ok(least)
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
        Role::Single { ep } if setup.on_gpu() => {
            let gpus = crate::backend::cuda::device_count()?;
            let last = opts.device.checked_add(ep).filter(|end| *end <= gpus);
            if last.is_none() {
                return Err(Error::Options(format!(
                    "--expert-parallel {ep} from device {} needs GPUs {}..{} in this process, and {gpus} are visible",
                    opts.device,
                    opts.device,
                    opts.device.saturating_add(ep)
                )));
            }
            tracing::info!(
                ranks = ep,
                first_device = opts.device,
                "expert parallelism over the GPUs of this process, one rank each"
            );
            let mut ranks = (0..ep)
                .map(|r| {
                    cuda_executor(
                        opts,
                        ExpertShard::new(r, ep, n_experts)?,
                        opts.device + r,
                        geometry,
                        auto_blocks,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let blocks = ranks
                .iter()
                .map(|r| Executor::kv_geometry(r).num_blocks)
                .min()
                .unwrap_or(0);
            for r in &mut ranks {
                r.limit_blocks(blocks);
            }
            let ranks: Vec<Box<dyn RankCompute>> = ranks
                .into_iter()
                .map(|r| Box::new(r) as Box<dyn RankCompute>)
                .collect();
            // NCCL moves the MoE rows between the GPUs directly; without it, host channels.
            let ordinals: Vec<usize> = (opts.device..opts.device + ep).collect();
            let nccl = match opts.moe_exchange {
                RowExchange::Host => {
                    Err(crate::dist::DistError::Config("--moe-exchange host".into()))
                }
                _ => NcclTransport::in_process(&ordinals),
            };
            let group = match nccl {
                Err(e) if opts.moe_exchange == RowExchange::Nccl => {
                    return Err(Error::Options(format!(
                        "--moe-exchange nccl, but NCCL cannot join GPUs {ordinals:?}: {e}"
                    )));
                }
                Ok(endpoints) => {
                    tracing::info!(ranks = ep, "the ranks exchange MoE rows over NCCL");
                    let endpoints = endpoints
                        .into_iter()
                        .map(|t| Box::new(t) as Box<dyn Transport>)
                        .collect();
                    ExpertParallelExecutor::in_process_over(ranks, endpoints)?
                }
                Err(e) => {
                    if opts.moe_exchange == RowExchange::Auto {
                        tracing::warn!(error = %e, "NCCL is not usable; the ranks exchange MoE rows through host memory");
                    }
                    ExpertParallelExecutor::in_process_ranks(ranks)?
                }
            };
            Ok(Replica::Executor(Box::new(group)))
        }
        Role::Single { ep } => {
            tracing::info!(
                ranks = ep,
                "expert parallelism over threads of this process"
            );
            warn_gpu_flags_on_cpu(opts);
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
        Role::Group { env, local } => group_process(
            opts,
            setup,
            env,
            local,
            n_experts,
            geometry,
            auto_blocks,
            joined,
        ),
    }
}

/// One rank of a group, built and joined: its share of the model and its link to the others.
struct JoinedRank {
    rank: usize,
    compute: Box<dyn RankCompute>,
    transport: Box<dyn Transport>,
}

/// Loads rank `rank` of `world` (on GPU `opts.device + local_index` when on the GPU).
fn rank_compute(
    opts: &ModelOptions,
    setup: &Setup,
    shard: ExpertShard,
    local_index: usize,
    geometry: KvGeometry,
    auto_blocks: bool,
) -> Result<Box<dyn RankCompute>> {
    if setup.on_gpu() {
        let ordinal = opts
            .device
            .checked_add(local_index)
            .ok_or_else(|| Error::Options(format!("--device {} is too large", opts.device)))?;
        return Ok(Box::new(cuda_executor(
            opts,
            shard,
            ordinal,
            geometry,
            auto_blocks,
        )?));
    }
    warn_gpu_flags_on_cpu(opts);
    Ok(Box::new(CpuExecutor::new(
        Arc::new(load_shard(opts, shard)?),
        geometry,
    )))
}

/// This process's part of a multi-process group: `local` consecutive ranks (one per GPU),
/// each joined to the group over its own TCP link. The ranks are loaded one after another, so
/// host memory holds one rank's load at a time, and then join together (rank 0 waits for all).
/// The process of rank 0 returns the group's executor, its other ranks running as threads; any
/// other process runs its ranks until rank 0 ends the group.
#[allow(clippy::too_many_arguments)]
fn group_process(
    opts: &ModelOptions,
    setup: &Setup,
    env: crate::dist::GroupEnv,
    local: usize,
    n_experts: usize,
    geometry: KvGeometry,
    auto_blocks: bool,
    joined: Option<Arc<AtomicBool>>,
) -> Result<Replica> {
    let world = env.world_size.checked_mul(local).ok_or_else(|| {
        Error::Options(format!(
            "WORLD_SIZE {} x LOCAL_WORLD_SIZE {local} is too large",
            env.world_size
        ))
    })?;
    if setup.on_gpu() && local > 1 {
        let gpus = crate::backend::cuda::device_count()?;
        if opts.device.saturating_add(local) > gpus {
            return Err(Error::Options(format!(
                "LOCAL_WORLD_SIZE={local} from device {} needs {local} GPUs in this process, and {gpus} are visible",
                opts.device
            )));
        }
    }
    let first = env.rank * local;
    let mut computes = Vec::with_capacity(local);
    for i in 0..local {
        let shard = ExpertShard::new(first + i, world, n_experts)?;
        computes.push(rank_compute(opts, setup, shard, i, geometry, auto_blocks)?);
    }
    let tcp = TcpOptions {
        join_timeout: opts.group_join_timeout,
        peer_timeout: opts.group_timeout,
    };
    // GPU ranks' devices, for the NCCL communicator; `None` on the CPU.
    let gpu_of = |i: usize| setup.on_gpu().then(|| opts.device + i);
    let exchange = opts.moe_exchange;
    // Every rank joins at once: the leader's join waits for all of them.
    let joining: Vec<_> = computes
        .into_iter()
        .enumerate()
        .map(|(i, compute)| {
            let rank_env = crate::dist::GroupEnv {
                rank: first + i,
                world_size: world,
                leader_addr: env.leader_addr.clone(),
            };
            std::thread::Builder::new()
                .name(format!("join-rank-{}", first + i))
                .spawn({
                    let gpu = gpu_of(i);
                    move || join_rank(rank_env, compute, tcp, gpu, exchange)
                })
                .map_err(Error::io("starting a rank thread"))
        })
        .collect::<Result<_>>()?;
    let mut ranks = Vec::with_capacity(local);
    for handle in joining {
        let rank = handle.join().map_err(|_| Error::Io {
            what: "a rank thread".into(),
            error: std::io::Error::other("it panicked while joining the group"),
        })??;
        ranks.push(rank);
    }
    if let Some(flag) = joined {
        flag.store(true, Ordering::Release);
    }
    let mut ranks = ranks.into_iter();
    let Some(head) = ranks.next() else {
        return Err(Error::Options("LOCAL_WORLD_SIZE must be at least 1".into()));
    };
    let workers: Vec<_> = ranks
        .map(|r| {
            std::thread::Builder::new()
                .name(format!("ep-rank-{}", r.rank))
                .spawn(move || {
                    let JoinedRank {
                        mut compute,
                        mut transport,
                        ..
                    } = r;
                    run_worker_with(compute.as_mut(), transport.as_mut())
                })
                .map_err(Error::io("starting a rank thread"))
        })
        .collect::<Result<_>>()?;
    if head.rank == 0 {
        return Ok(Replica::Executor(Box::new(
            ExpertParallelExecutor::with_rank(head.compute, head.transport).with_workers(workers),
        )));
    }
    tracing::info!(
        ranks = format!("{}..{}", first, first + local),
        "serving as worker ranks until rank 0 ends the group"
    );
    let JoinedRank {
        mut compute,
        mut transport,
        ..
    } = head;
    let mine = run_worker_with(compute.as_mut(), transport.as_mut());
    for w in workers {
        match w.join() {
            Ok(r) => r.map_err(Error::Group)?,
            Err(_) => {
                return Err(Error::Group(crate::model::ForwardError::Backend(
                    "a rank thread panicked".into(),
                )));
            }
        }
    }
    mine.map_err(Error::Group)?;
    Ok(Replica::Worker)
}

/// Joins the group as `env.rank` and, on GPUs (`gpu` is the device), agrees with every rank on
/// the KV blocks and on how the MoE rows move (NCCL or host memory, per `exchange`).
fn join_rank(
    env: crate::dist::GroupEnv,
    mut compute: Box<dyn RankCompute>,
    tcp: TcpOptions,
    gpu: Option<usize>,
    exchange: RowExchange,
) -> Result<JoinedRank> {
    let mut transport = TcpTransport::connect(&env, tcp)?;
    // GPU ranks each sized their cache from their own free memory; CPU ranks were all given
    // the same geometry.
    let own = compute.kv_geometry().num_blocks;
    let blocks = if gpu.is_some() {
        agree_on_blocks(&mut transport, own)?
    } else {
        own
    };
    if blocks < own {
        tracing::info!(
            rank = env.rank,
            blocks,
            own,
            "KV blocks lowered to what every rank of the group holds"
        );
        compute.limit_blocks(blocks);
    }
    let transport: Box<dyn Transport> = match gpu {
        Some(ordinal) => crate::dist::mixed::rows_over(transport, ordinal, exchange)?,
        None => Box::new(transport),
    };
    Ok(JoinedRank {
        rank: env.rank,
        compute,
        transport,
    })
}
