//! Continuous batching, after vLLM v1's scheduler: there are no prefill or decode phases. Each
//! sequence's computed-token count catches up with its known tokens (prompt plus output) under
//! a per-step token budget, so long prompts are prefilled in chunks beside running decodes.
//! KV blocks come from a prefix-caching pool; when they run out, the newest running sequence is
//! preempted (its blocks freed, to be recomputed later), which keeps outputs identical.
//!
//! Pure bookkeeping: no tensors, no clock, no I/O. The engine loop (`runtime`) executes plans.

use std::collections::{HashMap, VecDeque};

use thiserror::Error;

use crate::generate::FinishReason;
use crate::kv::{BlockTable, PrefixCachingPool};

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Longest sequence (prompt plus output) accepted.
    pub max_model_len: usize,
    /// Bound of the waiting queue; beyond it requests are refused (HTTP 429).
    pub max_waiting: usize,
}

/// What a request asks of the scheduler.
#[derive(Debug, Clone)]
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum AdmissionError {
    #[error("the server is at capacity ({waiting} requests waiting, limit {limit}); retry later")]
    QueueFull { waiting: usize, limit: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "this model's maximum context length is {limit} tokens, but {prompt} prompt tokens plus {max_tokens} \
         completion tokens were requested"
    )]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error(
        "the request asks for {n} choices but this server queues at most {limit} sequences; \
         ask for fewer"
    )]
    TooManyChoices { n: usize, limit: usize },
    #[error("the request needs {needed} KV blocks but the cache holds only {total}")]
    ExceedsCache { needed: usize, total: usize },
    #[error("sequence id {0} is already in use")]
    DuplicateId(SeqId),
}

#[derive(Debug)]
struct Seq {
    spec: SeqSpec,
    /// Prompt followed by every generated token.
    tokens: Vec<u32>,
    /// Tokens whose KV is in the cache.
    num_computed: usize,
    table: BlockTable,
    /// Prompt tokens served from the prefix cache at (last) admission.
    cached_tokens: usize,
}

impl Seq {
    fn generated(&self) -> usize {
        self.tokens.len() - self.spec.prompt.len()
    }
}

/// One chunk to compute this step: tokens `[start, start + len)` of sequence `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChunk {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// The chunk reaches the end of the known tokens, so its last logits are sampled.
    pub sample: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    pub chunks: Vec<PlannedChunk>,
    /// Sequences preempted while planning (their KV was dropped; they wait to be recomputed).
    pub preempted: Vec<SeqId>,
}

