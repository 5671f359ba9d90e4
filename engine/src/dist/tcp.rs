//! TCP transport for CPU groups spread over processes or pods: a star through the leader
//! (rank 0 listens at `LEADER_ADDR`; every other rank connects to it). In an all-to-all each
//! worker sends the leader all its parts in one frame; the leader routes them and answers each
//! worker with the parts addressed to it. Collectives are lockstep, so per-connection order
//! matches parts to rounds.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::{DistError, Transport};

/// Group membership as the operator sets it in the pod environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEnv {
    pub rank: usize,
    pub world_size: usize,
    /// host:port of rank 0's group listener.
    pub leader_addr: String,
}

impl GroupEnv {
    /// `RANK`, `WORLD_SIZE`, `LEADER_ADDR`; `None` when none is set (a single-process engine).
    pub fn from_env() -> Result<Option<Self>, DistError> {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (rank, world, leader) = (get("RANK"), get("WORLD_SIZE"), get("LEADER_ADDR"));
        if rank.is_none() && world.is_none() && leader.is_none() {
            return Ok(None);
        }
        let parse = |k: &str, v: Option<String>| -> Result<usize, DistError> {
            v.ok_or_else(|| {
                DistError::Config(format!(
                    "{k} is not set (RANK, WORLD_SIZE and LEADER_ADDR go together)"
                ))
            })?
            .parse()
            .map_err(|_| DistError::Config(format!("{k} must be a non-negative integer")))
        };
        let env = GroupEnv {
            rank: parse("RANK", rank)?,
            world_size: parse("WORLD_SIZE", world)?,
            leader_addr: leader
                .ok_or_else(|| DistError::Config("LEADER_ADDR is not set".into()))?,
        };
        if env.world_size == 0 || env.rank >= env.world_size {
            return Err(DistError::Config(format!(
                "RANK {} is outside WORLD_SIZE {}",
                env.rank, env.world_size
            )));
        }
        Ok(Some(env))
    }
}

const MAGIC: u32 = 0x4453_4550; // "DSEP"

fn write_frame(w: &mut impl Write, parts: &[Vec<u8>]) -> std::io::Result<()> {
    w.write_all(&(parts.len() as u32).to_le_bytes())?;
    for p in parts {
        w.write_all(&(p.len() as u64).to_le_bytes())?;
        w.write_all(p)?;
    }
    w.flush()
}

fn read_frame(r: &mut impl Read, max_parts: usize) -> std::io::Result<Vec<Vec<u8>>> {
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    let n = u32::from_le_bytes(b4) as usize;
    if n > max_parts {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("frame of {n} parts"),
        ));
    }
    let mut parts = Vec::with_capacity(n);
    for _ in 0..n {
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b8)?;
        let len = u64::from_le_bytes(b8) as usize;
        let mut p = Vec::new();
        r.by_ref().take(len as u64).read_to_end(&mut p)?;
        if p.len() != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "truncated frame",
            ));
        }
        parts.push(p);
    }
    Ok(parts)
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Conn {
    fn new(s: TcpStream) -> std::io::Result<Self> {
        s.set_nodelay(true)?;
        Ok(Conn {
            reader: BufReader::new(s.try_clone()?),
            writer: BufWriter::new(s),
        })
    }
}

pub struct TcpTransport {
    rank: usize,
    world: usize,
    /// On the leader: connections to ranks 1..world (index rank - 1). On a worker: the leader.
    conns: Vec<Conn>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .finish()
    }
}

impl TcpTransport {
    /// Forms the group: the leader waits for every other rank; a worker retries until it
    /// reaches the leader. Both give up after `timeout`, naming who is missing.
    pub fn connect(env: &GroupEnv, timeout: Duration) -> Result<Self, DistError> {
        if env.rank == 0 {
            Self::lead(env, timeout)
        } else {
            Self::join(env, timeout)
        }
    }

