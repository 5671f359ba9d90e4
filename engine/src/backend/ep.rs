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

use super::{CpuExecutor, Executor, sample_rows};
use crate::dist::{DistError, Reader, Transport, Writer};
use crate::generate::{Rng, Sampled, Sampler, SamplingParams};
use crate::kv::{BlockTable, KvGeometry};
use crate::model::{ForwardError, LogitsWanted, Model, SeqChunk};

const STEP: u32 = 1;
const SHUTDOWN: u32 = 2;
/// A step whose sampled chunks are sampled by the rank that holds them.
const STEP_SAMPLE: u32 = 3;

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
    /// Like [`Executor::forward_sample`]: the sampled token of each chunk with a sampler.
    /// By default the rank's logits are sampled on the host.
    fn forward_rank_sample(
        &mut self,
        batch: &[SeqChunk],
        samplers: &mut [Option<Sampler>],
        comm: &mut dyn Transport,
    ) -> Result<Vec<Option<Sampled>>, ForwardError> {
        let logits = self.forward_rank(batch, comm)?;
        Ok(sample_rows(&logits, samplers))
    }
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

/// What one chunk of a step gives back: its logits, or, in a sampling step, its sampled token
/// (sampled on the rank that holds the sequence, so only the token crosses the group).
enum ChunkOut {
    Logits(Vec<f32>),
    Sampled(Option<Sampled>),
}

fn encode_sampler(w: &mut Writer, s: &Sampler) {
    let opt = |w: &mut Writer, v: Option<u64>| {
        w.u32(v.is_some() as u32).u64(v.unwrap_or(0));
    };
    w.u32(s.params.temperature.to_bits())
        .u32(s.params.top_p.to_bits())
        .u64(s.params.top_k as u64);
    opt(w, s.params.seed);
    opt(w, s.logprobs.map(|n| n as u64));
    w.u64(s.rng.state());
}

fn decode_sampler(r: &mut Reader) -> Result<Sampler, DistError> {
    let temperature = f32::from_bits(r.u32()?);
    let top_p = f32::from_bits(r.u32()?);
    let top_k = r.u64()? as usize;
    let opt = |r: &mut Reader| -> Result<Option<u64>, DistError> {
        let some = r.u32()? != 0;
        let v = r.u64()?;
        Ok(some.then_some(v))
    };
    let seed = opt(r)?;
    let logprobs = opt(r)?.map(|n| n as usize);
    Ok(Sampler {
        params: SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        },
        rng: Rng::new(r.u64()?),
        logprobs,
    })
}

fn encode_sampled(w: &mut Writer, s: &Option<Sampled>) {
    let Some(s) = s else {
        w.u32(0);
        return;
    };
    w.u32(1).u32(s.token);
    w.u32(s.logprob.is_some() as u32)
        .u32(s.logprob.unwrap_or(0.0).to_bits());
    let (ids, lps): (Vec<u32>, Vec<f32>) = s.top_logprobs.iter().copied().unzip();
    w.u32s(&ids).f32s(&lps);
}

fn decode_sampled(r: &mut Reader) -> Result<Option<Sampled>, DistError> {
    if r.u32()? == 0 {
        return Ok(None);
    }
    let token = r.u32()?;
    let has_logprob = r.u32()? != 0;
    let logprob = f32::from_bits(r.u32()?);
    let ids = r.u32s()?;
    let lps = r.f32s()?;
    Ok(Some(Sampled {
        token,
        logprob: has_logprob.then_some(logprob),
        top_logprobs: ids.into_iter().zip(lps).collect(),
    }))
}

/// A step for one rank: its chunks and, in a sampling step, each chunk's sampler.
fn encode_chunks(chunks: &[(usize, &SeqChunk, Option<&Sampler>)], sampling: bool) -> Vec<u8> {
    let mut w = Writer::default();
    w.u32(if sampling { STEP_SAMPLE } else { STEP })
        .u32(chunks.len() as u32);
    for (index, c, sampler) in chunks {
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
        if sampling {
            w.u32(sampler.is_some() as u32);
            if let Some(s) = sampler {
                encode_sampler(&mut w, s);
            }
        }
    }
    w.finish()
}

struct OwnedChunk {
    index: usize,
    tokens: Vec<u32>,
    start_pos: usize,
    table: BlockTable,
    logits: LogitsWanted,
    sampler: Option<Sampler>,
}

