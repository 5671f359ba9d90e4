//! TCP transport for CPU groups spread over processes or pods: a star through the leader
//! (rank 0 listens at `LEADER_ADDR`; every other rank connects to it). In an all-to-all each
//! worker sends the leader all its parts in one frame; the leader routes them and answers each
//! worker with the parts addressed to it. Collectives are lockstep, so per-connection order
//! matches parts to rounds.
//!
//! Every link heartbeats in both directions and reads with a timeout, so a rank that dies, or
//! freezes, or sits behind a partition that never resets the connection is noticed within the
//! peer timeout, in a collective or while the group idles ([`Transport::check_alive`]).

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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

/// How long a rank may stay silent (no frame, no heartbeat) before its peers declare it lost.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// How a TCP group forms and how it notices a rank that is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpOptions {
    /// How long the leader waits for every rank to join, and a worker for the leader.
    pub join_timeout: Duration,
    /// A peer that sends nothing for this long (it heartbeats several times within it) is lost:
    /// a frozen process or a partition that never resets the connection.
    pub peer_timeout: Duration,
}

impl TcpOptions {
    pub fn new(join_timeout: Duration) -> Self {
        TcpOptions {
            join_timeout,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
        }
    }

    /// Heartbeats go out several times per `peer_timeout`, at most every second, so a busy
    /// scheduler delaying one of them does not make a live rank look silent.
    fn heartbeat_every(&self) -> Duration {
        (self.peer_timeout / 5).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

/// Frame kinds: the parts of one collective, or a heartbeat that carries nothing.
const FRAME_PARTS: u32 = 1;
const FRAME_HEARTBEAT: u32 = 2;

fn write_frame(w: &mut impl Write, parts: &[Vec<u8>]) -> std::io::Result<()> {
    w.write_all(&FRAME_PARTS.to_le_bytes())?;
    w.write_all(&(parts.len() as u32).to_le_bytes())?;
    for p in parts {
        w.write_all(&(p.len() as u64).to_le_bytes())?;
        w.write_all(p)?;
    }
    w.flush()
}

fn write_heartbeat(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&FRAME_HEARTBEAT.to_le_bytes())?;
    w.flush()
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b4 = [0u8; 4];
    r.read_exact(&mut b4)?;
    Ok(u32::from_le_bytes(b4))
}

/// The most a frame's part reserves before its bytes arrive.
const PREALLOC_LIMIT: u64 = 256 << 20;

/// The next frame: `None` for a heartbeat.
fn read_frame(r: &mut impl Read, max_parts: usize) -> std::io::Result<Option<Vec<Vec<u8>>>> {
    match read_u32(r)? {
        FRAME_PARTS => {}
        FRAME_HEARTBEAT => return Ok(None),
        k => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown frame kind {k}"),
            ));
        }
    }
    let n = read_u32(r)? as usize;
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
        let len = u64::from_le_bytes(b8);
        // Room for the part up front (bounded: the length is a peer's word until it arrives).
        let mut p = Vec::with_capacity(len.min(PREALLOC_LIMIT) as usize);
        r.by_ref().take(len).read_to_end(&mut p)?;
        if p.len() as u64 != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "truncated frame",
            ));
        }
        parts.push(p);
    }
    Ok(Some(parts))
}

