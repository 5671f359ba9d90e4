//! In-process transport: one endpoint per rank, connected by channels (threads of one process).

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, Sender, channel};

use super::{DistError, Transport};

pub struct InProcess {
    rank: usize,
    peers: Vec<Sender<(usize, Vec<u8>)>>,
    inbox: Receiver<(usize, Vec<u8>)>,
    /// Messages that arrived early (from a rank already in its next collective), per source.
    pending: Vec<VecDeque<Vec<u8>>>,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("rank", &self.rank)
            .field("world", &self.peers.len())
            .finish()
    }
}

/// Endpoints for a group of `world` ranks; hand endpoint i to rank i's thread.
pub fn in_process_group(world: usize) -> Vec<InProcess> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..world).map(|_| channel()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, inbox)| InProcess {
            rank,
            peers: senders.clone(),
            inbox,
            pending: vec![VecDeque::new(); world],
        })
        .collect()
}

impl Transport for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.peers.len()
    }

    fn all_to_all(&mut self, mut parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, DistError> {
        let world = self.peers.len();
        if parts.len() != world {
            return Err(DistError::Config(format!(
                "all_to_all got {} parts for a world of {world}",
                parts.len()
            )));
        }
        let own = std::mem::take(&mut parts[self.rank]);
        for (dest, part) in parts.into_iter().enumerate() {
            if dest != self.rank {
                self.peers[dest]
                    .send((self.rank, part))
                    .map_err(|_| DistError::PeerLost {
                        rank: dest,
                        reason: "its thread has exited".into(),
                    })?;
            }
        }
        let mut out: Vec<Option<Vec<u8>>> = vec![None; world];
        out[self.rank] = Some(own);
        for src in 0..world {
            if out[src].is_none()
                && let Some(m) = self.pending[src].pop_front()
            {
                out[src] = Some(m);
            }
        }
        while out.iter().any(Option::is_none) {
            let missing = out.iter().position(Option::is_none).unwrap_or(0);
            let (src, msg) = self.inbox.recv().map_err(|_| DistError::PeerLost {
                rank: missing,
                reason: "every peer has exited".into(),
            })?;
            if out[src].is_none() {
                out[src] = Some(msg);
            } else {
                self.pending[src].push_back(msg);
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rank_receives_its_part_from_every_rank_over_many_rounds() {
        let group = in_process_group(3);
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut t| {
                std::thread::spawn(move || {
                    for round in 0..50u8 {
                        let parts = (0..3)
                            .map(|d| vec![t.rank() as u8, d as u8, round])
                            .collect();
                        let got = t.all_to_all(parts).unwrap();
                        for (src, m) in got.iter().enumerate() {
                            assert_eq!(m, &vec![src as u8, t.rank() as u8, round]);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