/// A step as a worker receives it; `None` when the leader shuts the group down.
struct OwnedStep {
    sampling: bool,
    chunks: Vec<OwnedChunk>,
}

fn decode_chunks(bytes: &[u8]) -> Result<Option<OwnedStep>, DistError> {
    let mut r = Reader::new(bytes, 0);
    let sampling = match r.u32()? {
        SHUTDOWN => return Ok(None),
        STEP => false,
        STEP_SAMPLE => true,
        k => {
            return Err(DistError::Protocol {
                rank: 0,
                reason: format!("unknown message kind {k}"),
            });
        }
    };
    let n = r.u32()? as usize;
    let mut chunks = Vec::with_capacity(n.min(4096));
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
        let sampler = if sampling && r.u32()? != 0 {
            Some(decode_sampler(&mut r)?)
        } else {
            None
        };
        chunks.push(OwnedChunk {
            index,
            tokens,
            start_pos,
            table: BlockTable { blocks, block_size },
            logits,
            sampler,
        });
    }
    Ok(Some(OwnedStep { sampling, chunks }))
}

/// Runs this rank's chunks; in a sampling step `samplers` (one per chunk) advance as they draw.
fn run_local(
    local: &mut dyn RankCompute,
    chunks: &[SeqChunk],
    samplers: Option<&mut [Option<Sampler>]>,
    t: &mut dyn Transport,
) -> Result<Vec<ChunkOut>, ForwardError> {
    Ok(match samplers {
        Some(samplers) => local
            .forward_rank_sample(chunks, samplers, t)?
            .into_iter()
            .map(ChunkOut::Sampled)
            .collect(),
        None => local
            .forward_rank(chunks, t)?
            .into_iter()
            .map(ChunkOut::Logits)
            .collect(),
    })
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
        let Some(mut step) = decode_chunks(&got[0])? else {
            tracing::info!(rank = t.rank(), "the leader closed the group");
            return Ok(());
        };
        let mut samplers: Vec<Option<Sampler>> =
            step.chunks.iter_mut().map(|c| c.sampler.take()).collect();
        let views: Vec<SeqChunk> = step
            .chunks
            .iter()
            .map(|c| SeqChunk {
                tokens: &c.tokens,
                start_pos: c.start_pos,
                blocks: &c.table,
                logits: c.logits,
            })
            .collect();
        let outs = run_local(
            local,
            &views,
            step.sampling.then_some(samplers.as_mut_slice()),
            t,
        )?;
        let mut w = Writer::default();
        w.u32(step.chunks.len() as u32);
        for ((c, out), sampler) in step.chunks.iter().zip(&outs).zip(&samplers) {
            w.u32(c.index as u32);
            match out {
                ChunkOut::Logits(l) => {
                    w.f32s(l);
                }
                ChunkOut::Sampled(s) => {
                    encode_sampled(&mut w, s);
                    w.u64(sampler.as_ref().map_or(0, |s| s.rng.state()));
                }
            }
        }
        let mut parts = vec![Vec::new(); world];
        parts[0] = w.finish();
        t.all_to_all(parts)?;
    }
}

