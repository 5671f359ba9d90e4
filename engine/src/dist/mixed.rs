//! The ranks of a multi-process group on GPUs, one GPU each, as the operator starts them: step
//! plans, logits and liveness over the group's TCP links (which heartbeat, so a lost rank is
//! named within the peer timeout), and the MoE rows device to device over NCCL.
//!
//! The ranks first agree over TCP whether NCCL can be used at all: every rank must load NCCL
//! and hold a GPU no other rank holds (NCCL refuses two ranks on one device). With
//! [`RowExchange::Auto`] a group that cannot falls back to staging the rows through host memory
//! over its TCP links, and says why; [`RowExchange::Nccl`] makes that an error instead. Rank 0
//! then draws NCCL's unique id and sends it over the links, and every rank joins the
//! communicator while watching the links, so a rank that dies during the join fails the others'
//! join instead of hanging it.

use super::nccl::{self, NcclTransport, wait_polling};
use super::tcp::LinkWatch;
use super::{DistError, Reader, TcpTransport, Transport, Writer};
use std::fmt;
use std::str::FromStr;
use std::sync::mpsc::{TryRecvError, channel};

/// How expert-parallel GPU ranks move the MoE rows between them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RowExchange {
    /// NCCL when every rank of the group can use it, else through host memory.
    #[default]
    Auto,
    /// NCCL, device to device; a group that cannot use it fails to start, saying why.
    Nccl,
    /// Through host memory over the group's own links (the CPU reference's messages).
    Host,
}

impl FromStr for RowExchange {
    type Err = DistError;
    fn from_str(s: &str) -> Result<Self, DistError> {
        match s {
            "auto" => Ok(RowExchange::Auto),
            "nccl" => Ok(RowExchange::Nccl),
            "host" => Ok(RowExchange::Host),
            other => Err(DistError::Config(format!(
                "unknown MoE exchange {other:?}: expected auto, nccl or host"
            ))),
        }
    }
}

impl fmt::Display for RowExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RowExchange::Auto => "auto",
            RowExchange::Nccl => "nccl",
            RowExchange::Host => "host",
        })
    }
}

/// What one rank brings to the decision: why it cannot use NCCL (if so) and its GPU's UUID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub nccl_missing: Option<String>,
    pub gpu: String,
}

impl Offer {
    /// This rank's offer for GPU `ordinal`.
    pub fn here(ordinal: usize) -> Offer {
        let gpu = cudarc::driver::CudaContext::new(ordinal)
            .and_then(|ctx| ctx.uuid())
            .map(|u| {
                u.bytes
                    .iter()
                    .map(|b| format!("{:02x}", *b as u8))
                    .collect::<String>()
            });
        match (nccl::unavailable_reason(), gpu) {
            (Some(why), _) => Offer {
                nccl_missing: Some(why),
                gpu: String::new(),
            },
            (None, Err(e)) => Offer {
                nccl_missing: Some(format!("GPU {ordinal} has no UUID: {e}")),
                gpu: String::new(),
            },
            (None, Ok(gpu)) => Offer {
                nccl_missing: None,
                gpu,
            },
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.str(self.nccl_missing.as_deref().unwrap_or(""))
            .str(&self.gpu);
        w.finish()
    }

    fn decode(bytes: &[u8], rank: usize) -> Result<Offer, DistError> {
        let mut r = Reader::new(bytes, rank);
        let missing = r.str()?;
        Ok(Offer {
            nccl_missing: (!missing.is_empty()).then_some(missing),
            gpu: r.str()?,
        })
    }
}

/// How the group will exchange rows, decided alike on every rank from every rank's offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Nccl,
    /// Through host memory, and why (for the log); empty when asked for.
    Host(String),
}

/// The group's choice: `offers[r]` is rank r's. Pure, so every rank decides the same.
pub fn decide(mode: RowExchange, offers: &[Offer]) -> Result<Decision, DistError> {
    if mode == RowExchange::Host {
        return Ok(Decision::Host(String::new()));
    }
    let mut why = None;
    for (rank, o) in offers.iter().enumerate() {
        if let Some(m) = &o.nccl_missing {
            why = Some(format!("rank {rank} cannot use NCCL: {m}"));
            break;
        }
        if let Some(first) = offers[..rank].iter().position(|p| p.gpu == o.gpu) {
            why = Some(format!(
                "ranks {first} and {rank} share GPU {}, and NCCL needs a GPU per rank",
                o.gpu
            ));
            break;
        }
    }
    match (why, mode) {
        (None, _) => Ok(Decision::Nccl),
        (Some(why), RowExchange::Nccl) => {
            Err(DistError::Config(format!("--moe-exchange nccl: {why}")))
        }
        (Some(why), _) => Ok(Decision::Host(why)),
    }
}

