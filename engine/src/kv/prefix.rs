//! A block pool with prefix caching, after vLLM v1's KV cache manager: every full block of
//! computed tokens is registered under a hash chained over all tokens before it, so a new
//! request whose prompt starts with the same tokens reuses those blocks instead of recomputing
//! them. Blocks are reference-counted; a block nobody holds stays cached until it is evicted,
//! least recently released first.
//!
//! The pool may be split into equal partitions, one per rank of an expert-parallel group, each
//! rank holding its own partition's cache (data-parallel attention): block `b` lives in
//! partition `b / blocks_per_partition`, and every block of one table comes from one partition.
//! A new table takes the partition with the most free blocks; a prefix match stops where the
//! cached chain leaves the first block's partition.
//!
//! Complexity: allocation and release are O(blocks touched); eviction is O(1) amortised.

use std::collections::{HashMap, VecDeque};

use super::{BlockTable, KvError, KvGeometry};

#[derive(Debug, Clone, Default)]
struct BlockMeta {
    refs: u32,
    /// Chained hash and the block's own tokens (to rule out hash collisions) while cached.
    cached: Option<(u64, Vec<u32>)>,
    /// Bumped on each release, so stale entries in the eviction queue can be skipped.
    generation: u64,
}

/// One partition's free blocks.
#[derive(Debug, Clone, Default)]
struct Partition {
    /// Blocks with no holder, oldest release first: (block, generation at release).
    evictable: VecDeque<(u32, u64)>,
    /// Blocks never used or evicted and cleared: taken before evicting cached ones.
    never_used: Vec<u32>,
    free_count: usize,
}

#[derive(Debug, Clone)]
pub struct PrefixCachingPool {
    geometry: KvGeometry,
    per_partition: usize,
    meta: Vec<BlockMeta>,
    parts: Vec<Partition>,
    by_hash: HashMap<u64, u32>,
    enabled: bool,
}

/// Seed of the hash chain (any fixed value).
const CHAIN_SEED: u64 = 0x8422_2325_cbf2_9ce4;

fn chain(prev: u64, tokens: &[u32]) -> u64 {
    let mut h = prev ^ 0x9e37_79b9_7f4a_7c15;
    for t in tokens {
        h = (h ^ *t as u64)
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(23);
    }
    h
}

/// The partition of block `b` with `per` blocks in each of `count` partitions.
fn partition_index(b: usize, per: usize, count: usize) -> usize {
    (b / per.max(1)).min(count - 1)
}

impl PrefixCachingPool {
    /// One pool over all of `geometry`'s blocks.
    pub fn new(geometry: KvGeometry, enabled: bool) -> Self {
        Self::partitioned(geometry, 1, enabled)
    }

