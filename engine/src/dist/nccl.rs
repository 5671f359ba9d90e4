//! NCCL transport: the expert-parallel collectives over NCCL on GPUs, for groups whose ranks each
//! own one GPU (one process per GPU across hosts, or several ranks in one process).
//!
//! Bootstrap: rank 0 draws NCCL's 128-byte unique id and hands it to the other ranks over a plain
//! TCP side channel at the leader's `host:port` (the same `LEADER_ADDR` the TCP transport uses),
//! or in memory for a group made inside one process ([`NcclTransport::in_process`]). Every rank
//! then joins the communicator with `ncclCommInitRank`.
//!
//! [`Transport::all_to_all`] of variable-size byte parts is a size exchange (an all-gather of
//! each rank's `world` part lengths) followed by grouped `ncclSend`/`ncclRecv` of `u8` device
//! buffers; the own part goes through NCCL too (self send/receive), so a world of one exercises
//! the same path. [`NcclTransport::all_to_all_rows`] is the device-side exchange of the MoE
//! dispatch shape: rows already in device memory go straight to their ranks, no host copy.
//!
//! NCCL and the CUDA driver are loaded at run time; without them every constructor returns an
//! error saying which library is missing ([`unavailable_reason`]), never a panic. cudarc looks
//! for `libnccl.so` (not `libnccl.so.2`), so a pip or distribution NCCL needs that name on the
//! loader path (`scripts/cuda_bench.sh` makes the link).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys as nccl_sys;

use super::{DistError, GroupEnv, Transport};

/// Size of NCCL's unique id.
pub const ID_BYTES: usize = 128;

/// Why NCCL cannot be used here, or `None` when the CUDA driver and NCCL libraries load and a
/// device is present. Never panics.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: these only try to dlopen the libraries.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("the CUDA driver library (libcuda) was not found".into());
    }
    if !unsafe { nccl_sys::is_culib_present() } {
        return Some("the NCCL library (libnccl.so) was not found on the loader path".into());
    }
    match std::panic::catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => None,
        Ok(Ok(_)) => Some("no CUDA device is present".into()),
        Ok(Err(e)) => Some(format!("the CUDA driver did not initialise: {e}")),
        Err(_) => Some("the CUDA driver library could not be loaded".into()),
    }
}

fn nccl_err(what: &str, e: nccl::NcclError) -> DistError {
    DistError::Io(std::io::Error::other(format!("NCCL {what}: {e:?}")))
}

fn cuda_err(what: &str, e: cudarc::driver::DriverError) -> DistError {
    DistError::Io(std::io::Error::other(format!("CUDA {what}: {e}")))
}

/// A fresh NCCL unique id (rank 0 draws it).
pub fn new_unique_id() -> Result<[u8; ID_BYTES], DistError> {
    if let Some(why) = unavailable_reason() {
        return Err(DistError::Config(format!("NCCL is not available: {why}")));
    }
    let id = nccl::get_uniqueid().map_err(|e| nccl_err("get unique id", e))?;
    Ok(id.internal.map(|c| c as u8))
}

