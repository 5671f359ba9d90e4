//! An expert-parallel group as one [`Executor`]. Rank 0 (the leader) runs the scheduler; each
//! step it hands every rank the chunks of the sequences that rank serves (data-parallel
//! attention) and gathers the logits. Each rank holds its own KV cache of `B` blocks, and the
//! group offers the scheduler `world x B` blocks in `world` partitions
//! ([`Executor::kv_partitions`]): block `b` is block `b % B` of rank `b / B`, and a sequence,
//! whose blocks all come from one partition, runs on that rank (prefix-cache hits land where
//! the data is). Worker ranks run
//! [`run_worker`]: receive a step, run it (MoE layers exchange tokens with every rank), reply.
//!
//! What a rank computes with is a [`RankCompute`]: the CPU reference ([`CpuExecutor`]) or one
//! GPU ([`crate::backend::cuda::CudaExecutor`]). Both speak the same MoE exchange, so the
//! protocol here is the same for either.

use std::sync::Arc;

use super::{CpuExecutor, Executor};
use crate::dist::{DistError, Reader, Transport, Writer};
use crate::kv::{BlockTable, KvGeometry};
use crate::model::{ForwardError, LogitsWanted, Model, SeqChunk};

const STEP: u32 = 1;
const SHUTDOWN: u32 = 2;

/// One rank's share of an expert-parallel step: its own sequences through every layer, with
/// each MoE layer exchanging tokens with the other ranks through `comm`. A rank with no
/// sequences still takes part in every exchange, so collectives never hang.
pub trait RankCompute: Send {
    fn forward_rank(
        &mut self,
        batch: &[SeqChunk],
        comm: &mut dyn Transport,
    ) -> Result<Vec<Vec<f32>>, ForwardError>;
    fn kv_geometry(&self) -> KvGeometry;
    /// Uses at most `num_blocks` KV blocks: the group's ranks agree on the fewest any holds,
    /// so every rank's partition of the leader's pool has the same size.
    fn limit_blocks(&mut self, num_blocks: usize);
    fn device_name(&self) -> String;
}

impl RankCompute for CpuExecutor {
    fn forward_rank(
        &mut self,
        batch: &[SeqChunk],
        comm: &mut dyn Transport,
    ) -> Result<Vec<Vec<f32>>, ForwardError> {
        self.model.forward_with(&mut self.cache, batch, Some(comm))
    }
    fn kv_geometry(&self) -> KvGeometry {
        self.cache.geometry
    }
    fn limit_blocks(&mut self, num_blocks: usize) {
        self.cache.geometry.num_blocks = self.cache.geometry.num_blocks.min(num_blocks);
    }
    fn device_name(&self) -> String {
        Executor::device_name(self)
    }
}

pub struct ExpertParallelExecutor {
    local: Box<dyn RankCompute>,
    transport: Box<dyn Transport>,
    /// Threads of in-process worker ranks, joined on drop.
    workers: Vec<std::thread::JoinHandle<Result<(), ForwardError>>>,
}

impl std::fmt::Debug for ExpertParallelExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExpertParallelExecutor")
            .field("world", &self.transport.world_size())
            .finish()
    }
}

impl ExpertParallelExecutor {
    /// The leader side on the CPU; `transport` must be rank 0 of the group.
    pub fn new(model: Arc<Model>, geometry: KvGeometry, transport: Box<dyn Transport>) -> Self {
        Self::with_rank(Box::new(CpuExecutor::new(model, geometry)), transport)
    }

    /// The leader side computing with `local`; `transport` must be rank 0 of the group.
    pub fn with_rank(local: Box<dyn RankCompute>, transport: Box<dyn Transport>) -> Self {
        ExpertParallelExecutor {
            local,
            transport,
            workers: Vec::new(),
        }
    }

    /// Adds threads of this process's other ranks (running [`run_worker_with`]), joined when
    /// the executor is dropped.
    pub fn with_workers(
        mut self,
        workers: Vec<std::thread::JoinHandle<Result<(), ForwardError>>>,
    ) -> Self {
        self.workers.extend(workers);
        self
    }

    /// A whole group on the CPU in this process: `models[r]` is rank r's shard; ranks 1.. run
    /// on threads.
    pub fn in_process(models: Vec<Arc<Model>>, geometry: KvGeometry) -> Result<Self, ForwardError> {
        let ranks = models
            .into_iter()
            .map(|m| Box::new(CpuExecutor::new(m, geometry)) as Box<dyn RankCompute>)
            .collect();
        Self::in_process_ranks(ranks)
    }