    /// `partitions` equal partitions of `geometry.num_blocks / partitions` blocks each (blocks
    /// past the last whole partition are not used; at least one partition).
    pub fn partitioned(geometry: KvGeometry, partitions: usize, enabled: bool) -> Self {
        let partitions = partitions.max(1);
        let per_partition = geometry.num_blocks / partitions;
        let geometry = KvGeometry {
            num_blocks: per_partition * partitions,
            block_size: geometry.block_size,
        };
        let parts = (0..partitions)
            .map(|p| {
                let lo = (p * per_partition) as u32;
                Partition {
                    evictable: VecDeque::new(),
                    never_used: (lo..lo + per_partition as u32).rev().collect(),
                    free_count: per_partition,
                }
            })
            .collect();
        PrefixCachingPool {
            geometry,
            per_partition,
            meta: vec![BlockMeta::default(); geometry.num_blocks],
            parts,
            by_hash: HashMap::new(),
            enabled,
        }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    pub fn partitions(&self) -> usize {
        self.parts.len()
    }

    /// Blocks one table can ever hold: one partition's.
    pub fn blocks_per_partition(&self) -> usize {
        self.per_partition
    }

    fn partition_of_block(&self, b: u32) -> usize {
        partition_index(b as usize, self.per_partition, self.parts.len())
    }

    /// The partition `table`'s blocks come from, or `None` while it holds none.
    pub fn partition_of(&self, table: &BlockTable) -> Option<usize> {
        table.blocks.first().map(|b| self.partition_of_block(*b))
    }

    /// Blocks that can be handed out now (unused, or cached but unheld), over all partitions.
    pub fn free_blocks(&self) -> usize {
        self.parts.iter().map(|p| p.free_count).sum()
    }

    /// Fraction of blocks held by some sequence (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.geometry.num_blocks == 0 {
            return 0.0;
        }
        1.0 - self.free_blocks() as f64 / self.geometry.num_blocks as f64
    }

    /// The largest fraction of one partition's blocks held by some sequence: with one partition
    /// per expert-parallel rank, a sequence can only take blocks of its own partition, so a full
    /// partition preempts while [`Self::usage`], the mean over all of them, still reads lower.
    pub fn fullest_partition_usage(&self) -> f64 {
        if self.per_partition == 0 {
            return 0.0;
        }
        self.parts
            .iter()
            .map(|p| 1.0 - p.free_count as f64 / self.per_partition as f64)
            .fold(0.0, f64::max)
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.geometry.block_size)
    }

    /// For a table that holds no blocks yet, attaches the longest run of cached full blocks that
    /// match the start of `tokens` within one partition, leaving at least one token to compute
    /// (its logits are needed). Returns the number of tokens whose KV is now already in the cache.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        table.block_size = self.geometry.block_size;
        if !self.enabled || !table.blocks.is_empty() {
            return 0;
        }
        let bs = self.geometry.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut h = CHAIN_SEED;
        let mut partition = None;
        for i in 0..max_blocks {
            let block_tokens = &tokens[i * bs..(i + 1) * bs];
            h = chain(h, block_tokens);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let p = self.partition_of_block(b);
            if *partition.get_or_insert(p) != p {
                break;
            }
            let m = &mut self.meta[b as usize];
            if m.cached.as_ref().map(|(_, t)| t.as_slice()) != Some(block_tokens) {
                break;
            }
            if m.refs == 0 {
                self.parts[p].free_count -= 1;
            }
            m.refs += 1;
            table.blocks.push(b);
        }
        table.blocks.len() * bs
    }

    /// Grows `table` to cover `total_tokens` from its partition (a table with no blocks yet
    /// takes the partition with the most free blocks); all or nothing.
    pub fn reserve(&mut self, table: &mut BlockTable, total_tokens: usize) -> Result<(), KvError> {
        table.block_size = self.geometry.block_size;
        let needed = self
            .blocks_for(total_tokens)
            .saturating_sub(table.blocks.len());
        if needed == 0 {
            return Ok(());
        }
        let p = match self.partition_of(table) {
            Some(p) => p,
            None => (0..self.parts.len())
                .max_by_key(|p| (self.parts[*p].free_count, std::cmp::Reverse(*p)))
                .unwrap_or(0),
        };
        let free = self.parts[p].free_count;
        if needed > free {
            return Err(KvError::OutOfBlocks {
                needed,
                free,
                total: self.per_partition,
            });
        }
        for _ in 0..needed {
            let Some(b) = self.take_block(p) else {
                return Err(KvError::OutOfBlocks {
                    needed,
                    free: 0,
                    total: self.per_partition,
                });
            };
            table.blocks.push(b);
        }
        Ok(())
    }

    fn take_block(&mut self, p: usize) -> Option<u32> {
        let part = &mut self.parts[p];
        let b = match part.never_used.pop() {
            Some(b) => b,
            None => loop {
                let (b, generation) = part.evictable.pop_front()?;
                let m = &self.meta[b as usize];
                if m.refs == 0 && m.generation == generation {
                    break b;
                }
            },
        };
        part.free_count -= 1;
        let m = &mut self.meta[b as usize];
        if let Some((h, _)) = m.cached.take()
            && self.by_hash.get(&h) == Some(&b)
        {
            self.by_hash.remove(&h);
        }
        m.refs = 1;
        Some(b)
    }

    /// Registers the full blocks among the first `computed` tokens of `tokens` (held by `table`)
    /// so later requests can share them.
    pub fn cache_full_blocks(&mut self, table: &BlockTable, tokens: &[u32], computed: usize) {
        if !self.enabled {
            return;
        }
        let bs = self.geometry.block_size;
        let full = (computed.min(tokens.len()) / bs).min(table.blocks.len());
        let mut h = CHAIN_SEED;
        for i in 0..full {
            let block_tokens = &tokens[i * bs..(i + 1) * bs];
            h = chain(h, block_tokens);
            let b = table.blocks[i];
            let m = &mut self.meta[b as usize];
            if m.cached.is_some() {
                continue;
            }
            // Another block may already hold this prefix; keep the first one registered.
            if self.by_hash.contains_key(&h) {
                continue;
            }
            m.cached = Some((h, block_tokens.to_vec()));
            self.by_hash.insert(h, b);
        }
    }

    /// Drops the table's hold on its blocks; blocks no one else holds become evictable
    /// (cached ones stay findable until then) and the table is emptied.
    pub fn release(&mut self, table: &mut BlockTable) {
        // Release the tail first so the deepest (least shareable) blocks are evicted first.
        for b in table.blocks.drain(..).rev() {
            let p = self.partition_of_block(b);
            let m = &mut self.meta[b as usize];
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                m.generation += 1;
                let part = &mut self.parts[p];
                part.free_count += 1;
                if m.cached.is_some() {
                    part.evictable.push_back((b, m.generation));
                } else {
                    part.never_used.push(b);
                }
            }
        }
    }

    /// Forgets every cached prefix (blocks in use stay in use).
    pub fn reset_prefix_cache(&mut self) {
        self.by_hash.clear();
        for part in &mut self.parts {
            part.evictable.clear();
        }
        let (per, count) = (self.per_partition, self.parts.len());
        for (b, m) in self.meta.iter_mut().enumerate() {
            m.cached = None;
            if m.refs == 0 {
                m.generation += 1;
                let p = partition_index(b, per, count);
                self.parts[p].never_used.push(b as u32);
            }
        }
        for part in &mut self.parts {
            part.never_used.sort_unstable_by(|a, b| b.cmp(a));
            part.never_used.dedup();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(blocks: usize, size: usize) -> PrefixCachingPool {
        PrefixCachingPool::new(
            KvGeometry {
                num_blocks: blocks,
                block_size: size,
            },
            true,
        )
    }

    fn run(p: &mut PrefixCachingPool, tokens: &[u32]) -> (BlockTable, usize) {
        let mut t = BlockTable::default();
        let hit = p.match_prefix(&mut t, tokens);
        p.reserve(&mut t, tokens.len()).unwrap();
        p.cache_full_blocks(&t, tokens, tokens.len());
        (t, hit)
    }

    #[test]
    fn a_shared_prompt_prefix_reuses_the_same_blocks() {
        let mut p = pool(8, 4);
        let a: Vec<u32> = (0..10).collect();
        let (ta, hit) = run(&mut p, &a);
        assert_eq!(hit, 0);
        let mut b: Vec<u32> = (0..8).collect();
        b.extend([99, 98, 97]);
        let (tb, hit) = run(&mut p, &b);
        assert_eq!(hit, 8);
        assert_eq!(tb.blocks[..2], ta.blocks[..2]);
        assert_ne!(tb.blocks[2], ta.blocks[2]);
        assert_eq!(p.free_blocks(), 8 - 3 - 1);
    }

    #[test]
    fn a_match_always_leaves_a_token_to_compute() {
        let mut p = pool(8, 4);
        let a: Vec<u32> = (0..8).collect();
        let (mut ta, _) = run(&mut p, &a);
        p.release(&mut ta);
        let (_, hit) = run(&mut p, &a);
        assert_eq!(
            hit, 4,
            "the last full block is recomputed so the prompt's logits exist"
        );
    }

    #[test]
    fn released_prefixes_stay_cached_until_evicted() {
        let mut p = pool(3, 2);
        let a = [1, 2, 3, 4, 5];
        let (mut ta, _) = run(&mut p, &a);
        p.release(&mut ta);
        assert_eq!(p.free_blocks(), 3);
        let (mut tb, hit) = run(&mut p, &a);
        assert_eq!(hit, 4);
        p.release(&mut tb);
        // An unrelated request needing every block evicts the cache.
        let (mut tc, hit) = run(&mut p, &[9, 9, 9, 9, 9, 9]);
        assert_eq!(hit, 0);
        p.release(&mut tc);
        let (_, hit) = run(&mut p, &a);
        assert_eq!(hit, 0);
    }

    #[test]
    fn a_held_cached_block_is_never_evicted() {
        let mut p = pool(3, 2);
        let (ta, _) = run(&mut p, &[1, 2, 3]);
        let mut t = BlockTable::default();
        assert!(p.reserve(&mut t, 4).is_err(), "only one block is free");
        p.reserve(&mut t, 2).unwrap();
        assert!(t.blocks.iter().all(|b| !ta.blocks.contains(b)));
    }

    fn parts(partitions: usize, per: usize, size: usize) -> PrefixCachingPool {
        PrefixCachingPool::partitioned(
            KvGeometry {
                num_blocks: partitions * per,
                block_size: size,
            },
            partitions,
            true,
        )
    }

    #[test]
    fn the_fullest_partition_reads_full_while_the_mean_reads_half() {
        let mut p = parts(2, 4, 2);
        assert_eq!((p.usage(), p.fullest_partition_usage()), (0.0, 0.0));
        // One sequence takes all four blocks of a partition (8 tokens of 2 a block).
        let mut t = BlockTable::default();
        p.reserve(&mut t, 8).unwrap();
        assert!(one_partition(&p, &t));
        assert!((p.usage() - 0.5).abs() < 1e-12, "{}", p.usage());
        assert!((p.fullest_partition_usage() - 1.0).abs() < 1e-12);
        // A second takes one block of the other partition.
        let mut u = BlockTable::default();
        p.reserve(&mut u, 1).unwrap();
        assert!((p.fullest_partition_usage() - 1.0).abs() < 1e-12);
        p.release(&mut t);
        assert!((p.fullest_partition_usage() - 0.25).abs() < 1e-12);
        // One partition: the same as the mean.
        let mut q = parts(1, 4, 2);
        let mut v = BlockTable::default();
        q.reserve(&mut v, 3).unwrap();
        assert_eq!(q.fullest_partition_usage(), q.usage());
    }

    fn one_partition(p: &PrefixCachingPool, t: &BlockTable) -> bool {
        let per = p.blocks_per_partition() as u32;
        t.blocks.iter().all(|b| b / per == t.blocks[0] / per)
    }

    /// Random requests (shared prefixes of `shared` tokens, lengths up to `max_len`) and random
    /// releases; after each, every held block is counted once and no table spans partitions.
    fn churn(p: &mut PrefixCachingPool, seed: u64, rounds: usize, max_len: usize, shared: u32) {
        let total = p.geometry().num_blocks;
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut live: Vec<BlockTable> = Vec::new();
        for _ in 0..rounds {
            if next() % 3 == 0 && !live.is_empty() {
                let i = next() as usize % live.len();
                let mut t = live.swap_remove(i);
                p.release(&mut t);
            } else {
                let len = 1 + next() as usize % max_len;
                let prefix = next() % 3;
                let tokens: Vec<u32> = (0..len as u32)
                    .map(|i| {
                        if i < shared {
                            prefix * 100 + i
                        } else {
                            next() % 50
                        }
                    })
                    .collect();
                let mut t = BlockTable::default();
                p.match_prefix(&mut t, &tokens);
                if p.reserve(&mut t, tokens.len()).is_ok() {
                    p.cache_full_blocks(&t, &tokens, tokens.len());
                    assert!(one_partition(p, &t), "{:?}", t.blocks);
                    live.push(t);
                } else {
                    p.release(&mut t);
                }
            }
            let mut all: Vec<u32> = live.iter().flat_map(|t| t.blocks.iter().copied()).collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(p.free_blocks() + all.len(), total);
        }
        for mut t in live {
            p.release(&mut t);
        }
        assert_eq!(p.free_blocks(), total);
        assert_eq!(p.usage(), 0.0);
    }

    #[test]
    fn no_blocks_leak_over_many_random_requests() {
        churn(&mut pool(16, 4), 7, 500, 12, 6);
    }

    #[test]
    fn each_table_stays_in_one_partition_and_new_ones_go_where_most_is_free() {
        let mut p = parts(2, 4, 2);
        assert_eq!((p.partitions(), p.geometry().num_blocks), (2, 8));
        let mut a = BlockTable::default();
        p.reserve(&mut a, 6).unwrap();
        assert_eq!(p.partition_of(&a), Some(0));
        let mut b = BlockTable::default();
        p.reserve(&mut b, 2).unwrap();
        assert_eq!(
            p.partition_of(&b),
            Some(1),
            "partition 1 had more free blocks"
        );
        // a grows within partition 0 only: one block left there, though partition 1 has three.
        p.reserve(&mut a, 8).unwrap();
        assert!(one_partition(&p, &a));
        let err = p.reserve(&mut a, 10).unwrap_err();
        assert!(
            matches!(
                err,
                KvError::OutOfBlocks {
                    needed: 1,
                    free: 0,
                    total: 4
                }
            ),
            "{err:?}"
        );
        assert_eq!(p.free_blocks(), 3);
        // A new table can take at most one partition's blocks.
        let mut c = BlockTable::default();
        assert!(p.reserve(&mut c, 8).is_err());
        p.reserve(&mut c, 6).unwrap();
        assert_eq!(p.partition_of(&c), Some(1));
        for t in [&mut a, &mut b, &mut c] {
            p.release(t);
        }
        assert_eq!(p.free_blocks(), 8);
    }

    #[test]
    fn a_prefix_match_never_crosses_partitions() {
        let mut p = parts(2, 4, 2);
        // The first two blocks of the prompt are cached in partition 0...
        let prompt = [1, 2, 3, 4, 5, 6, 7];
        let mut a = BlockTable::default();
        p.reserve(&mut a, 4).unwrap();
        p.cache_full_blocks(&a, &prompt, 4);
        // ...and the third in partition 1 (a sequence that computed the same prefix there,
        // while the first two were already registered).
        let mut filler = BlockTable::default();
        p.reserve(&mut filler, 2).unwrap();
        assert_eq!(p.partition_of(&filler), Some(1));
        let mut b = BlockTable::default();
        p.reserve(&mut b, 6).unwrap();
        assert_eq!(p.partition_of(&b), Some(1));
        p.cache_full_blocks(&b, &prompt, 6);
        let mut t = BlockTable::default();
        assert_eq!(p.match_prefix(&mut t, &prompt), 4);
        assert!(one_partition(&p, &t));
        assert_eq!(t.blocks[..], a.blocks[..]);
    }

    #[test]
    fn no_blocks_leak_and_no_table_spans_partitions_under_random_requests() {
        let mut p = parts(3, 6, 4);
        churn(&mut p, 11, 600, 20, 9);
        p.reset_prefix_cache();
        assert_eq!(p.free_blocks(), 18);
    }

    #[test]
    fn disabled_prefix_caching_never_matches() {
        let mut p = PrefixCachingPool::new(
            KvGeometry {
                num_blocks: 4,
                block_size: 2,
            },
            false,
        );
        let (mut t, _) = run(&mut p, &[1, 2, 3, 4, 5]);
        p.release(&mut t);
        assert_eq!(run(&mut p, &[1, 2, 3, 4, 5]).1, 0);
    }
}
