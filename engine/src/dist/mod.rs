//! Expert parallelism: one model replica spread over W ranks. Attention and dense layers are
//! replicated and run data-parallel (each rank serves its own sequences); the routed experts are
//! split into W contiguous ranges; at every MoE layer tokens are dispatched to the ranks owning
//! their chosen experts and the results combined back (two all-to-alls), as DeepSeek and SGLang
//! deploy it. Ranks with no tokens still take part, so collectives never hang.
//!
//! One collective, [`Transport::all_to_all`], carries everything (step plans, expert traffic,
//! logits). Implementations: in-process channels (tests, `--expert-parallel N` on the CPU),
//! TCP through the leader (multi-pod groups), NCCL (ranks on GPUs of one process), and TCP for
//! control with NCCL for the MoE rows (GPU ranks in separate processes, [`mixed`]). Every rank must call collectives in the same
//! order; messages are matched per source in FIFO order.

mod inproc;
pub mod mixed;
pub mod nccl;
mod tcp;
mod wire;

use thiserror::Error;

pub use inproc::in_process_group;
pub use mixed::{MixedTransport, RowExchange};
pub use nccl::NcclTransport;
pub use tcp::{DEFAULT_PEER_TIMEOUT, GroupEnv, LinkWatch, TcpOptions, TcpTransport};
pub use wire::{Reader, Writer};

#[derive(Debug, Error)]
pub enum DistError {
    #[error("rank {rank} disconnected: {reason}")]
    PeerLost { rank: usize, reason: String },
    /// Nothing, not even a heartbeat, came from the rank within the peer timeout.
    #[error("rank {rank} has been silent for {secs} s")]
    Silent { rank: usize, secs: f64 },
    #[error("ranks {missing:?} of {world} did not join the group at {leader} within {timeout_s}s")]
    JoinTimeout {
        missing: Vec<usize>,
        world: usize,
        leader: String,
        timeout_s: u64,
    },
    #[error("could not reach the group leader at {leader}: {reason}")]
    LeaderUnreachable { leader: String, reason: String },
    #[error("group configuration: {0}")]
    Config(String),
    #[error("malformed message from rank {rank}: {reason}")]
    Protocol { rank: usize, reason: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// A rank's connection to the rest of its group.
pub trait Transport: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sends `parts[j]` to rank j (the own part is looped back) and returns what every rank sent
    /// to this one, indexed by source rank.
    fn all_to_all(&mut self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, DistError>;
    /// Between collectives: an error once a peer is known to be gone or silent, so an idle
    /// group notices without a collective. Links that cannot fail this way keep the default.
    fn check_alive(&mut self) -> Result<(), DistError> {
        Ok(())
    }
    /// The NCCL endpoint behind this transport, for exchanges of device buffers that must not
    /// pass through host memory (the MoE rows); `None` for host transports.
    fn as_nccl(&mut self) -> Option<&mut NcclTransport> {
        None
    }
}

/// Which routed experts this rank holds: a contiguous range of `n_experts / world`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpertShard {
    pub rank: usize,
    pub world: usize,
}

impl ExpertShard {
    pub const WHOLE: ExpertShard = ExpertShard { rank: 0, world: 1 };

    pub fn new(rank: usize, world: usize, n_experts: usize) -> Result<Self, DistError> {
        if world == 0 || rank >= world {
            return Err(DistError::Config(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        if n_experts > 0 && !n_experts.is_multiple_of(world) {
            return Err(DistError::Config(format!(
                "{n_experts} routed experts cannot be split evenly over {world} expert-parallel ranks"
            )));
        }
        Ok(ExpertShard { rank, world })
    }

    pub fn per_rank(&self, n_experts: usize) -> usize {
        n_experts / self.world.max(1)
    }

    pub fn owner(&self, expert: usize, n_experts: usize) -> usize {
        expert / self.per_rank(n_experts).max(1)
    }

    pub fn owns(&self, expert: usize, n_experts: usize) -> bool {
        self.owner(expert, n_experts) == self.rank
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experts_split_into_contiguous_ranges() {
        let s = ExpertShard::new(1, 4, 256).unwrap();
        assert_eq!(s.per_rank(256), 64);
        assert!(s.owns(64, 256) && s.owns(127, 256) && !s.owns(128, 256));
        assert_eq!(s.owner(255, 256), 3);
    }

    #[test]
    fn an_uneven_split_is_refused() {
        let e = ExpertShard::new(0, 3, 8).unwrap_err().to_string();
        assert!(e.contains("8 routed experts") && e.contains("3"), "{e}");
        assert!(ExpertShard::new(4, 4, 8).is_err());
    }
}
