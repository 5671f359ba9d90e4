//! Paged KV-cache bookkeeping: a fixed pool of blocks (64 token slots each by default) shared by
//! the MLA latent cache and the indexer key cache of every layer, a free-list allocator, and the
//! per-sequence block table that maps a token position to its global slot
//! (`block_id * block_size + offset`, the index FlashMLA's sparse kernels take).
//!
//! This module holds no tensors: backends size their storage from [`KvGeometry`] and address it
//! through [`BlockTable::slot`]. The shape follows vLLM's KV manager: allocation is all-or-nothing
//! so a scheduler can preempt when it fails.

use thiserror::Error;

mod prefix;
pub use prefix::PrefixCachingPool;

pub const DEFAULT_BLOCK_SIZE: usize = 64;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache exhausted: {needed} blocks needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error(
        "position {pos} is not covered by the sequence's {blocks} blocks of {block_size} slots"
    )]
    PositionNotMapped {
        pos: usize,
        blocks: usize,
        block_size: usize,
    },
}

/// The cache's shape, fixed at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub num_blocks: usize,
    pub block_size: usize,
}

impl KvGeometry {
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
}

/// Free-list allocator over block ids `0..num_blocks`.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    geometry: KvGeometry,
    /// Free ids; popped from the end so recently freed (cache-warm) blocks are reused first.
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(geometry: KvGeometry) -> Self {
        let free = (0..geometry.num_blocks as u32).rev().collect();
        BlockAllocator { geometry, free }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.geometry.num_blocks - self.free.len()
    }

    /// Fraction of blocks in use, 0..=1 (the `vllm:kv_cache_usage_perc` gauge).
    pub fn usage(&self) -> f64 {
        if self.geometry.num_blocks == 0 {
            return 0.0;
        }
        self.used_blocks() as f64 / self.geometry.num_blocks as f64
    }

    /// Blocks needed to hold `tokens` slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.geometry.block_size)
    }

    /// Grows `table` so it covers `total_tokens` positions; all or nothing.
    pub fn reserve(&mut self, table: &mut BlockTable, total_tokens: usize) -> Result<(), KvError> {
        let needed = self
            .blocks_for(total_tokens)
            .saturating_sub(table.blocks.len());
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len(),
                total: self.geometry.num_blocks,
            });
        }
        for _ in 0..needed {
            // `needed <= free.len()` was checked above.
            if let Some(b) = self.free.pop() {
                table.blocks.push(b);
            }
        }
        table.block_size = self.geometry.block_size;
        Ok(())
    }

    /// Returns every block of `table` to the pool and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
    }
}

/// One sequence's blocks, in position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    pub block_size: usize,
}

impl BlockTable {
    pub fn capacity(&self) -> usize {
        self.blocks.len() * self.block_size
    }

    /// Global slot of token position `pos`.
    pub fn slot(&self, pos: usize) -> Result<usize, KvError> {
        let block_size = self.block_size.max(1);
        match self.blocks.get(pos / block_size) {
            Some(b) => Ok(*b as usize * block_size + pos % block_size),
            None => Err(KvError::PositionNotMapped {
                pos,
                blocks: self.blocks.len(),
                block_size: self.block_size,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(blocks: usize, size: usize) -> BlockAllocator {
        BlockAllocator::new(KvGeometry {
            num_blocks: blocks,
            block_size: size,
        })
    }

    #[test]
    fn reserving_rounds_up_to_whole_blocks_and_maps_positions_to_slots() {
        let mut a = alloc(4, 64);
        let mut t = BlockTable::default();
        a.reserve(&mut t, 65).unwrap();
        assert_eq!(t.blocks.len(), 2);
        assert_eq!(a.free_blocks(), 2);
        assert_eq!(t.slot(0).unwrap(), t.blocks[0] as usize * 64);
        assert_eq!(t.slot(64).unwrap(), t.blocks[1] as usize * 64);
        assert_eq!(
            t.slot(130),
            Err(KvError::PositionNotMapped {
                pos: 130,
                blocks: 2,
                block_size: 64
            })
        );
    }

    #[test]
    fn growing_a_table_only_takes_the_missing_blocks() {
        let mut a = alloc(4, 4);
        let mut t = BlockTable::default();
        a.reserve(&mut t, 3).unwrap();
        a.reserve(&mut t, 4).unwrap();
        assert_eq!(t.blocks.len(), 1);
        a.reserve(&mut t, 5).unwrap();
        assert_eq!(t.blocks.len(), 2);
        assert!((a.usage() - 0.5).abs() < 1e-12);
    }

    #[test]
    fn an_allocation_that_does_not_fit_takes_nothing() {
        let mut a = alloc(2, 4);
        let mut t = BlockTable::default();
        a.reserve(&mut t, 4).unwrap();
        let mut u = BlockTable::default();
        assert_eq!(
            a.reserve(&mut u, 9),
            Err(KvError::OutOfBlocks {
                needed: 3,
                free: 1,
                total: 2
            })
        );
        assert!(u.blocks.is_empty());
        assert_eq!(a.free_blocks(), 1);
    }

    #[test]
    fn released_blocks_are_reused_and_tables_never_share_a_block() {
        let mut a = alloc(3, 2);
        let mut t = BlockTable::default();
        let mut u = BlockTable::default();
        a.reserve(&mut t, 4).unwrap();
        a.reserve(&mut u, 2).unwrap();
        assert!(t.blocks.iter().all(|b| !u.blocks.contains(b)));
        a.release(&mut t);
        assert_eq!(a.free_blocks(), 2);
        assert!(t.blocks.is_empty());
        let mut v = BlockTable::default();
        a.reserve(&mut v, 4).unwrap();
        assert_eq!(a.free_blocks(), 0);
        assert!(v.blocks.iter().all(|b| !u.blocks.contains(b)));
    }
}