/// Control over TCP, MoE rows over NCCL (see the module's documentation).
pub struct MixedTransport {
    control: TcpTransport,
    rows: NcclTransport,
    watch: LinkWatch,
}

impl fmt::Debug for MixedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MixedTransport")
            .field("control", &self.control)
            .field("rows", &self.rows)
            .finish()
    }
}

impl MixedTransport {
    /// Ends the group on both paths after a failure on either: the NCCL communicator is
    /// aborted and the TCP links closed, so every peer stops waiting at once.
    fn abandon(&self, e: DistError) -> DistError {
        self.rows.abandon(&e.to_string());
        self.watch.close();
        e
    }
}

impl Transport for MixedTransport {
    fn rank(&self) -> usize {
        self.control.rank()
    }

    fn world_size(&self) -> usize {
        self.control.world_size()
    }

    fn all_to_all(&mut self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, DistError> {
        if let Err(e) = self.rows.failed() {
            return Err(self.abandon(e));
        }
        self.control.all_to_all(parts).map_err(|e| self.abandon(e))
    }

    fn check_alive(&mut self) -> Result<(), DistError> {
        if let Err(e) = self.rows.failed() {
            return Err(self.abandon(e));
        }
        self.control.check_alive().map_err(|e| self.abandon(e))
    }

    fn as_nccl(&mut self) -> Option<&mut NcclTransport> {
        Some(&mut self.rows)
    }
}

/// Sets up how this rank of a TCP group on GPU `ordinal` exchanges MoE rows: over NCCL (a
/// [`MixedTransport`]) when the group decides so, else the TCP transport itself. Every rank of
/// the group must call it at the same point.
pub fn rows_over(
    mut control: TcpTransport,
    ordinal: usize,
    mode: RowExchange,
) -> Result<Box<dyn Transport>, DistError> {
    let (rank, world) = (control.rank(), control.world_size());
    let offer = if mode == RowExchange::Host {
        Offer {
            nccl_missing: Some("not asked for".into()),
            gpu: String::new(),
        }
    } else {
        Offer::here(ordinal)
    };
    let got = control.all_to_all(vec![offer.encode(); world])?;
    let offers = got
        .iter()
        .enumerate()
        .map(|(r, b)| Offer::decode(b, r))
        .collect::<Result<Vec<_>, _>>()?;
    match decide(mode, &offers)? {
        Decision::Host(why) => {
            if !why.is_empty() && rank == 0 {
                tracing::warn!(reason = %why, "the MoE rows go through host memory");
            }
            return Ok(Box::new(control));
        }
        Decision::Nccl => {}
    }
    // Rank 0 draws the id, or tells everyone why it could not.
    let parts = if rank == 0 {
        let mut w = Writer::default();
        match nccl::new_unique_id() {
            Ok(id) => w.str("").bytes(&id),
            Err(e) => w.str(&e.to_string()).bytes(&[]),
        };
        vec![w.finish(); world]
    } else {
        vec![Vec::new(); world]
    };
    let got = control.all_to_all(parts)?;
    let mut r = Reader::new(&got[0], 0);
    let refused = r.str()?;
    if !refused.is_empty() {
        return Err(DistError::Config(format!(
            "rank 0 could not start the NCCL group: {refused}"
        )));
    }
    let id: [u8; nccl::ID_BYTES] = r.bytes()?.try_into().map_err(|_| DistError::Protocol {
        rank: 0,
        reason: "the NCCL id has the wrong length".into(),
    })?;
    let watch = control.watch()?;
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name(format!("nccl-init-{rank}"))
        .spawn(move || {
            let _ = tx.send(NcclTransport::from_id(id, rank, world, ordinal));
        })?;
    // NCCL's join is collective and has no timeout: wait while watching the links. A join
    // abandoned here leaves its thread blocked; the process is failing to start anyway.
    let mut joined = None;
    wait_polling(
        || match rx.try_recv() {
            Ok(r) => {
                joined = Some(r);
                Ok(true)
            }
            Err(TryRecvError::Empty) => Ok(false),
            Err(TryRecvError::Disconnected) => Err(DistError::Config(
                "the NCCL join thread ended without an answer".into(),
            )),
        },
        || watch.check(),
    )?;
    let mut rows =
        joined.ok_or_else(|| DistError::Config("the NCCL join gave nothing".into()))??;
    rows.set_watch(Box::new(watch.clone()));
    if rank == 0 {
        tracing::info!(world, "the MoE rows move between the ranks' GPUs over NCCL");
    }
    Ok(Box::new(MixedTransport {
        control,
        rows,
        watch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::{GroupEnv, TcpOptions};
    use std::time::Duration;

    const TEST_JOIN: Duration = Duration::from_secs(60);

    fn offer(gpu: &str) -> Offer {
        Offer {
            nccl_missing: None,
            gpu: gpu.into(),
        }
    }

    #[test]
    fn the_group_uses_nccl_only_when_every_rank_has_its_own_gpu_and_the_library() {
        let ok = [offer("a"), offer("b"), offer("c")];
        assert_eq!(decide(RowExchange::Auto, &ok).unwrap(), Decision::Nccl);
        assert_eq!(decide(RowExchange::Nccl, &ok).unwrap(), Decision::Nccl);
        assert_eq!(
            decide(RowExchange::Host, &ok).unwrap(),
            Decision::Host(String::new())
        );

        let shared = [offer("a"), offer("b"), offer("a")];
        let Decision::Host(why) = decide(RowExchange::Auto, &shared).unwrap() else {
            panic!("two ranks on one GPU chose NCCL");
        };
        assert!(why.contains("ranks 0 and 2 share GPU a"), "{why}");
        let err = decide(RowExchange::Nccl, &shared).unwrap_err().to_string();
        assert!(
            err.contains("--moe-exchange nccl") && err.contains("share GPU"),
            "{err}"
        );

        let missing = [
            offer("a"),
            Offer {
                nccl_missing: Some("libnccl.so was not found".into()),
                gpu: String::new(),
            },
        ];
        let Decision::Host(why) = decide(RowExchange::Auto, &missing).unwrap() else {
            panic!("a rank without NCCL chose NCCL");
        };
        assert!(why.contains("rank 1 cannot use NCCL: libnccl.so"), "{why}");
    }

    #[test]
    fn exchange_modes_parse_and_print() {
        for m in [RowExchange::Auto, RowExchange::Nccl, RowExchange::Host] {
            assert_eq!(m.to_string().parse::<RowExchange>().unwrap(), m);
        }
        let err = "gloo".parse::<RowExchange>().unwrap_err().to_string();
        assert!(err.contains("auto, nccl or host"), "{err}");
    }

    #[test]
    fn offers_round_trip() {
        let o = Offer {
            nccl_missing: Some("no driver".into()),
            gpu: String::new(),
        };
        assert_eq!(Offer::decode(&o.encode(), 1).unwrap(), o);
        let o = offer("0a1b");
        assert_eq!(Offer::decode(&o.encode(), 1).unwrap(), o);
        assert!(
            Offer::decode(&[1, 2], 4)
                .unwrap_err()
                .to_string()
                .contains("rank 4")
        );
    }

    /// A TCP group asked for host exchange keeps its links as they are, on every rank, with no
    /// GPU touched.
    #[test]
    fn a_group_asked_for_host_exchange_keeps_its_tcp_links() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let leader = format!("127.0.0.1:{port}");
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let env = GroupEnv {
                    rank,
                    world_size: 2,
                    leader_addr: leader.clone(),
                };
                std::thread::spawn(move || {
                    let t = TcpTransport::connect(&env, TcpOptions::new(TEST_JOIN)).unwrap();
                    let mut t = rows_over(t, 0, RowExchange::Host).unwrap();
                    assert!(t.as_nccl().is_none());
                    t.all_to_all(vec![vec![rank as u8]; 2]).unwrap()
                })
            })
            .collect();
        for h in ranks {
            assert_eq!(h.join().unwrap(), vec![vec![0], vec![1]]);
        }
    }
}