    fn lead(env: &GroupEnv, timeout: Duration) -> Result<Self, DistError> {
        let port = env
            .leader_addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| {
                DistError::Config(format!("LEADER_ADDR {:?} has no port", env.leader_addr))
            })?;
        let listener = TcpListener::bind(("0.0.0.0", port))?;
        listener.set_nonblocking(true)?;
        tracing::info!(
            port,
            world = env.world_size,
            "waiting for the group's ranks"
        );
        let deadline = Instant::now() + timeout;
        let mut slots: Vec<Option<Conn>> = (1..env.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut conn = Conn::new(stream)?;
                    let hello = read_frame(&mut conn.reader, 1)?;
                    let (magic, rank, world) = match hello.first().map(|h| h.as_slice()) {
                        Some(h) if h.len() == 12 => (
                            u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
                            u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize,
                            u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize,
                        ),
                        _ => (0, 0, 0),
                    };
                    if magic != MAGIC
                        || world != env.world_size
                        || rank == 0
                        || rank >= env.world_size
                    {
                        tracing::warn!(%peer, rank, world, "refused a connection that is not a rank of this group");
                        continue;
                    }
                    if slots[rank - 1].is_some() {
                        tracing::warn!(%peer, rank, "refused a second connection for an already joined rank");
                        continue;
                    }
                    conn.reader.get_ref().set_read_timeout(None)?;
                    write_frame(&mut conn.writer, &[MAGIC.to_le_bytes().to_vec()])?;
                    tracing::info!(rank, %peer, "rank joined");
                    slots[rank - 1] = Some(conn);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing = slots
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.is_none())
                            .map(|(i, _)| i + 1)
                            .collect();
                        return Err(DistError::JoinTimeout {
                            missing,
                            world: env.world_size,
                            leader: env.leader_addr.clone(),
                            timeout_s: timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(TcpTransport {
            rank: 0,
            world: env.world_size,
            conns: slots.into_iter().flatten().collect(),
        })
    }

    fn join(env: &GroupEnv, timeout: Duration) -> Result<Self, DistError> {
        let deadline = Instant::now() + timeout;
        let unreachable = |reason: String| DistError::LeaderUnreachable {
            leader: env.leader_addr.clone(),
            reason,
        };
        loop {
            let attempt = (|| -> std::io::Result<Conn> {
                let addr = env.leader_addr.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                })?;
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                let mut conn = Conn::new(stream)?;
                let mut hello = MAGIC.to_le_bytes().to_vec();
                hello.extend((env.rank as u32).to_le_bytes());
                hello.extend((env.world_size as u32).to_le_bytes());
                write_frame(&mut conn.writer, &[hello])?;
                let ack = read_frame(&mut conn.reader, 1)?;
                if ack.first().map(|a| a.as_slice()) != Some(&MAGIC.to_le_bytes()[..]) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the leader refused this rank",
                    ));
                }
                Ok(conn)
            })();
            match attempt {
                Ok(conn) => {
                    tracing::info!(rank = env.rank, leader = %env.leader_addr, "joined the group");
                    return Ok(TcpTransport {
                        rank: env.rank,
                        world: env.world_size,
                        conns: vec![conn],
                    });
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "leader not reachable yet; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(unreachable(e.to_string())),
            }
        }
    }
}

impl Transport for TcpTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all(&mut self, mut parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, DistError> {
        let world = self.world;
        if parts.len() != world {
            return Err(DistError::Config(format!(
                "all_to_all got {} parts for a world of {world}",
                parts.len()
            )));
        }
        let lost = |rank: usize, e: std::io::Error| DistError::PeerLost {
            rank,
            reason: e.to_string(),
        };
        if self.rank != 0 {
            let conn = &mut self.conns[0];
            write_frame(&mut conn.writer, &parts).map_err(|e| lost(0, e))?;
            let got = read_frame(&mut conn.reader, world).map_err(|e| lost(0, e))?;
            if got.len() != world {
                return Err(DistError::Protocol {
                    rank: 0,
                    reason: format!("{} parts for a world of {world}", got.len()),
                });
            }
            return Ok(got);
        }
        // Leader: collect every worker's frame, then route.
        let mut from: Vec<Vec<Vec<u8>>> = Vec::with_capacity(world);
        from.push(std::mem::take(&mut parts));
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let frame = read_frame(&mut conn.reader, world).map_err(|e| lost(i + 1, e))?;
            if frame.len() != world {
                return Err(DistError::Protocol {
                    rank: i + 1,
                    reason: format!("{} parts for a world of {world}", frame.len()),
                });
            }
            from.push(frame);
        }
        for (i, conn) in self.conns.iter_mut().enumerate() {
            let dest = i + 1;
            let mine: Vec<Vec<u8>> = (0..world)
                .map(|src| std::mem::take(&mut from[src][dest]))
                .collect();
            write_frame(&mut conn.writer, &mine).map_err(|e| lost(dest, e))?;
        }
        Ok((0..world)
            .map(|src| std::mem::take(&mut from[src][0]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_tcp_group_exchanges_parts_between_every_pair_of_ranks() {
        let leader = format!("127.0.0.1:{}", free_port());
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                let env = GroupEnv {
                    rank,
                    world_size: 3,
                    leader_addr: leader.clone(),
                };
                std::thread::spawn(move || {
                    let mut t = TcpTransport::connect(&env, Duration::from_secs(20)).unwrap();
                    for round in 0..20u8 {
                        let parts = (0..3).map(|d| vec![rank as u8, d as u8, round]).collect();
                        let got = t.all_to_all(parts).unwrap();
                        for (src, m) in got.iter().enumerate() {
                            assert_eq!(m, &vec![src as u8, rank as u8, round]);
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_missing_rank_is_named_when_the_group_times_out() {
        let env = GroupEnv {
            rank: 0,
            world_size: 3,
            leader_addr: format!("127.0.0.1:{}", free_port()),
        };
        let err = TcpTransport::connect(&env, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[1, 2]"), "{err}");
    }

    #[test]
    fn a_worker_without_a_leader_reports_the_address() {
        let env = GroupEnv {
            rank: 1,
            world_size: 2,
            leader_addr: format!("127.0.0.1:{}", free_port()),
        };
        let err = TcpTransport::connect(&env, Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1"), "{err}");
    }
}