/// Hands `id` from rank 0 to every other rank over TCP at `env.leader_addr`: rank 0 listens and
/// writes the id to each of the `world - 1` connections (each announces its rank first, so a
/// wrong or duplicate rank is refused); every other rank connects (retrying until `timeout`,
/// since rank 0 may start later) and reads it. Returns the id on every rank. Needs no GPU.
pub fn exchange_unique_id(
    env: &GroupEnv,
    id: Option<[u8; ID_BYTES]>,
    timeout: Duration,
) -> Result<[u8; ID_BYTES], DistError> {
    const MAGIC: [u8; 4] = *b"DSNI";
    if env.world_size == 0 || env.rank >= env.world_size {
        return Err(DistError::Config(format!(
            "rank {} is outside a world of {}",
            env.rank, env.world_size
        )));
    }
    let deadline = Instant::now() + timeout;
    if env.rank == 0 {
        let id =
            id.ok_or_else(|| DistError::Config("rank 0 needs the unique id to send".into()))?;
        let listener = TcpListener::bind(&env.leader_addr).map_err(|e| {
            DistError::Config(format!(
                "rank 0 could not listen on {}: {e}",
                env.leader_addr
            ))
        })?;
        listener.set_nonblocking(true)?;
        let mut joined = vec![false; env.world_size];
        joined[0] = true;
        while joined.iter().any(|j| !j) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(10)))?;
                    let mut hello = [0u8; 12];
                    if s.read_exact(&mut hello).is_err() || hello[..4] != MAGIC {
                        // Not one of ours (a port scanner, a stale client): ignore it.
                        continue;
                    }
                    let rank = u64::from_le_bytes(hello[4..].try_into().unwrap_or([0; 8]));
                    let ok = (rank as usize) < env.world_size && !joined[rank as usize];
                    s.write_all(&[ok as u8])?;
                    if ok {
                        s.write_all(&id)?;
                        s.flush()?;
                        joined[rank as usize] = true;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(DistError::JoinTimeout {
                            missing: (0..env.world_size).filter(|r| !joined[*r]).collect(),
                            world: env.world_size,
                            leader: env.leader_addr.clone(),
                            timeout_s: timeout.as_secs(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(id);
    }
    let unreachable = |reason: String| DistError::LeaderUnreachable {
        leader: env.leader_addr.clone(),
        reason,
    };
    loop {
        let attempt = (|| -> std::io::Result<Option<[u8; ID_BYTES]>> {
            let addr = env
                .leader_addr
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| std::io::Error::other("the address resolves to nothing"))?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut hello = MAGIC.to_vec();
            hello.extend_from_slice(&(env.rank as u64).to_le_bytes());
            s.write_all(&hello)?;
            let mut ok = [0u8; 1];
            s.read_exact(&mut ok)?;
            if ok[0] != 1 {
                return Ok(None);
            }
            let mut id = [0u8; ID_BYTES];
            s.read_exact(&mut id)?;
            Ok(Some(id))
        })();
        match attempt {
            Ok(Some(id)) => return Ok(id),
            Ok(None) => {
                return Err(DistError::Config(format!(
                    "the leader refused rank {} (outside the world or already joined)",
                    env.rank
                )));
            }
            Err(e) if Instant::now() > deadline => return Err(unreachable(e.to_string())),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The raw communicator, aborted once: on drop, or when a wait gives up on the group.
struct RawComm {
    handle: nccl_sys::ncclComm_t,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it are not made
// concurrently; `NcclTransport` owns it exclusively and takes `&mut self` for every collective
// (the abort in a failed wait runs on the thread that issued the collective).
unsafe impl Send for RawComm {}

impl RawComm {
    /// Aborts the communicator the first time (kernels spinning on a peer that is gone see
    /// the abort flag and return); later calls do nothing.
    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::AcqRel) {
            // SAFETY: the handle came from a successful ncclCommInitRank and is aborted once.
            // Abort (not destroy) cannot block on a peer that has already gone.
            let _ = unsafe { nccl::comm_abort(self.handle) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// What an NCCL rank checks while it waits, since NCCL never times out: whether a peer is
/// known to be gone (the group's TCP links, which heartbeat). A rank that gives up on the group
/// also tells its peers through it.
pub trait PeerWatch: Send {
    /// An error naming a peer known to be gone.
    fn check(&self) -> Result<(), DistError>;
    /// This rank leaves the group after a failed collective, so its peers stop waiting too.
    fn give_up(&self);
}

impl PeerWatch for super::tcp::LinkWatch {
    fn check(&self) -> Result<(), DistError> {
        super::tcp::LinkWatch::check(self)
    }
    fn give_up(&self) {
        self.close();
    }
}

/// Polls `done` until it reports completion, checking `alive` between polls: spinning first
/// (a decode step's exchange takes tens of microseconds), then yielding, then sleeping 100 µs,
/// so a long wait costs no core. Returns the first error either gives.
pub fn wait_polling(
    mut done: impl FnMut() -> Result<bool, DistError>,
    mut alive: impl FnMut() -> Result<(), DistError>,
) -> Result<(), DistError> {
    const SPIN: Duration = Duration::from_micros(200);
    const YIELD: Duration = Duration::from_millis(10);
    let started = Instant::now();
    loop {
        if done()? {
            return Ok(());
        }
        alive()?;
        let waited = started.elapsed();
        if waited < SPIN {
            std::hint::spin_loop();
        } else if waited < YIELD {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Device buffers reused across collectives (they only grow), so steady-state steps allocate
/// nothing.
#[derive(Default)]
struct Scratch {
    sizes_send: Option<CudaSlice<u64>>,
    sizes_recv: Option<CudaSlice<u64>>,
    send: Option<CudaSlice<u8>>,
    recv: Option<CudaSlice<u8>>,
}

fn grow<T: cudarc::driver::DeviceRepr>(
    stream: &Arc<CudaStream>,
    slot: &mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<(), DistError> {
    if slot.as_ref().is_none_or(|s| s.len() < len.max(1)) {
        *slot = None;
        // SAFETY: every byte that is read back is first written by a copy or a receive.
        let buf = unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| cuda_err("alloc", e))?;
        *slot = Some(buf);
    }
    Ok(())
}

/// One rank of an NCCL group on one GPU.
pub struct NcclTransport {
    comm: RawComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    ordinal: usize,
    scratch: Scratch,
    watch: Option<Box<dyn PeerWatch>>,
    /// Why the group was given up on; every later collective fails with it.
    failure: Mutex<Option<String>>,
}

impl std::fmt::Debug for NcclTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclTransport")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.ordinal)
            .finish()
    }
}

impl NcclTransport {
    /// Joins the group with a known unique id on device `ordinal`, with its own stream. Blocks
    /// until every rank of the world has called it (NCCL's init is collective).
    pub fn from_id(
        id: [u8; ID_BYTES],
        rank: usize,
        world: usize,
        ordinal: usize,
    ) -> Result<Self, DistError> {
        if let Some(why) = unavailable_reason() {
            return Err(DistError::Config(format!("NCCL is not available: {why}")));
        }
        if world == 0 || rank >= world {
            return Err(DistError::Config(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        let count = CudaContext::device_count().map_err(|e| cuda_err("device count", e))?;
        if ordinal >= count as usize {
            return Err(DistError::Config(format!(
                "device {ordinal} requested but only {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda_err("context", e))?;
        // NCCL's init picks the device current on this thread.
        ctx.bind_to_thread().map_err(|e| cuda_err("bind", e))?;
        let stream = ctx.new_stream().map_err(|e| cuda_err("stream", e))?;
        let uid = nccl_sys::ncclUniqueId {
            internal: id.map(|b| b as ::core::ffi::c_char),
        };
        let mut raw: nccl_sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; world and rank were checked above.
        unsafe { nccl::comm_init_rank(&mut raw, world as i32, uid, rank as i32) }
            .map_err(|e| nccl_err(&format!("init of rank {rank} of {world}"), e))?;
        Ok(NcclTransport {
            comm: RawComm {
                handle: raw,
                aborted: AtomicBool::new(false),
            },
            stream,
            rank,
            world,
            ordinal,
            scratch: Scratch::default(),
            watch: None,
            failure: Mutex::new(None),
        })
    }

    /// Joins the group described by `env` (RANK, WORLD_SIZE, LEADER_ADDR) on device `ordinal`:
    /// rank 0 draws the id and serves it at the leader address.
    pub fn connect(env: &GroupEnv, ordinal: usize, timeout: Duration) -> Result<Self, DistError> {
        let id = if env.rank == 0 {
            Some(new_unique_id()?)
        } else {
            if let Some(why) = unavailable_reason() {
                return Err(DistError::Config(format!("NCCL is not available: {why}")));
            }
            None
        };
        let id = exchange_unique_id(env, id, timeout)?;
        Self::from_id(id, env.rank, env.world_size, ordinal)
    }

    /// A whole group inside this process: rank i on device `ordinals[i]`. The ranks join
    /// concurrently (one thread each, as NCCL's init requires); the endpoints are returned in
    /// rank order, ready to be moved to one thread per rank.
    pub fn in_process(ordinals: &[usize]) -> Result<Vec<Self>, DistError> {
        let world = ordinals.len();
        if world == 0 {
            return Err(DistError::Config(
                "an NCCL group needs at least one rank".into(),
            ));
        }
        let id = new_unique_id()?;
        let handles: Vec<_> = ordinals
            .iter()
            .enumerate()
            .map(|(rank, &ord)| std::thread::spawn(move || Self::from_id(id, rank, world, ord)))
            .collect();
        let mut out = Vec::with_capacity(world);
        let mut first_err = None;
        for h in handles {
            match h.join() {
                Ok(Ok(t)) => out.push(t),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err
                        .get_or_insert(DistError::Config("an NCCL init thread panicked".into()));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    pub fn device_ordinal(&self) -> usize {
        self.ordinal
    }

    /// Waits on collectives check `watch` and give up through it (see [`PeerWatch`]).
    pub fn set_watch(&mut self, watch: Box<dyn PeerWatch>) {
        self.watch = Some(watch);
    }

    /// The error every collective returns once the group has been given up on.
    pub fn failed(&self) -> Result<(), DistError> {
        match &*self.failure.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(why) => Err(DistError::Io(std::io::Error::other(format!(
                "the NCCL group was abandoned: {why}"
            )))),
            None => Ok(()),
        }
    }

    /// Waits until this rank's stream has finished every collective enqueued on it. While it
    /// waits it checks NCCL's asynchronous error and the peers (the watch); on any failure it
    /// aborts the communicator (a kernel spinning on a lost peer returns), tells the peers, and
    /// fails this and every later collective with the reason.
    pub fn wait(&self) -> Result<(), DistError> {
        self.failed()?;
        let stream = self.stream.cu_stream();
        let comm = self.comm.handle;
        let done = || {
            // SAFETY: the stream belongs to this transport and outlives the call.
            match unsafe { cudarc::driver::sys::cuStreamQuery(stream) } {
                cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(true),
                cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY => {
                    let mut state = nccl_sys::ncclResult_t::ncclSuccess;
                    // SAFETY: the communicator is live (not aborted: `failed` was checked).
                    unsafe { nccl_sys::ncclCommGetAsyncError(comm, &mut state) };
                    match state {
                        nccl_sys::ncclResult_t::ncclSuccess
                        | nccl_sys::ncclResult_t::ncclInProgress => Ok(false),
                        e => Err(DistError::Io(std::io::Error::other(format!(
                            "NCCL reported {e:?} during a collective"
                        )))),
                    }
                }
                e => Err(DistError::Io(std::io::Error::other(format!(
                    "CUDA {e:?} while waiting for a collective"
                )))),
            }
        };
        let alive = || self.watch.as_ref().map_or(Ok(()), |w| w.check());
        let result = wait_polling(done, alive);
        if let Err(e) = &result {
            self.abandon(&e.to_string());
        }
        result
    }

    /// Gives up on the group: records `why` for every later collective, aborts the
    /// communicator and tells the peers through the watch.
    pub fn abandon(&self, why: &str) {
        tracing::error!(rank = self.rank, reason = why, "leaving the NCCL group");
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(|| why.to_owned());
        self.comm.abort();
        if let Some(w) = &self.watch {
            w.give_up();
        }
    }

    /// The stream every collective of this rank runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self) -> Result<(), DistError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_err("bind", e))
    }

    /// Every rank's `world` part lengths: returns the matrix row-major, `[src][dst]`.
    fn exchange_sizes(&mut self, mine: &[u64]) -> Result<Vec<u64>, DistError> {
        let w = self.world;
        grow(&self.stream, &mut self.scratch.sizes_send, w)?;
        grow(&self.stream, &mut self.scratch.sizes_recv, w * w)?;
        // Taken out of `self` for the exchange (the wait borrows `self`), put back below.
        let (Some(mut send), Some(mut recv)) = (
            self.scratch.sizes_send.take(),
            self.scratch.sizes_recv.take(),
        ) else {
            return Err(DistError::Config("scratch buffers missing".into()));
        };
        let result = self.gather_sizes(mine, &mut send, &mut recv);
        self.scratch.sizes_send = Some(send);
        self.scratch.sizes_recv = Some(recv);
        result
    }

    fn gather_sizes(
        &self,
        mine: &[u64],
        send: &mut CudaSlice<u64>,
        recv: &mut CudaSlice<u64>,
    ) -> Result<Vec<u64>, DistError> {
        let w = self.world;
        self.stream
            .memcpy_htod(mine, &mut send.slice_mut(..w))
            .map_err(|e| cuda_err("copy sizes", e))?;
        {
            let (ps, _g1) = send.device_ptr(&self.stream);
            let (pr, _g2) = recv.device_ptr_mut(&self.stream);
            // SAFETY: `send` holds `w` u64 values and `recv` `w × w`, both on this stream.
            unsafe {
                nccl::all_gather(
                    ps as *const _,
                    pr as *mut _,
                    w,
                    nccl_sys::ncclDataType_t::ncclUint64,
                    self.comm.handle,
                    self.stream.cu_stream() as _,
                )
            }
            .map_err(|e| nccl_err("size exchange", e))?;
        }
        self.wait()?;
        let mut all = vec![0u64; w * w];
        self.stream
            .memcpy_dtoh(&recv.slice(..w * w), &mut all)
            .map_err(|e| cuda_err("copy sizes back", e))?;
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        Ok(all)
    }

    /// Grouped send/receive of byte ranges between two device addresses: `send[j]` (offset,
    /// bytes) goes to rank j, `recv[j]` receives from rank j. Zero-byte transfers are skipped on
    /// both sides (both know the sizes), so empty parts cost nothing.
    ///
    /// # Safety
    /// `send_base` and `recv_base` must be device addresses on this rank's GPU valid for every
    /// range given, and stay alive until the stream has finished the transfers.
    unsafe fn grouped_exchange(
        &self,
        send_base: u64,
        send: &[(usize, usize)],
        recv_base: u64,
        recv: &[(usize, usize)],
    ) -> Result<(), DistError> {
        nccl::group_start().map_err(|e| nccl_err("group start", e))?;
        let mut result = Ok(());
        for peer in 0..self.world {
            let (off, len) = send[peer];
            if len > 0 {
                // SAFETY: the caller guarantees the range.
                let r = unsafe {
                    nccl::send(
                        (send_base + off as u64) as *const _,
                        len,
                        nccl_sys::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.comm.handle,
                        self.stream.cu_stream() as _,
                    )
                };
                if let Err(e) = r {
                    result = Err(nccl_err(&format!("send to rank {peer}"), e));
                    break;
                }
            }
            let (off, len) = recv[peer];
            if len > 0 {
                // SAFETY: as above.
                let r = unsafe {
                    nccl::recv(
                        (recv_base + off as u64) as *mut _,
                        len,
                        nccl_sys::ncclDataType_t::ncclUint8,
                        peer as i32,
                        self.comm.handle,
                        self.stream.cu_stream() as _,
                    )
                };
                if let Err(e) = r {
                    result = Err(nccl_err(&format!("receive from rank {peer}"), e));
                    break;
                }
            }
        }
        // The group must be closed even after a failed enqueue.
        let end = nccl::group_end().map_err(|e| nccl_err("group end", e));
        result.and(end.map(|_| ()))
    }

    /// The MoE dispatch (or combine) exchange on device data: rows `[send_counts[0] rows for
    /// rank 0 | send_counts[1] for rank 1 | ...]` of `row_bytes` bytes each in `send` go to
    /// their ranks; `recv` receives `recv_counts[j]` rows from rank j, in rank order. Counts are
    /// known on both sides beforehand (the routing plan is exchanged first, as with the host
    /// transport), so no size exchange is needed. Enqueued on [`NcclTransport::stream`]; not
    /// synchronised.
    pub fn all_to_all_rows<T: cudarc::driver::DeviceRepr>(
        &mut self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
        recv: &mut CudaSlice<T>,
        recv_counts: &[usize],
        row_elems: usize,
    ) -> Result<(), DistError> {
        let w = self.world;
        if send_counts.len() != w || recv_counts.len() != w {
            return Err(DistError::Config(format!(
                "row all-to-all got {} send and {} receive counts for a world of {w}",
                send_counts.len(),
                recv_counts.len()
            )));
        }
        let row = row_elems * std::mem::size_of::<T>();
        let ranges = |counts: &[usize]| {
            let mut at = 0usize;
            counts
                .iter()
                .map(|c| {
                    let r = (at * row, c * row);
                    at += c;
                    r
                })
                .collect::<Vec<_>>()
        };
        let (s, r) = (ranges(send_counts), ranges(recv_counts));
        let need_s: usize = send_counts.iter().sum::<usize>() * row;
        let need_r: usize = recv_counts.iter().sum::<usize>() * row;
        let (have_s, have_r) = (
            send.len() * std::mem::size_of::<T>(),
            recv.len() * std::mem::size_of::<T>(),
        );
        if need_s > have_s || need_r > have_r {
            return Err(DistError::Config(format!(
                "row all-to-all needs {need_s} send and {need_r} receive bytes, buffers hold {have_s} and {have_r}"
            )));
        }
        self.failed()?;
        self.bind()?;
        let (ps, _g1) = send.device_ptr(&self.stream);
        let (pr, _g2) = recv.device_ptr_mut(&self.stream);
        // SAFETY: ranges were checked against the buffers' sizes; both outlive the enqueue and
        // the guards order later uses after this stream's work.
        unsafe { self.grouped_exchange(ps, &s, pr, &r) }
    }
}

impl Transport for NcclTransport {
    fn rank(&self) -> usize {
        self.rank
    }

    fn as_nccl(&mut self) -> Option<&mut NcclTransport> {
        Some(self)
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_to_all(&mut self, parts: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, DistError> {
        let w = self.world;
        if parts.len() != w {
            return Err(DistError::Config(format!(
                "all_to_all got {} parts for a world of {w}",
                parts.len()
            )));
        }
        self.failed()?;
        self.bind()?;
        let mine: Vec<u64> = parts.iter().map(|p| p.len() as u64).collect();
        let sizes = self.exchange_sizes(&mine)?;
        let incoming: Vec<usize> = (0..w)
            .map(|src| sizes[src * w + self.rank] as usize)
            .collect();
        let mut send_ranges = Vec::with_capacity(w);
        let mut at = 0usize;
        for p in &parts {
            send_ranges.push((at, p.len()));
            at += p.len();
        }
        let send_total = at;
        let mut recv_ranges = Vec::with_capacity(w);
        let mut at = 0usize;
        for &n in &incoming {
            recv_ranges.push((at, n));
            at += n;
        }
        let recv_total = at;
        grow(&self.stream, &mut self.scratch.send, send_total)?;
        grow(&self.stream, &mut self.scratch.recv, recv_total)?;
        // Taken out of `self` for the exchange (which borrows `self`), put back below.
        let (Some(mut sbuf), Some(mut rbuf)) = (self.scratch.send.take(), self.scratch.recv.take())
        else {
            return Err(DistError::Config("scratch buffers missing".into()));
        };
        let result = self.exchange_packed(&parts, &mut sbuf, &mut rbuf, &send_ranges, &recv_ranges);
        self.scratch.send = Some(sbuf);
        self.scratch.recv = Some(rbuf);
        result
    }
}

impl NcclTransport {
    fn exchange_packed(
        &self,
        parts: &[Vec<u8>],
        sbuf: &mut CudaSlice<u8>,
        rbuf: &mut CudaSlice<u8>,
        send_ranges: &[(usize, usize)],
        recv_ranges: &[(usize, usize)],
    ) -> Result<Vec<Vec<u8>>, DistError> {
        let send_total: usize = send_ranges.iter().map(|r| r.1).sum();
        let recv_total: usize = recv_ranges.iter().map(|r| r.1).sum();
        let packed: Vec<u8> = parts.concat();
        if send_total > 0 {
            self.stream
                .memcpy_htod(&packed, &mut sbuf.slice_mut(..send_total))
                .map_err(|e| cuda_err("upload parts", e))?;
        }
        {
            let (ps, _g1) = sbuf.device_ptr(&self.stream);
            let (pr, _g2) = rbuf.device_ptr_mut(&self.stream);
            // SAFETY: the ranges lie inside buffers just grown to `send_total`/`recv_total`.
            unsafe { self.grouped_exchange(ps, send_ranges, pr, recv_ranges) }?;
        }
        self.wait()?;
        let mut flat = vec![0u8; recv_total];
        if recv_total > 0 {
            self.stream
                .memcpy_dtoh(&rbuf.slice(..recv_total), &mut flat)
                .map_err(|e| cuda_err("download parts", e))?;
        }
        self.stream
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))?;
        Ok(recv_ranges
            .iter()
            .map(|&(off, len)| flat[off..off + len].to_vec())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(rank: usize, world: usize, addr: &str) -> GroupEnv {
        GroupEnv {
            rank,
            world_size: world,
            leader_addr: addr.into(),
        }
    }

    #[test]
    fn the_unique_id_reaches_every_rank_over_tcp_without_a_gpu() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut id = [0u8; ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let workers: Vec<_> = (1..4)
            .map(|r| {
                let e = env(r, 4, &addr);
                std::thread::spawn(move || exchange_unique_id(&e, None, Duration::from_secs(20)))
            })
            .collect();
        let got0 = exchange_unique_id(&env(0, 4, &addr), Some(id), Duration::from_secs(20));
        assert_eq!(got0.unwrap(), id);
        for w in workers {
            assert_eq!(w.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_times_out_with_its_number() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let e = env(0, 2, &format!("127.0.0.1:{port}"));
        let err = exchange_unique_id(&e, Some([1; ID_BYTES]), Duration::from_millis(200))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[1]"), "{err}");
    }

    #[test]
    fn a_bad_rank_is_refused_before_any_io() {
        let err = exchange_unique_id(&env(3, 2, "127.0.0.1:1"), None, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside a world of 2"), "{err}");
    }

    #[test]
    fn a_wait_ends_when_the_work_is_done_or_a_peer_is_gone() {
        let mut polls = 0;
        let done = wait_polling(
            || {
                polls += 1;
                Ok(polls == 1000)
            },
            || Ok(()),
        );
        assert!(done.is_ok());
        assert_eq!(polls, 1000);

        let mut checks = 0;
        let lost = wait_polling(
            || Ok(false),
            || {
                checks += 1;
                if checks < 50 {
                    Ok(())
                } else {
                    Err(DistError::PeerLost {
                        rank: 3,
                        reason: "reset".into(),
                    })
                }
            },
        )
        .unwrap_err()
        .to_string();
        assert_eq!(lost, "rank 3 disconnected: reset");

        let failed = wait_polling(|| Err(DistError::Config("stream error".into())), || Ok(()));
        assert!(failed.unwrap_err().to_string().contains("stream error"));
    }
}