    /// A whole group in this process over in-process channels: `ranks[r]` computes rank r's
    /// share (for example one GPU each); ranks 1.. run on threads.
    pub fn in_process_ranks(ranks: Vec<Box<dyn RankCompute>>) -> Result<Self, ForwardError> {
        let endpoints = crate::dist::in_process_group(ranks.len())
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect();
        Self::in_process_over(ranks, endpoints)
    }

    /// A whole group in this process: `ranks[r]` computes rank r's share and talks through
    /// `transports[r]` (in-process channels, or one NCCL endpoint per GPU); ranks 1.. run on
    /// threads.
    pub fn in_process_over(
        ranks: Vec<Box<dyn RankCompute>>,
        transports: Vec<Box<dyn Transport>>,
    ) -> Result<Self, ForwardError> {
        if ranks.len() != transports.len() {
            return Err(ForwardError::Backend(format!(
                "{} ranks but {} transports",
                ranks.len(),
                transports.len()
            )));
        }
        let mut endpoints = transports.into_iter();
        let mut ranks = ranks.into_iter();
        let (Some(leader_t), Some(leader)) = (endpoints.next(), ranks.next()) else {
            return Err(ForwardError::Backend(
                "an expert-parallel group needs at least one rank".into(),
            ));
        };
        let workers = endpoints
            .zip(ranks)
            .map(|(t, r)| {
                std::thread::Builder::new()
                    .name(format!("ep-rank-{}", t.rank()))
                    .spawn(move || {
                        let (mut t, mut r) = (t, r);
                        run_worker_with(r.as_mut(), t.as_mut())
                    })
                    .map_err(|e| {
                        ForwardError::Backend(format!("could not start a rank thread: {e}"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut ex = ExpertParallelExecutor::with_rank(leader, leader_t);
        ex.workers = workers;
        Ok(ex)
    }

    /// The rank whose partition holds `chunk`'s blocks, and its table in that rank's own block
    /// ids; an error when the blocks are outside the group's pool or span partitions (the
    /// scheduler's pool never hands out such a table).
    fn place(&self, chunk: &SeqChunk) -> Result<(usize, BlockTable), ForwardError> {
        let per = self.local.kv_geometry().num_blocks.max(1);
        let world = self.transport.world_size();
        let rank = chunk.blocks.blocks.first().map_or(0, |b| *b as usize / per);
        let lo = rank * per;
        let mut local = Vec::with_capacity(chunk.blocks.blocks.len());
        for &b in &chunk.blocks.blocks {
            let b = b as usize;
            if rank >= world || b < lo || b >= lo + per {
                return Err(ForwardError::Backend(format!(
                    "KV block {b} is not in rank {rank}'s partition of {per} blocks (group of {world}); a sequence's blocks must stay in one partition"
                )));
            }
            local.push((b - lo) as u32);
        }
        Ok((
            rank,
            BlockTable {
                blocks: local,
                block_size: chunk.blocks.block_size,
            },
        ))
    }
}

fn encode_chunks(chunks: &[(usize, &SeqChunk)]) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(STEP).u32(chunks.len() as u32);
    for (index, c) in chunks {
        let wanted = match c.logits {
            LogitsWanted::None => 0,
            LogitsWanted::Last => 1,
            LogitsWanted::All => 2,
        };
        w.u32(*index as u32)
            .u32s(c.tokens)
            .u64(c.start_pos as u64)
            .u32s(&c.blocks.blocks)
            .u32(c.blocks.block_size as u32)
            .u32(wanted);
    }
    w.finish()
}

struct OwnedChunk {
    index: usize,
    tokens: Vec<u32>,
    start_pos: usize,
    table: BlockTable,
    logits: LogitsWanted,
}

fn decode_chunks(bytes: &[u8]) -> Result<Option<Vec<OwnedChunk>>, DistError> {
    let mut r = Reader::new(bytes, 0);
    match r.u32()? {
        SHUTDOWN => return Ok(None),
        STEP => {}
        k => {
            return Err(DistError::Protocol {
                rank: 0,
                reason: format!("unknown message kind {k}"),
            });
        }
    }
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        let index = r.u32()? as usize;
        let tokens = r.u32s()?;
        let start_pos = r.u64()? as usize;
        let blocks = r.u32s()?;
        let block_size = r.u32()? as usize;
        let logits = match r.u32()? {
            0 => LogitsWanted::None,
            1 => LogitsWanted::Last,
            _ => LogitsWanted::All,
        };
        out.push(OwnedChunk {
            index,
            tokens,
            start_pos,
            table: BlockTable { blocks, block_size },
            logits,
        });
    }
    Ok(Some(out))
}

fn run_local(
    local: &mut dyn RankCompute,
    chunks: &[OwnedChunk],
    t: &mut dyn Transport,
) -> Result<Vec<Vec<f32>>, ForwardError> {
    let views: Vec<SeqChunk> = chunks
        .iter()
        .map(|c| SeqChunk {
            tokens: &c.tokens,
            start_pos: c.start_pos,
            blocks: &c.table,
            logits: c.logits,
        })
        .collect();
    local.forward_rank(&views, t)
}

/// A worker rank's loop on the CPU: returns `Ok` when the leader shuts the group down.
pub fn run_worker(
    model: &Arc<Model>,
    geometry: KvGeometry,
    t: &mut dyn Transport,
) -> Result<(), ForwardError> {
    run_worker_with(&mut CpuExecutor::new(model.clone(), geometry), t)
}

/// A worker rank's loop computing with `local`: returns `Ok` when the leader shuts the group
/// down.
pub fn run_worker_with(
    local: &mut dyn RankCompute,
    t: &mut dyn Transport,
) -> Result<(), ForwardError> {
    let world = t.world_size();
    loop {
        let got = t.all_to_all(vec![Vec::new(); world])?;
        let Some(chunks) = decode_chunks(&got[0])? else {
            tracing::info!(rank = t.rank(), "the leader closed the group");
            return Ok(());
        };
        let logits = run_local(local, &chunks, t)?;
        let mut w = Writer::default();
        w.u32(chunks.len() as u32);
        for (c, l) in chunks.iter().zip(&logits) {
            w.u32(c.index as u32).f32s(l);
        }
        let mut parts = vec![Vec::new(); world];
        parts[0] = w.finish();
        t.all_to_all(parts)?;
    }
}

impl Executor for ExpertParallelExecutor {
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> {
        let world = self.transport.world_size();
        let placed = batch
            .iter()
            .map(|c| self.place(c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut per_rank: Vec<Vec<(usize, SeqChunk)>> = vec![Vec::new(); world];
        for (i, (c, (rank, table))) in batch.iter().zip(&placed).enumerate() {
            per_rank[*rank].push((
                i,
                SeqChunk {
                    tokens: c.tokens,
                    start_pos: c.start_pos,
                    blocks: table,
                    logits: c.logits,
                },
            ));
        }
        let mut parts: Vec<Vec<u8>> = per_rank
            .iter()
            .map(|cs| encode_chunks(&cs.iter().map(|(i, c)| (*i, c)).collect::<Vec<_>>()))
            .collect();
        parts[0] = Vec::new();
        self.transport.all_to_all(parts)?;

        let own: Vec<SeqChunk> = per_rank[0].iter().map(|(_, c)| *c).collect();
        let own_logits = self.local.forward_rank(&own, self.transport.as_mut())?;
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); batch.len()];
        for ((i, _), l) in per_rank[0].iter().zip(own_logits) {
            out[*i] = l;
        }
        let replies = self.transport.all_to_all(vec![Vec::new(); world])?;
        for (src, bytes) in replies.iter().enumerate().skip(1) {
            let mut r = Reader::new(bytes, src);
            let n = r.u32()? as usize;
            for _ in 0..n {
                let i = r.u32()? as usize;
                let l = r.f32s()?;
                let slot = out.get_mut(i).ok_or_else(|| {
                    ForwardError::Backend(format!(
                        "rank {src} answered for chunk {i}, which does not exist"
                    ))
                })?;
                *slot = l;
            }
        }
        Ok(out)
    }

    /// Every rank's cache, one partition each.
    fn kv_geometry(&self) -> KvGeometry {
        let own = self.local.kv_geometry();
        KvGeometry {
            num_blocks: own.num_blocks * self.transport.world_size(),
            block_size: own.block_size,
        }
    }

    fn kv_partitions(&self) -> usize {
        self.transport.world_size()
    }

    /// A rank that died or froze while the group idles fails this check within the transport's
    /// peer timeout, so rank 0 turns not-ready before a request finds out.
    fn check_alive(&mut self) -> Result<(), ForwardError> {
        Ok(self.transport.check_alive()?)
    }

    fn device_name(&self) -> String {
        format!(
            "{}, expert-parallel over {} ranks",
            self.local.device_name(),
            self.transport.world_size()
        )
    }
}

impl Drop for ExpertParallelExecutor {
    fn drop(&mut self) {
        let world = self.transport.world_size();
        let mut w = Writer::default();
        w.u32(SHUTDOWN);
        let bytes = w.finish();
        let parts = (0..world)
            .map(|r| if r == 0 { Vec::new() } else { bytes.clone() })
            .collect();
        let _ = self.transport.all_to_all(parts);
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