/// The next frame that carries parts, skipping heartbeats (during the join handshake).
fn read_parts(r: &mut impl Read, max_parts: usize) -> std::io::Result<Vec<Vec<u8>>> {
    loop {
        if let Some(parts) = read_frame(r, max_parts)? {
            return Ok(parts);
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Why a link ended.
#[derive(Debug, Clone)]
enum LinkEnd {
    /// Nothing arrived (not even a heartbeat) within the peer timeout.
    Silent(Duration),
    /// The connection failed: reset, closed, or a malformed frame.
    Lost(String),
}

impl LinkEnd {
    fn error(&self, rank: usize) -> DistError {
        match self {
            LinkEnd::Silent(d) => DistError::Silent {
                rank,
                secs: d.as_secs_f64(),
            },
            LinkEnd::Lost(reason) => DistError::PeerLost {
                rank,
                reason: reason.clone(),
            },
        }
    }

    fn of(e: &std::io::Error, timeout: Duration) -> Self {
        if is_timeout(e) {
            LinkEnd::Silent(timeout)
        } else {
            LinkEnd::Lost(e.to_string())
        }
    }
}

/// One end of the link to a peer rank, once the group has formed. A reader thread receives
/// frames (the socket's read timeout is the peer timeout, and heartbeats reset it) and a
/// heartbeat thread keeps this side audible while the caller computes or idles.
struct Link {
    peer: usize,
    timeout: Duration,
    stream: TcpStream,
    writer: Arc<Mutex<BufWriter<TcpStream>>>,
    frames: Receiver<Vec<Vec<u8>>>,
    /// Why the link ended, set by the reader before it closes `frames`.
    ended: Arc<Mutex<Option<LinkEnd>>>,
    stop_heartbeat: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Link {
    /// Starts the link's threads on a connection whose handshake is done; the handshake's
    /// reader is kept, since it may already hold the first frames.
    fn start(
        peer: usize,
        conn: Handshake,
        world: usize,
        opts: TcpOptions,
    ) -> std::io::Result<Self> {
        let timeout = opts.peer_timeout;
        let Handshake {
            stream,
            reader: mut r,
            writer,
        } = conn;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let writer = Arc::new(Mutex::new(writer));
        let ended = Arc::new(Mutex::new(None));
        let (frames_tx, frames) = channel();
        let reader_ended = ended.clone();
        let reader = std::thread::Builder::new()
            .name(format!("group-rx-{peer}"))
            .spawn(move || {
                let why = loop {
                    match read_frame(&mut r, world) {
                        Ok(None) => {}
                        Ok(Some(parts)) => {
                            if frames_tx.send(parts).is_err() {
                                return;
                            }
                        }
                        Err(e) => break LinkEnd::of(&e, timeout),
                    }
                };
                lock(&reader_ended).get_or_insert(why);
            })?;
        let (stop_tx, stop_rx) = channel::<()>();
        let hb_writer = writer.clone();
        let every = opts.heartbeat_every();
        let heartbeat = std::thread::Builder::new()
            .name(format!("group-hb-{peer}"))
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(every) {
                    // A failed write is the reader's to report: the connection is gone.
                    if write_heartbeat(&mut *lock(&hb_writer)).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Link {
            peer,
            timeout,
            stream,
            writer,
            frames,
            ended,
            stop_heartbeat: Some(stop_tx),
            threads: vec![reader, heartbeat],
        })
    }

    fn send(&self, parts: &[Vec<u8>]) -> Result<(), DistError> {
        write_frame(&mut *lock(&self.writer), parts)
            .map_err(|e| LinkEnd::of(&e, self.timeout).error(self.peer))
    }

    fn recv(&self) -> Result<Vec<Vec<u8>>, DistError> {
        self.frames.recv().map_err(|_| {
            lock(&self.ended)
                .clone()
                .unwrap_or_else(|| LinkEnd::Lost("the connection closed".into()))
                .error(self.peer)
        })
    }

    fn check(&self) -> Result<(), DistError> {
        match &*lock(&self.ended) {
            Some(end) => Err(end.error(self.peer)),
            None => Ok(()),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop_heartbeat.take();
        let _ = self.stream.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A connection during the join handshake, before its link threads start.
#[derive(Debug)]
struct Handshake {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Handshake {
    fn new(s: TcpStream) -> std::io::Result<Self> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Handshake {
            reader: BufReader::new(s.try_clone()?),
            writer: BufWriter::new(s.try_clone()?),
            stream: s,
        })
    }
}

pub struct TcpTransport {
    rank: usize,
    world: usize,
    /// On the leader: links to ranks 1..world (index rank - 1). On a worker: the leader.
    links: Vec<Link>,
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
    /// reaches the leader. Both give up after `opts.join_timeout`, naming who is missing.
    pub fn connect(env: &GroupEnv, opts: TcpOptions) -> Result<Self, DistError> {
        if opts.peer_timeout.is_zero() {
            return Err(DistError::Config(
                "the peer timeout must be positive".into(),
            ));
        }
        if env.rank == 0 {
            Self::lead(env, opts)
        } else {
            Self::join(env, opts)
        }
    }

    fn lead(env: &GroupEnv, opts: TcpOptions) -> Result<Self, DistError> {
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
        let deadline = Instant::now() + opts.join_timeout;
        let mut slots: Vec<Option<Handshake>> = (1..env.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    let mut conn = Handshake::new(stream)?;
                    let hello = match read_parts(&mut conn.reader, 1) {
                        Ok(h) => h,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "refused a connection that sent no greeting");
                            continue;
                        }
                    };
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
                            timeout_s: opts.join_timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let links = slots
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, s)| Link::start(i + 1, s, env.world_size, opts))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(TcpTransport {
            rank: 0,
            world: env.world_size,
            links,
        })
    }

    fn join(env: &GroupEnv, opts: TcpOptions) -> Result<Self, DistError> {
        let deadline = Instant::now() + opts.join_timeout;
        let unreachable = |reason: String| DistError::LeaderUnreachable {
            leader: env.leader_addr.clone(),
            reason,
        };
        loop {
            let attempt = (|| -> std::io::Result<Handshake> {
                let addr = env.leader_addr.to_socket_addrs()?.next().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                })?;
                let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
                let mut conn = Handshake::new(stream)?;
                let mut hello = MAGIC.to_le_bytes().to_vec();
                hello.extend((env.rank as u32).to_le_bytes());
                hello.extend((env.world_size as u32).to_le_bytes());
                write_frame(&mut conn.writer, &[hello])?;
                let ack = read_parts(&mut conn.reader, 1)?;
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
                    let link = Link::start(0, conn, env.world_size, opts)?;
                    return Ok(TcpTransport {
                        rank: env.rank,
                        world: env.world_size,
                        links: vec![link],
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

impl TcpTransport {
    /// A handle on this rank's links for another thread: it tells whether a peer is known
    /// gone and can close the links. A rank waiting on a collective the links do not carry
    /// (NCCL, which never times out) checks it, and closes the links when it gives up on the
    /// group so that its peers notice at once instead of after the peer timeout.
    pub fn watch(&self) -> std::io::Result<LinkWatch> {
        let links = self
            .links
            .iter()
            .map(|l| {
                Ok(WatchedLink {
                    peer: l.peer,
                    ended: l.ended.clone(),
                    stream: l.stream.try_clone()?,
                })
            })
            .collect::<std::io::Result<_>>()?;
        Ok(LinkWatch {
            links: Arc::new(links),
        })
    }
}

/// See [`TcpTransport::watch`].
#[derive(Clone)]
pub struct LinkWatch {
    links: Arc<Vec<WatchedLink>>,
}

/// One peer's link as a watch sees it: why it ended, if it has, and a handle to shut it.
struct WatchedLink {
    peer: usize,
    ended: Arc<Mutex<Option<LinkEnd>>>,
    stream: TcpStream,
}

impl std::fmt::Debug for LinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peers: Vec<usize> = self.links.iter().map(|l| l.peer).collect();
        f.debug_struct("LinkWatch").field("peers", &peers).finish()
    }
}

impl LinkWatch {
    /// An error naming the first peer whose link has ended (dead, silent or closed).
    pub fn check(&self) -> Result<(), DistError> {
        for link in self.links.iter() {
            if let Some(end) = &*lock(&link.ended) {
                return Err(end.error(link.peer));
            }
        }
        Ok(())
    }

    /// Shuts every link down; the peers' readers see the connection end.
    pub fn close(&self) {
        for link in self.links.iter() {
            let _ = link.stream.shutdown(Shutdown::Both);
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
        if self.rank != 0 {
            // A worker's part for itself stays here; the rest go through rank 0.
            let own = std::mem::take(&mut parts[self.rank]);
            let link = &self.links[0];
            link.send(&parts)?;
            let mut got = link.recv()?;
            if got.len() != world {
                return Err(DistError::Protocol {
                    rank: 0,
                    reason: format!("{} parts for a world of {world}", got.len()),
                });
            }
            got[self.rank] = own;
            return Ok(got);
        }
        // Leader: collect every worker's frame, then route.
        let mut from: Vec<Vec<Vec<u8>>> = Vec::with_capacity(world);
        from.push(std::mem::take(&mut parts));
        for link in &self.links {
            let frame = link.recv()?;
            if frame.len() != world {
                return Err(DistError::Protocol {
                    rank: link.peer,
                    reason: format!("{} parts for a world of {world}", frame.len()),
                });
            }
            from.push(frame);
        }
        for link in &self.links {
            let dest = link.peer;
            let mine: Vec<Vec<u8>> = (0..world)
                .map(|src| std::mem::take(&mut from[src][dest]))
                .collect();
            link.send(&mine)?;
        }
        Ok((0..world)
            .map(|src| std::mem::take(&mut from[src][0]))
            .collect())
    }

    fn check_alive(&mut self) -> Result<(), DistError> {
        self.links.iter().try_for_each(Link::check)
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
                    let mut t =
                        TcpTransport::connect(&env, TcpOptions::new(Duration::from_secs(20)))
                            .unwrap();
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
        let err = TcpTransport::connect(&env, TcpOptions::new(Duration::from_millis(300)))
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
        let err = TcpTransport::connect(&env, TcpOptions::new(Duration::from_millis(300)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("127.0.0.1"), "{err}");
    }

    /// A peer that completes the handshake as rank `rank` of `world`, then does whatever the
    /// test makes of the returned stream (stays silent, or closes).
    fn fake_worker(leader: &str, rank: usize, world: usize) -> TcpStream {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match TcpStream::connect(leader) {
                Ok(s) => break Handshake::new(s).unwrap(),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "leader not up yet");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let mut hello = MAGIC.to_le_bytes().to_vec();
        hello.extend((rank as u32).to_le_bytes());
        hello.extend((world as u32).to_le_bytes());
        write_frame(&mut conn.writer, &[hello]).unwrap();
        read_parts(&mut conn.reader, 1).unwrap();
        conn.stream
    }

    fn quick(peer_timeout: Duration) -> TcpOptions {
        TcpOptions {
            join_timeout: Duration::from_secs(30),
            peer_timeout,
        }
    }

    #[test]
    fn a_silent_worker_fails_the_collective_and_the_idle_check_by_name() {
        let leader = format!("127.0.0.1:{}", free_port());
        let env = GroupEnv {
            rank: 0,
            world_size: 2,
            leader_addr: leader.clone(),
        };
        let lead = std::thread::spawn(move || {
            TcpTransport::connect(&env, quick(Duration::from_millis(500))).unwrap()
        });
        // Joins, then neither heartbeats nor answers, like a stopped process.
        let _frozen = fake_worker(&leader, 1, 2);
        let mut t = lead.join().unwrap();
        let err = t.all_to_all(vec![vec![], vec![]]).unwrap_err().to_string();
        assert_eq!(err, "rank 1 has been silent for 0.5 s");
        assert_eq!(
            t.check_alive().unwrap_err().to_string(),
            "rank 1 has been silent for 0.5 s"
        );
    }

    #[test]
    fn an_idle_leader_notices_a_silent_worker_without_a_collective() {
        let leader = format!("127.0.0.1:{}", free_port());
        let env = GroupEnv {
            rank: 0,
            world_size: 2,
            leader_addr: leader.clone(),
        };
        let lead = std::thread::spawn(move || {
            TcpTransport::connect(&env, quick(Duration::from_millis(300))).unwrap()
        });
        let _frozen = fake_worker(&leader, 1, 2);
        let mut t = lead.join().unwrap();
        assert!(t.check_alive().is_ok(), "alive right after joining");
        let deadline = Instant::now() + Duration::from_secs(60);
        let err = loop {
            match t.check_alive() {
                Err(e) => break e.to_string(),
                Ok(()) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(()) => panic!("a silent worker was never noticed"),
            }
        };
        assert!(err.contains("rank 1 has been silent"), "{err}");
    }

    #[test]
    fn heartbeats_keep_an_idle_group_alive_past_the_timeout() {
        let leader = format!("127.0.0.1:{}", free_port());
        let timeout = Duration::from_secs(1);
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let env = GroupEnv {
                    rank,
                    world_size: 2,
                    leader_addr: leader.clone(),
                };
                std::thread::spawn(move || {
                    let mut t = TcpTransport::connect(&env, quick(timeout)).unwrap();
                    // Idle for three timeouts: only heartbeats cross the links.
                    std::thread::sleep(3 * timeout);
                    t.check_alive().unwrap();
                    let got = t.all_to_all(vec![vec![rank as u8]; 2]).unwrap();
                    assert_eq!(got, vec![vec![0], vec![1]]);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_worker_notices_a_lost_leader_while_it_waits_for_a_step() {
        let addr = format!("127.0.0.1:{}", free_port());
        let listener = TcpListener::bind(&addr).unwrap();
        let env = GroupEnv {
            rank: 1,
            world_size: 2,
            leader_addr: addr,
        };
        let worker = std::thread::spawn(move || {
            let mut t = TcpTransport::connect(&env, quick(Duration::from_secs(30))).unwrap();
            t.all_to_all(vec![vec![], vec![]]).unwrap_err().to_string()
        });
        // A leader that acknowledges the rank, then goes away.
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Handshake::new(stream).unwrap();
        read_parts(&mut conn.reader, 1).unwrap();
        write_frame(&mut conn.writer, &[MAGIC.to_le_bytes().to_vec()]).unwrap();
        drop(conn);
        let err = worker.join().unwrap();
        assert!(err.starts_with("rank 0 disconnected"), "{err}");
    }

    #[test]
    fn a_worker_notices_a_frozen_leader() {
        let addr = format!("127.0.0.1:{}", free_port());
        let listener = TcpListener::bind(&addr).unwrap();
        let env = GroupEnv {
            rank: 1,
            world_size: 2,
            leader_addr: addr,
        };
        let worker = std::thread::spawn(move || {
            let mut t = TcpTransport::connect(&env, quick(Duration::from_millis(400))).unwrap();
            t.all_to_all(vec![vec![], vec![]]).unwrap_err().to_string()
        });
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Handshake::new(stream).unwrap();
        read_parts(&mut conn.reader, 1).unwrap();
        write_frame(&mut conn.writer, &[MAGIC.to_le_bytes().to_vec()]).unwrap();
        let err = worker.join().unwrap();
        assert_eq!(err, "rank 0 has been silent for 0.4 s");
        drop(conn);
    }

    #[test]
    fn closing_a_watch_ends_the_group_for_every_peer_at_once() {
        let leader = format!("127.0.0.1:{}", free_port());
        let env = |rank| GroupEnv {
            rank,
            world_size: 2,
            leader_addr: leader.clone(),
        };
        // The peer timeout is far longer than the test: only the close can end the links.
        let (e0, e1) = (env(0), env(1));
        let lead = std::thread::spawn(move || {
            let mut t = TcpTransport::connect(&e0, quick(Duration::from_secs(600))).unwrap();
            t.all_to_all(vec![vec![], vec![]]).unwrap_err().to_string()
        });
        let t = TcpTransport::connect(&e1, quick(Duration::from_secs(600))).unwrap();
        let watch = t.watch().unwrap();
        watch.check().unwrap();
        watch.close();
        let err = lead.join().unwrap();
        assert!(err.starts_with("rank 1 disconnected"), "{err}");
        // The closing side's reader sees its own link end too.
        let deadline = Instant::now() + Duration::from_secs(60);
        while watch.check().is_ok() {
            assert!(
                Instant::now() < deadline,
                "the closed link was never reported"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(watch.check().unwrap_err().to_string().contains("rank 0"));
    }
}
