//! A block pool with prefix caching, after vLLM v1's KV cache manager: every full block of
//! computed tokens is registered under a hash chained over all tokens before it, so a new
//! request whose prompt starts with the same tokens reuses those blocks instead of recomputing
//! them. Blocks are reference-counted; a block nobody holds stays cached until it is evicted,
//! least recently released first.
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

#[derive(Debug, Clone)]
pub struct PrefixCachingPool {
    geometry: KvGeometry,
    meta: Vec<BlockMeta>,
    /// Blocks with no holder, oldest release first: (block, generation at release).
    evictable: VecDeque<(u32, u64)>,
    /// Blocks never used or evicted and cleared: taken before evicting cached ones.
    never_used: Vec<u32>,
    by_hash: HashMap<u64, u32>,
    free_count: usize,
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

impl PrefixCachingPool {
    pub fn new(geometry: KvGeometry, enabled: bool) -> Self {
        PrefixCachingPool {
            geometry,
            meta: vec![BlockMeta::default(); geometry.num_blocks],
            evictable: VecDeque::new(),
            never_used: (0..geometry.num_blocks as u32).rev().collect(),
            by_hash: HashMap::new(),
            free_count: geometry.num_blocks,
            enabled,
        }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    /// Blocks that can be handed out now (unused, or cached but unheld).
    pub fn free_blocks(&self) -> usize {
        self.free_count
    }

    /// Fraction of blocks held by some sequence (`vllm:kv_cache_usage_perc`).
    pub fn usage(&self) -> f64 {
        if self.geometry.num_blocks == 0 {
            return 0.0;
        }
        1.0 - self.free_count as f64 / self.geometry.num_blocks as f64
    }

    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.geometry.block_size)
    }

    /// For a table that holds no blocks yet, attaches the longest run of cached full blocks that
    /// match the start of `tokens`, leaving at least one token to compute (its logits are needed).
    /// Returns the number of tokens whose KV is now already in the cache.
    pub fn match_prefix(&mut self, table: &mut BlockTable, tokens: &[u32]) -> usize {
        table.block_size = self.geometry.block_size;
        if !self.enabled || !table.blocks.is_empty() {
            return 0;
        }
        let bs = self.geometry.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        let mut h = CHAIN_SEED;
        for i in 0..max_blocks {
            let block_tokens = &tokens[i * bs..(i + 1) * bs];
            h = chain(h, block_tokens);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let m = &mut self.meta[b as usize];
            if m.cached.as_ref().map(|(_, t)| t.as_slice()) != Some(block_tokens) {
                break;
            }
            if m.refs == 0 {
                self.free_count -= 1;
            }
            m.refs += 1;
            table.blocks.push(b);
        }
        table.blocks.len() * bs
    }

    /// Grows `table` to cover `total_tokens`; all or nothing.
    pub fn reserve(&mut self, table: &mut BlockTable, total_tokens: usize) -> Result<(), KvError> {
        table.block_size = self.geometry.block_size;
        let needed = self
            .blocks_for(total_tokens)
            .saturating_sub(table.blocks.len());
        if needed > self.free_count {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free_count,
                total: self.geometry.num_blocks,
            });
        }
        for _ in 0..needed {
            let Some(b) = self.take_block() else {
                return Err(KvError::OutOfBlocks {
                    needed,
                    free: 0,
                    total: self.geometry.num_blocks,
                });
            };
            table.blocks.push(b);
        }
        Ok(())
    }

    fn take_block(&mut self) -> Option<u32> {
        let b = match self.never_used.pop() {
            Some(b) => b,
            None => loop {
                let (b, generation) = self.evictable.pop_front()?;
                let m = &self.meta[b as usize];
                if m.refs == 0 && m.generation == generation {
                    break b;
                }
            },
        };
        let m = &mut self.meta[b as usize];
        if let Some((h, _)) = m.cached.take()
            && self.by_hash.get(&h) == Some(&b)
        {
            self.by_hash.remove(&h);
        }
        m.refs = 1;
        self.free_count -= 1;
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
            let m = &mut self.meta[b as usize];
            m.refs = m.refs.saturating_sub(1);
            if m.refs == 0 {
                m.generation += 1;
                self.free_count += 1;
                if m.cached.is_some() {
                    self.evictable.push_back((b, m.generation));
                } else {
                    self.never_used.push(b);
                }
            }
        }
    }

    /// Forgets every cached prefix (blocks in use stay in use).
    pub fn reset_prefix_cache(&mut self) {
        self.by_hash.clear();
        for (b, m) in self.meta.iter_mut().enumerate() {
            m.cached = None;
            if m.refs == 0 {
                m.generation += 1;
                self.never_used.push(b as u32);
            }
        }
        self.never_used.sort_unstable_by(|a, b| b.cmp(a));
        self.never_used.dedup();
        self.evictable.clear();
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

    #[test]
    fn no_blocks_leak_over_many_random_requests() {
        let mut p = pool(16, 4);
        let mut state = 7u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let mut live: Vec<BlockTable> = Vec::new();
        for _ in 0..500 {
            if next() % 3 == 0 && !live.is_empty() {
                let i = next() as usize % live.len();
                let mut t = live.swap_remove(i);
                p.release(&mut t);
            } else {
                let len = 1 + next() as usize % 12;
                let prefix = next() % 3;
                let tokens: Vec<u32> = (0..len as u32)
                    .map(|i| if i < 6 { prefix * 100 + i } else { next() % 50 })
                    .collect();
                let mut t = BlockTable::default();
                p.match_prefix(&mut t, &tokens);
                if p.reserve(&mut t, tokens.len()).is_ok() {
                    p.cache_full_blocks(&t, &tokens, tokens.len());
                    live.push(t);
                } else {
                    p.release(&mut t);
                }
            }
            let held: usize = {
                let mut all: Vec<u32> =
                    live.iter().flat_map(|t| t.blocks.iter().copied()).collect();
                all.sort_unstable();
                all.dedup();
                all.len()
            };
            assert_eq!(p.free_blocks() + held, 16);
        }
        for mut t in live {
            p.release(&mut t);
        }
        assert_eq!(p.free_blocks(), 16);
        assert_eq!(p.usage(), 0.0);
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