/// Counters the metrics endpoint exports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedStats {
    pub preemptions: u64,
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: PrefixCachingPool,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    /// Oldest first; preemption takes from the back.
    running: Vec<SeqId>,
    pub stats: SchedStats,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, pool: PrefixCachingPool) -> Self {
        Scheduler {
            cfg,
            pool,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: SchedStats::default(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Admission control: refuse now rather than queue forever or fail later.
    pub fn add(&mut self, id: SeqId, spec: SeqSpec) -> Result<(), AdmissionError> {
        self.add_all(vec![(id, spec)])
    }

    /// Admits the sequences of one request (its `n` choices) all together or none of them:
    /// a request never holds part of the queue while the rest of it is refused.
    pub fn add_all(&mut self, seqs: Vec<(SeqId, SeqSpec)>) -> Result<(), AdmissionError> {
        for (i, (id, spec)) in seqs.iter().enumerate() {
            if self.seqs.contains_key(id) || seqs[..i].iter().any(|(other, _)| other == id) {
                return Err(AdmissionError::DuplicateId(*id));
            }
            self.check(spec)?;
        }
        if seqs.len() > self.cfg.max_waiting {
            return Err(AdmissionError::TooManyChoices {
                n: seqs.len(),
                limit: self.cfg.max_waiting,
            });
        }
        if self.waiting.len() + seqs.len() > self.cfg.max_waiting {
            return Err(AdmissionError::QueueFull {
                waiting: self.waiting.len(),
                limit: self.cfg.max_waiting,
            });
        }
        for (id, spec) in seqs {
            let tokens = spec.prompt.clone();
            self.seqs.insert(
                id,
                Seq {
                    spec,
                    tokens,
                    num_computed: 0,
                    table: BlockTable::default(),
                    cached_tokens: 0,
                },
            );
            self.waiting.push_back(id);
        }
        Ok(())
    }

    /// Whether one sequence could ever run here.
    fn check(&self, spec: &SeqSpec) -> Result<(), AdmissionError> {
        if spec.prompt.is_empty() {
            return Err(AdmissionError::EmptyPrompt);
        }
        let total = spec.prompt.len().saturating_add(spec.max_tokens);
        if total > self.cfg.max_model_len {
            return Err(AdmissionError::TooLong {
                prompt: spec.prompt.len(),
                max_tokens: spec.max_tokens,
                limit: self.cfg.max_model_len,
            });
        }
        let needed = self.pool.blocks_for(total);
        if needed > self.pool.geometry().num_blocks {
            return Err(AdmissionError::ExceedsCache {
                needed,
                total: self.pool.geometry().num_blocks,
            });
        }
        Ok(())
    }

    /// Removes a sequence wherever it is and frees its blocks. Returns whether it existed.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(mut seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.pool.release(&mut seq.table);
        self.waiting.retain(|s| *s != id);
        self.running.retain(|s| *s != id);
        true
    }

    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    pub fn block_table(&self, id: SeqId) -> Option<&BlockTable> {
        self.seqs.get(&id).map(|s| &s.table)
    }

    /// Prompt tokens the prefix cache served for this sequence.
    pub fn cached_tokens(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_tokens)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    pub fn kv_usage(&self) -> f64 {
        self.pool.usage()
    }

    /// The fullest KV partition's use ([`PrefixCachingPool::fullest_partition_usage`]).
    pub fn fullest_partition_kv_usage(&self) -> f64 {
        self.pool.fullest_partition_usage()
    }

    pub fn free_blocks(&self) -> usize {
        self.pool.free_blocks()
    }

    /// Blocks in use plus those running sequences still need to reach their `max_tokens`, over
    /// all blocks: how full the cache will be if nothing new arrives. May exceed 1.
    pub fn projected_kv_usage(&self) -> f64 {
        let total = self.pool.geometry().num_blocks.max(1) as f64;
        let used = (self.pool.geometry().num_blocks - self.pool.free_blocks()) as f64;
        let still_needed: usize = self
            .running
            .iter()
            .filter_map(|id| self.seqs.get(id))
            .map(|s| {
                self.pool
                    .blocks_for(s.spec.prompt.len().saturating_add(s.spec.max_tokens))
                    .saturating_sub(s.table.blocks.len())
            })
            .sum();
        (used + still_needed as f64) / total
    }

    /// Plans one step.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;

        // Running sequences first, oldest first.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let Some(seq) = self.seqs.get(&id) else {
                self.running.remove(i);
                continue;
            };
            let len = (seq.tokens.len() - seq.num_computed).min(budget);
            let target = seq.num_computed + len;
            while let Some(seq) = self.seqs.get_mut(&id) {
                if self.pool.reserve(&mut seq.table, target).is_ok() {
                    let sample = target == seq.tokens.len();
                    plan.chunks.push(PlannedChunk {
                        id,
                        start: seq.num_computed,
                        len,
                        sample,
                    });
                    budget -= len;
                    i += 1;
                    break;
                }
                // Out of blocks: preempt the newest running sequence not yet planned whose blocks
                // are in this one's partition (possibly this one): only those free its space.
                let partition = self.pool.partition_of(&seq.table);
                let at = (i..self.running.len()).rev().find(|&j| {
                    self.seqs.get(&self.running[j]).is_some_and(|v| {
                        partition.is_none() || self.pool.partition_of(&v.table) == partition
                    })
                });
                let Some(at) = at else {
                    break;
                };
                let victim = self.running.remove(at);
                self.preempt(victim);
                plan.preempted.push(victim);
                if victim == id {
                    break;
                }
            }
        }

        // Then waiting sequences, first come first served.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let Some(seq) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if seq.table.blocks.is_empty() {
                let hit = self.pool.match_prefix(&mut seq.table, &seq.tokens);
                seq.num_computed = hit;
                if seq.generated() == 0 {
                    seq.cached_tokens = hit;
                    self.stats.prefix_query_tokens += seq.tokens.len() as u64;
                    self.stats.prefix_hit_tokens += hit as u64;
                }
            }
            let len = (seq.tokens.len() - seq.num_computed).min(budget);
            let target = seq.num_computed + len;
            if self.pool.reserve(&mut seq.table, target).is_err() {
                // Give matched prefix blocks back so running sequences can use the space; the
                // match is redone on the next attempt.
                self.pool.release(&mut seq.table);
                seq.num_computed = 0;
                break;
            }
            let sample = target == seq.tokens.len();
            plan.chunks.push(PlannedChunk {
                id,
                start: seq.num_computed,
                len,
                sample,
            });
            budget -= len;
            self.waiting.pop_front();
            self.running.push(id);
        }
        plan
    }

    fn preempt(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            self.pool.release(&mut seq.table);
            seq.num_computed = 0;
            self.waiting.push_front(id);
            self.stats.preemptions += 1;
        }
    }

    /// Applies a finished step: chunks are now in the cache; sampled tokens are appended.
    /// Returns the sequences that finished (already removed, blocks freed).
    pub fn complete_step(
        &mut self,
        plan: &StepPlan,
        sampled: &[(SeqId, u32)],
    ) -> Vec<(SeqId, FinishReason)> {
        for c in &plan.chunks {
            if let Some(seq) = self.seqs.get_mut(&c.id) {
                seq.num_computed = seq.num_computed.max(c.start + c.len);
                self.pool
                    .cache_full_blocks(&seq.table, &seq.tokens, seq.num_computed);
            }
        }
        let mut finished = Vec::new();
        for &(id, tok) in sampled {
            let Some(seq) = self.seqs.get_mut(&id) else {
                continue;
            };
            seq.tokens.push(tok);
            let reason = if seq.spec.stop_token_ids.contains(&tok) {
                Some(FinishReason::Stop)
            } else if seq.generated() >= seq.spec.max_tokens
                || seq.tokens.len() >= self.cfg.max_model_len
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                finished.push((id, r));
            }
        }
        for (id, _) in &finished {
            self.abort(*id);
        }
        finished
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvGeometry;

    fn sched(blocks: usize, block_size: usize, budget: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: budget,
                max_model_len: 1024,
                max_waiting: 4,
            },
            PrefixCachingPool::new(
                KvGeometry {
                    num_blocks: blocks,
                    block_size,
                },
                true,
            ),
        )
    }

    fn spec(prompt: Vec<u32>, max_tokens: usize) -> SeqSpec {
        SeqSpec {
            prompt,
            max_tokens,
            stop_token_ids: vec![0],
        }
    }

    /// Runs steps with a fake model that always samples `next(seq)`; returns outputs per id.
    fn drive(
        s: &mut Scheduler,
        steps: usize,
        next: impl Fn(SeqId, usize) -> u32,
    ) -> HashMap<SeqId, Vec<u32>> {
        let mut out: HashMap<SeqId, Vec<u32>> = HashMap::new();
        for _ in 0..steps {
            let plan = s.schedule();
            let sampled: Vec<(SeqId, u32)> = plan
                .chunks
                .iter()
                .filter(|c| c.sample)
                .map(|c| {
                    let n = s.tokens(c.id).map_or(0, <[u32]>::len);
                    (c.id, next(c.id, n))
                })
                .collect();
            for (id, t) in &sampled {
                out.entry(*id).or_default().push(*t);
            }
            for id in &plan.preempted {
                // A preempted sequence keeps its output; recomputation must not resample.
                assert!(s.tokens(*id).is_some());
            }
            s.complete_step(&plan, &sampled);
            if !s.has_work() {
                break;
            }
        }
        out
    }

    #[test]
    fn long_prompts_are_chunked_under_the_token_budget_beside_decodes() {
        let mut s = sched(64, 4, 8);
        s.add(1, spec(vec![5; 3], 4)).unwrap();
        let p = s.schedule();
        assert_eq!(
            p.chunks,
            vec![PlannedChunk {
                id: 1,
                start: 0,
                len: 3,
                sample: true
            }]
        );
        s.complete_step(&p, &[(1, 7)]);
        s.add(2, spec(vec![6; 20], 2)).unwrap();
        let p = s.schedule();
        assert_eq!(
            p.chunks,
            vec![
                PlannedChunk {
                    id: 1,
                    start: 3,
                    len: 1,
                    sample: true
                },
                PlannedChunk {
                    id: 2,
                    start: 0,
                    len: 7,
                    sample: false
                },
            ]
        );
        s.complete_step(&p, &[(1, 8)]);
        let p = s.schedule();
        assert_eq!(
            p.chunks[1],
            PlannedChunk {
                id: 2,
                start: 7,
                len: 7,
                sample: false
            }
        );
    }

    #[test]
    fn sequences_finish_on_stop_tokens_and_max_tokens_and_free_their_blocks() {
        let mut s = sched(16, 4, 64);
        s.add(1, spec(vec![3; 5], 3)).unwrap();
        s.add(2, spec(vec![4; 5], 10)).unwrap();
        let out = drive(&mut s, 50, |id, n| if id == 2 && n >= 7 { 0 } else { 9 });
        assert_eq!(out[&1], vec![9, 9, 9]);
        assert_eq!(out[&2], vec![9, 9, 0]);
        assert!(!s.has_work());
        assert_eq!(s.free_blocks(), 16);
    }

    #[test]
    fn admission_refuses_overlong_requests_and_a_full_queue() {
        let mut s = sched(4, 4, 64);
        assert!(matches!(
            s.add(1, spec(vec![1; 1000], 100)),
            Err(AdmissionError::TooLong { .. })
        ));
        assert!(matches!(
            s.add(1, spec(vec![1; 10], 10)),
            Err(AdmissionError::ExceedsCache {
                needed: 5,
                total: 4
            })
        ));
        assert_eq!(s.add(1, spec(vec![], 1)), Err(AdmissionError::EmptyPrompt));
        for id in 0..4 {
            s.add(id, spec(vec![1], 1)).unwrap();
        }
        assert_eq!(
            s.add(9, spec(vec![1], 1)),
            Err(AdmissionError::QueueFull {
                waiting: 4,
                limit: 4
            })
        );
        assert_eq!(
            s.add(0, spec(vec![1], 1)),
            Err(AdmissionError::DuplicateId(0))
        );
    }

    #[test]
    fn the_choices_of_one_request_are_admitted_all_together_or_not_at_all() {
        let mut s = sched(64, 4, 64);
        s.add(1, spec(vec![1], 1)).unwrap();
        let group = |first: SeqId, n: u64| -> Vec<(SeqId, SeqSpec)> {
            (first..first + n)
                .map(|id| (id, spec(vec![2], 1)))
                .collect()
        };
        assert_eq!(
            s.add_all(group(10, 4)),
            Err(AdmissionError::QueueFull {
                waiting: 1,
                limit: 4
            })
        );
        assert_eq!(s.num_waiting(), 1, "a refused group leaves nothing behind");
        s.add_all(group(10, 3)).unwrap();
        assert_eq!(s.num_waiting(), 4);
        assert_eq!(
            s.add_all(group(20, 5)),
            Err(AdmissionError::TooManyChoices { n: 5, limit: 4 })
        );
        assert_eq!(
            s.add_all(vec![(30, spec(vec![1], 1)), (30, spec(vec![1], 1))]),
            Err(AdmissionError::DuplicateId(30))
        );
        let mut big = group(40, 2);
        big[1].1.max_tokens = usize::MAX;
        assert!(matches!(
            s.add_all(big),
            Err(AdmissionError::TooLong { .. })
        ));
        assert_eq!(s.num_waiting(), 4);
    }

    #[test]
    fn a_shared_prefix_is_served_from_the_cache() {
        let mut s = sched(32, 4, 64);
        s.add(1, spec((1..=12).collect(), 1)).unwrap();
        drive(&mut s, 5, |_, _| 0);
        let mut p: Vec<u32> = (1..=8).collect();
        p.extend([50, 51]);
        s.add(2, spec(p, 1)).unwrap();
        let plan = s.schedule();
        assert_eq!(
            plan.chunks,
            vec![PlannedChunk {
                id: 2,
                start: 8,
                len: 2,
                sample: true
            }]
        );
        assert_eq!(s.cached_tokens(2), 8);
        assert_eq!(s.stats.prefix_hit_tokens, 8);
    }

    #[test]
    fn preemption_recomputes_and_keeps_outputs_identical() {
        // Deterministic "model": the next token depends only on the sequence so far.
        let next = |id: SeqId, n: usize| 10 + ((id as usize * 31 + n * 7) % 50) as u32;
        let reqs: Vec<(SeqId, SeqSpec)> = (1..=4)
            .map(|id| {
                (
                    id,
                    SeqSpec {
                        prompt: vec![id as u32 + 1; 6],
                        max_tokens: 12,
                        stop_token_ids: vec![],
                    },
                )
            })
            .collect();
        let mut roomy = sched(64, 2, 64);
        let mut tight = sched(14, 2, 64);
        for (id, sp) in &reqs {
            roomy.add(*id, sp.clone()).unwrap();
            tight.add(*id, sp.clone()).unwrap();
        }
        let a = drive(&mut roomy, 200, next);
        let b = drive(&mut tight, 200, next);
        assert_eq!(roomy.stats.preemptions, 0);
        assert!(tight.stats.preemptions > 0, "the tight cache must preempt");
        assert_eq!(a, b);
        assert_eq!(tight.free_blocks(), 14);
    }

    #[test]
    fn a_full_partition_preempts_only_its_own_sequences() {
        let next = |id: SeqId, n: usize| 10 + ((id as usize * 13 + n * 5) % 40) as u32;
        let mut s = Scheduler::new(
            SchedulerConfig {
                max_num_seqs: 8,
                max_num_batched_tokens: 64,
                max_model_len: 16,
                max_waiting: 8,
            },
            PrefixCachingPool::partitioned(
                KvGeometry {
                    num_blocks: 8,
                    block_size: 4,
                },
                2,
                true,
            ),
        );
        let mut preempted = Vec::new();
        let mut step = |s: &mut Scheduler| {
            let plan = s.schedule();
            preempted.extend(plan.preempted.iter().copied());
            let sampled: Vec<(SeqId, u32)> = plan
                .chunks
                .iter()
                .filter(|c| c.sample)
                .map(|c| (c.id, next(c.id, s.tokens(c.id).map_or(0, <[u32]>::len))))
                .collect();
            s.complete_step(&plan, &sampled);
        };
        // 1 takes partition 0 and caches its prompt's two blocks.
        s.add(1, spec(vec![5; 8], 8)).unwrap();
        step(&mut s);
        // 4 shares that prefix, so it lands in partition 0 too; 2 and 3, newer, in partition 1.
        let mut four = vec![5; 8];
        four.extend([4, 4, 4]);
        s.add(4, spec(four, 4)).unwrap();
        s.add(2, spec(vec![2; 3], 5)).unwrap();
        s.add(3, spec(vec![3; 3], 5)).unwrap();
        for _ in 0..40 {
            step(&mut s);
            if !s.has_work() {
                break;
            }
        }
        assert!(!s.has_work());
        assert!(
            preempted.contains(&4),
            "partition 0 must overflow: {preempted:?}"
        );
        assert!(
            !preempted.contains(&2) && !preempted.contains(&3),
            "preempting partition 1 frees nothing for partition 0: {preempted:?}"
        );
        assert_eq!(s.free_blocks(), 8);
    }

    #[test]
    fn aborting_frees_blocks_wherever_the_sequence_is() {
        let mut s = sched(8, 4, 4);
        s.add(1, spec(vec![1; 10], 2)).unwrap();
        s.add(2, spec(vec![2; 3], 2)).unwrap();
        let p = s.schedule();
        s.complete_step(&p, &[]);
        assert!(s.free_blocks() < 8);
        assert!(s.abort(1));
        assert!(s.abort(2));
        assert!(!s.abort(2));
        assert_eq!(s.free_blocks(), 8);
        assert!(!s.has_work());
    }

    #[test]
    fn projected_usage_counts_what_running_sequences_will_still_need() {
        let mut s = sched(10, 4, 64);
        s.add(1, spec(vec![1; 4], 16)).unwrap();
        let p = s.schedule();
        s.complete_step(&p, &[(1, 5)]);
        assert!((s.kv_usage() - 0.1).abs() < 1e-9, "{}", s.kv_usage());
        assert!(
            (s.projected_kv_usage() - 0.5).abs() < 1e-9,
            "{}",
            s.projected_kv_usage()
        );
    }

    #[test]
    fn no_block_leaks_under_random_arrivals_aborts_and_preemption() {
        let mut s = sched(12, 2, 6);
        let mut rng = 99u64;
        let mut rand = move |m: u64| {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
            (rng >> 33) % m
        };
        let mut next_id = 0;
        for _ in 0..400 {
            if rand(3) == 0 {
                let _ = s.add(
                    next_id,
                    spec(
                        vec![1 + rand(4) as u32; 1 + rand(8) as usize],
                        1 + rand(6) as usize,
                    ),
                );
                next_id += 1;
            }
            if rand(10) == 0 {
                s.abort(rand(next_id.max(1)));
            }
            let plan = s.schedule();
            let sampled: Vec<(SeqId, u32)> = plan
                .chunks
                .iter()
                .filter(|c| c.sample)
                .map(|c| (c.id, 3 + rand(5) as u32))
                .collect();
            s.complete_step(&plan, &sampled);
        }
        for id in 0..next_id {
            s.abort(id);
        }
        assert_eq!(s.free_blocks(), 12);
    }
}