impl ExpertParallelExecutor {
    /// One step of the group: each rank runs its own sequences; with `samplers` (one per
    /// chunk) each rank samples its own and only tokens come back, else the logits do.
    fn step(
        &mut self,
        batch: &[SeqChunk],
        mut samplers: Option<&mut [Option<Sampler>]>,
    ) -> Result<Vec<ChunkOut>, ForwardError> {
        let world = self.transport.world_size();
        let sampling = samplers.is_some();
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
        let sampler_of = |i: usize| -> Option<&Sampler> {
            samplers
                .as_deref()
                .and_then(|s| s.get(i))
                .and_then(Option::as_ref)
        };
        let mut parts: Vec<Vec<u8>> = per_rank
            .iter()
            .map(|cs| {
                let chunks: Vec<_> = cs.iter().map(|(i, c)| (*i, c, sampler_of(*i))).collect();
                encode_chunks(&chunks, sampling)
            })
            .collect();
        parts[0] = Vec::new();
        self.transport.all_to_all(parts)?;

        let own: Vec<SeqChunk> = per_rank[0].iter().map(|(_, c)| *c).collect();
        let mut own_samplers: Option<Vec<Option<Sampler>>> = samplers.as_deref_mut().map(|s| {
            per_rank[0]
                .iter()
                .map(|(i, _)| s.get_mut(*i).and_then(Option::take))
                .collect()
        });
        let own_out = run_local(
            self.local.as_mut(),
            &own,
            own_samplers.as_deref_mut(),
            self.transport.as_mut(),
        )?;
        let mut out: Vec<Option<ChunkOut>> = (0..batch.len()).map(|_| None).collect();
        for (k, ((i, _), o)) in per_rank[0].iter().zip(own_out).enumerate() {
            out[*i] = Some(o);
            if let (Some(all), Some(own)) = (samplers.as_deref_mut(), own_samplers.as_mut()) {
                all[*i] = own[k].take();
            }
        }
        let replies = self.transport.all_to_all(vec![Vec::new(); world])?;
        for (src, bytes) in replies.iter().enumerate().skip(1) {
            let mut r = Reader::new(bytes, src);
            let n = r.u32()? as usize;
            for _ in 0..n {
                let i = r.u32()? as usize;
                if i >= batch.len() {
                    return Err(ForwardError::Backend(format!(
                        "rank {src} answered for chunk {i}, which does not exist"
                    )));
                }
                out[i] = Some(match samplers.as_deref_mut() {
                    None => ChunkOut::Logits(r.f32s()?),
                    Some(all) => {
                        let sampled = decode_sampled(&mut r)?;
                        let state = r.u64()?;
                        if let Some(s) = all.get_mut(i).and_then(Option::as_mut) {
                            s.rng = Rng::new(state);
                        }
                        ChunkOut::Sampled(sampled)
                    }
                });
            }
        }
        Ok(out
            .into_iter()
            .map(|o| {
                o.unwrap_or(if sampling {
                    ChunkOut::Sampled(None)
                } else {
                    ChunkOut::Logits(Vec::new())
                })
            })
            .collect())
    }
}

impl Executor for ExpertParallelExecutor {
    fn forward(&mut self, batch: &[SeqChunk]) -> Result<Vec<Vec<f32>>, ForwardError> {
        Ok(self
            .step(batch, None)?
            .into_iter()
            .map(|o| match o {
                ChunkOut::Logits(l) => l,
                ChunkOut::Sampled(_) => Vec::new(),
            })
            .collect())
    }

    /// Each rank samples its own sequences where their logits are (on its GPU for the CUDA
    /// backend), so a step moves tokens, not vocabulary-wide rows, between ranks.
    fn forward_sample(
        &mut self,
        batch: &[SeqChunk],
        samplers: &mut [Option<Sampler>],
    ) -> Result<Vec<Option<Sampled>>, ForwardError> {
        Ok(self
            .step(batch, Some(samplers))?
            .into_iter()
            .map(|o| match o {
                ChunkOut::Sampled(s) => s,
                ChunkOut::Logits(_) => None,
            })
            .collect())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samplers_and_sampled_tokens_cross_the_wire_unchanged() {
        let sampler = Sampler {
            params: SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                top_k: 12,
                seed: Some(42),
            },
            rng: Rng::new(0xdead_beef),
            logprobs: Some(5),
        };
        let sampled = Some(Sampled {
            token: 99,
            logprob: Some(-1.25),
            top_logprobs: vec![(99, -1.25), (3, -2.5)],
        });
        let mut w = Writer::default();
        encode_sampler(&mut w, &sampler);
        encode_sampled(&mut w, &sampled);
        encode_sampled(&mut w, &None);
        let bytes = w.finish();
        let mut r = Reader::new(&bytes, 1);
        let back = decode_sampler(&mut r).unwrap();
        assert_eq!(back.params, sampler.params);
        assert_eq!(back.rng.state(), sampler.rng.state());
        assert_eq!(back.logprobs, Some(5));
        assert_eq!(decode_sampled(&mut r).unwrap(), sampled);
        assert_eq!(decode_sampled(&mut r).unwrap(), None);
        assert!(r.is_empty());
        for cut in 0..bytes.len() {
            let mut r = Reader::new(&bytes[..cut], 1);
            let whole = decode_sampler(&mut r).and_then(|_| decode_sampled(&mut r));
            assert!(whole.is_err() || cut >= bytes.len() - 4, "cut at {cut}");
        }
    }
}
