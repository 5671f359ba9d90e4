//! Compute backends. `cpu` is the f32 reference every other backend is checked against; `cuda`
//! runs the same function on NVIDIA GPUs. The scheduler drives either through [`Executor`].

pub mod cpu;
pub mod cuda;
pub mod ep;

use std::sync::Arc;

use crate::generate::{Sampled, Sampler, sample_row};
use crate::kv::KvGeometry;
use crate::model::{ForwardError, Model, SeqChunk};

/// A model bound to a device and its KV-cache storage: the one thing the engine loop needs.
pub trait Executor: Send {
    /// One step over a batch of chunks; per chunk, the requested logits flattened `[rows, vocab]`.
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError>;
    /// The paged cache this executor was built with.
    fn kv_geometry(&self) -> KvGeometry;
    /// Equal partitions of [`Executor::kv_geometry`]'s blocks, one per rank holding its own
    /// share (an expert-parallel group); every block of one sequence must come from one
    /// partition ([`crate::kv::PrefixCachingPool::partitioned`]).
    fn kv_partitions(&self) -> usize {
        1
    }
    /// Human-readable device name for logs and `/v1/models`.
    fn device_name(&self) -> String;
    /// Called by the engine loop while it has no work, at least every
    /// [`IDLE_CHECK_EVERY`](crate::runtime::IDLE_CHECK_EVERY): an error says the executor can
    /// never step again (a rank of its group is gone or silent), so the engine turns not-ready
    /// without waiting for the next request to find out.
    fn check_alive(&mut self) -> Result<(), ForwardError> {
        Ok(())
    }
    /// Tokens routed to each expert so far, summed over MoE layers, if the backend counts them.
    fn expert_routed_tokens(&self) -> Option<Vec<u64>> {
        None
    }
    /// One step that also samples: for each chunk with a sampler (its logits must be
    /// [`LogitsWanted::Last`](crate::model::LogitsWanted)), the sampled token. By default the
    /// logits come back to the host and are sampled there; a device backend samples where the
    /// logits are and returns only tokens.
    fn forward_sample(
        &mut self,
        batch: &[SeqChunk],
        samplers: &mut [Option<Sampler>],
    ) -> Result<Vec<Option<Sampled>>, ForwardError> {
        let logits = self.forward(batch)?;
        Ok(sample_rows(&logits, samplers))
    }
}

/// Samples on the host each chunk's logits that has a sampler (and logits).
pub fn sample_rows(logits: &[Vec<f32>], samplers: &mut [Option<Sampler>]) -> Vec<Option<Sampled>> {
    logits
        .iter()
        .zip(samplers.iter_mut())
        .map(|(l, s)| match s {
            Some(s) if !l.is_empty() => Some(sample_row(l, s)),
            _ => None,
        })
        .collect()
}

/// The CPU reference model with its host-memory cache.
#[derive(Debug)]
pub struct CpuExecutor {
    pub model: Arc<Model>,
    pub cache: cpu::CpuKvCache,
}

impl CpuExecutor {
    pub fn new(model: Arc<Model>, geometry: KvGeometry) -> Self {
        let cache = cpu::CpuKvCache::new(&model.config, geometry);
        CpuExecutor { model, cache }
    }
}

impl Executor for CpuExecutor {
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> {
        self.model.forward(&mut self.cache, batch)
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.cache.geometry
    }
    fn device_name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn expert_routed_tokens(&self) -> Option<Vec<u64>> {
        Some(
            self.model
                .expert_routed_tokens
                .iter()
                .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
                .collect(),
        )
    }
}
