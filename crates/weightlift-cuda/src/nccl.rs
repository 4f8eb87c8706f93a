//! NCCL, loaded at run time: [`nccl_available`] probes for it, [`UniqueId`] names a
//! communicator to its ranks, and [`Comm`] is one rank of one, non-blocking, on a [`Gpu`].
//!
//! The library is looked up in this order: the path in `WEIGHTLIFT_NCCL` (the Python package
//! sets it to the `libnccl.so.2` of torch's `nvidia-nccl` wheel), then `libnccl.so.2` the way
//! `dlopen` looks (which finds a copy the process loaded already, as torch does), then
//! `libnccl.so`. Where none loads, or there is no GPU, every entry point returns an
//! [`NcclError`], never a panic.
//!
//! cudarc's own `nccl` module is not used: its loader looks for `libnccl.so` and
//! `libnccl.so.<CUDA major>` but not `libnccl.so.2` (the name torch's wheel ships), and panics
//! where the library or a symbol is missing. The few calls needed are bound here.
//!
//! Communicators are non-blocking (`blocking = 0` in their config): every call returns at
//! once, and [`Comm::wait`] polls `ncclCommGetAsyncError` up to a deadline, aborting the
//! communicator when it passes, so a peer that died or stalls never hangs this rank.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libloading::Library;

use crate::dynlib::{bind, load_first};
use crate::error::Call;
use crate::{CopyBatch, CudaError, Gpu, Lane, Mark};

/// The environment variable naming the library to load first.
pub const NCCL_PATH_ENV: &str = "WEIGHTLIFT_NCCL";

/// The names tried after [`NCCL_PATH_ENV`], in order.
const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `ncclSuccess` and `ncclInProgress` (a non-blocking call not done yet).
const SUCCESS: c_int = 0;
const IN_PROGRESS: c_int = 7;
/// `ncclUint8`.
const UINT8: c_int = 1;
/// `NCCL_CONFIG_UNDEF_INT`: a field of the config left to NCCL.
const UNDEF_INT: c_int = c_int::MIN;

/// `ncclUniqueId`: what every rank of a communicator passes to its init.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId {
    internal: [u8; 128],
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UniqueId(..)")
    }
}

impl UniqueId {
    /// A new id from NCCL (rank 0 makes it and hands it to the others).
    pub fn new() -> Result<UniqueId, NcclError> {
        let api = api()?;
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: `id` is a writable `ncclUniqueId` (128 bytes, the C layout).
        check(api, "ncclGetUniqueId", unsafe { (api.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    /// The id as 256 hex digits, to travel in a control message.
    pub fn to_hex(&self) -> String {
        self.internal.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// An id from [`UniqueId::to_hex`]'s digits; None for anything else.
    pub fn from_hex(hex: &str) -> Option<UniqueId> {
        if hex.len() != 256 || !hex.is_ascii() {
            return None;
        }
        let mut internal = [0u8; 128];
        for (i, byte) in internal.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(UniqueId { internal })
    }
}

/// `ncclConfig_t` as NCCL 2.17 declared it; its `version` field tells newer libraries to read
/// no further.
#[repr(C)]
struct Config {
    size: usize,
    magic: c_uint,
    version: c_uint,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

type RawComm = *mut c_void;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankConfig = unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int, *mut Config) -> c_int;
type CommGetAsyncError = unsafe extern "C" fn(RawComm, *mut c_int) -> c_int;
type CommAbort = unsafe extern "C" fn(RawComm) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetLastError = unsafe extern "C" fn(RawComm) -> *const c_char;
type Broadcast = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> c_int;
type SendRecv = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, *mut c_void) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;

/// The loaded library and the calls bound from it. Never unloaded: NCCL starts threads of its
/// own (proxies, the bootstrap), and unloading it under them would crash the process.
struct Api {
    library: String,
    get_version: GetVersion,
    get_unique_id: GetUniqueId,
    comm_init_rank_config: CommInitRankConfig,
    comm_get_async_error: CommGetAsyncError,
    comm_abort: CommAbort,
    get_error_string: GetErrorString,
    get_last_error: Option<GetLastError>,
    broadcast: Broadcast,
    send: SendRecv,
    recv: SendRecv,
    group_start: Group,
    group_end: Group,
}

/// The library, once loaded. A failed load is tried again at the next call (cheaply: a missing
/// library fails at once).
static API: Mutex<Option<&'static Api>> = Mutex::new(None);

/// Why NCCL cannot be used, or an NCCL call failed.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// No libnccl could be loaded.
    #[error("NCCL is not available: {reasons}")]
    NoLibrary { reasons: String },
    /// The library lacks a call weightlift needs (too old, or not libnccl).
    #[error("NCCL is not available: {library} has no {symbol}: {reason}")]
    MissingSymbol { library: String, symbol: &'static str, reason: String },
    /// A call returned an error (`result`: the `ncclResult_t`; `detail`: NCCL's last error).
    #[error("{call} failed: {name} ({result}){}", if detail.is_empty() { String::new() } else { format!(": {detail}") })]
    Call { call: &'static str, result: i32, name: String, detail: String },
    /// A non-blocking call had not completed by its deadline: the communicator was aborted.
    #[error("{call} did not complete within {after:.1?}: a peer died or stalls; the communicator was aborted")]
    Timeout { call: &'static str, after: Duration },
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// What the loaded library reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NcclInfo {
    /// What it was loaded by: the path of [`NCCL_PATH_ENV`], or a name `dlopen` resolved.
    pub library: String,
    /// `ncclGetVersion`: major * 10000 + minor * 100 + patch.
    pub version: i32,
}

/// Loads NCCL (once per process) and says what it is; an error, never a panic, where it or the
/// CUDA driver is missing.
pub fn nccl_available() -> Result<NcclInfo, NcclError> {
    let api = api()?;
    let mut version: c_int = 0;
    // SAFETY: `version` is a writable int for the call to fill.
    check(api, "ncclGetVersion", unsafe { (api.get_version)(&mut version) })?;
    Ok(NcclInfo { library: api.library.clone(), version })
}

fn api() -> Result<&'static Api, NcclError> {
    // libnccl needs libcuda to load at all.
    if !crate::driver_present() {
        return Err(CudaError::NoDriver.into());
    }
    let mut state = API.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(api) = *state {
        return Ok(api);
    }
    let api = load()?;
    *state = Some(api);
    Ok(api)
}

/// The libraries to try, in order: `from_env` ([`NCCL_PATH_ENV`]'s path), then
/// [`LIBRARY_NAMES`].
fn candidates(from_env: Option<String>) -> Vec<String> {
    let from_env = from_env.filter(|p| !p.is_empty());
    from_env.into_iter().chain(LIBRARY_NAMES.iter().map(|n| n.to_string())).collect()
}

fn load() -> Result<&'static Api, NcclError> {
    let (name, library) = load_first(candidates(std::env::var(NCCL_PATH_ENV).ok()))
        .map_err(|reasons| NcclError::NoLibrary { reasons })?;
    fn bound<T: Copy>(library: &'static Library, name: &str, symbol: &'static str) -> Result<T, NcclError> {
        // SAFETY: each `T` below is the symbol's C signature as nccl.h declares it.
        unsafe { bind(library, symbol) }.map_err(|reason| NcclError::MissingSymbol {
            library: name.to_string(),
            symbol,
            reason,
        })
    }
    let api = Api {
        get_version: bound(library, &name, "ncclGetVersion")?,
        get_unique_id: bound(library, &name, "ncclGetUniqueId")?,
        comm_init_rank_config: bound(library, &name, "ncclCommInitRankConfig")?,
        comm_get_async_error: bound(library, &name, "ncclCommGetAsyncError")?,
        comm_abort: bound(library, &name, "ncclCommAbort")?,
        get_error_string: bound(library, &name, "ncclGetErrorString")?,
        get_last_error: bound(library, &name, "ncclGetLastError").ok(),
        broadcast: bound(library, &name, "ncclBroadcast")?,
        send: bound(library, &name, "ncclSend")?,
        recv: bound(library, &name, "ncclRecv")?,
        group_start: bound(library, &name, "ncclGroupStart")?,
        group_end: bound(library, &name, "ncclGroupEnd")?,
        library: name.clone(),
    };
    Ok(Box::leak(Box::new(api)))
}

/// NCCL's name of a result.
fn result_name(api: &Api, result: c_int) -> String {
    // SAFETY: takes any int; returns a static string NCCL owns.
    let name = unsafe { (api.get_error_string)(result) };
    if name.is_null() {
        return format!("ncclResult {result}");
    }
    // SAFETY: non-null, NUL-terminated and static (NCCL's string table).
    unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
}

fn check(api: &Api, call: &'static str, result: c_int) -> Result<(), NcclError> {
    check_on(api, call, result, std::ptr::null_mut())
}

fn check_on(api: &Api, call: &'static str, result: c_int, comm: RawComm) -> Result<(), NcclError> {
    if result == SUCCESS || result == IN_PROGRESS {
        return Ok(());
    }
    let detail = api
        .get_last_error
        .map(|last| {
            // SAFETY: takes a communicator or null; returns a string NCCL owns, valid until the
            // next NCCL call on this thread (copied at once).
            let text = unsafe { last(comm) };
            if text.is_null() {
                String::new()
            } else {
                // SAFETY: non-null and NUL-terminated.
                unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
            }
        })
        .unwrap_or_default();
    Err(NcclError::Call { call, result, name: result_name(api, result), detail })
}

/// One rank of a non-blocking communicator on a GPU. Dropped, it is aborted (which never
/// waits for peers).
pub struct Comm {
    api: &'static Api,
    raw: RawComm,
    rank: u32,
    world: u32,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; `Comm` is used
// through `&mut self` for its calls, so never from two threads at once.
unsafe impl Send for Comm {}

impl Comm {
    /// Joins communicator `id` as `rank` of `world` on `gpu`, waiting up to `timeout` for every
    /// rank to join (then aborting it).
    pub fn init(gpu: &Gpu, id: &UniqueId, rank: u32, world: u32, timeout: Duration) -> Result<Comm, NcclError> {
        let api = api()?;
        if rank >= world {
            return Err(CudaError::Invalid(format!("NCCL rank {rank} of a world of {world}")).into());
        }
        gpu.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut config = Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: 21700,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        };
        let mut raw: RawComm = std::ptr::null_mut();
        let (n, r) = (world as c_int, rank as c_int);
        // SAFETY: `raw` is writable, `config` a valid ncclConfig_t of the 2.17 layout (its
        // `version` says so), `id` a valid unique id passed by value; the GPU's context is
        // current on this thread, as NCCL requires.
        let result = unsafe { (api.comm_init_rank_config)(&mut raw, n, *id, r, &mut config) };
        if result != SUCCESS && result != IN_PROGRESS {
            if !raw.is_null() {
                // SAFETY: a communicator NCCL handed back; aborted once, not used again.
                unsafe { (api.comm_abort)(raw) };
            }
            return Err(check(api, "ncclCommInitRankConfig", result).expect_err("an error result"));
        }
        let comm = Comm { api, raw, rank, world };
        comm.wait("ncclCommInitRankConfig", Instant::now() + timeout)?;
        Ok(comm)
    }

    pub fn rank(&self) -> u32 {
        self.rank
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    /// Waits until the communicator's queued operations were handed to the GPU (or, after
    /// init, it is ready): polls its state, and past `deadline` gives up with
    /// [`NcclError::Timeout`]. An error in the communicator (a peer gone) is returned as is.
    pub fn wait(&self, call: &'static str, deadline: Instant) -> Result<(), NcclError> {
        let started = Instant::now();
        loop {
            let mut state: c_int = SUCCESS;
            // SAFETY: `raw` is this live communicator; `state` is writable.
            let result = unsafe { (self.api.comm_get_async_error)(self.raw, &mut state) };
            check_on(self.api, "ncclCommGetAsyncError", result, self.raw)?;
            match state {
                SUCCESS => return Ok(()),
                IN_PROGRESS if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(50)),
                IN_PROGRESS => return Err(NcclError::Timeout { call, after: started.elapsed() }),
                error => return check_on(self.api, call, error, self.raw),
            }
        }
    }

    /// Waits until the GPU ran everything before `mark` (this communicator's transfers among
    /// it), polling the communicator meanwhile: a peer that failed is its error at once, one
    /// that stalls is [`NcclError::Timeout`] at `deadline` (the caller then drops, so aborts,
    /// the communicator, which ends its transfers still on the GPU).
    pub fn wait_for(&self, mark: &Mark, call: &'static str, deadline: Instant) -> Result<(), NcclError> {
        let started = Instant::now();
        loop {
            if mark.done()? {
                return Ok(());
            }
            self.wait(call, deadline)?;
            if Instant::now() >= deadline {
                return Err(NcclError::Timeout { call, after: started.elapsed() });
            }
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Queues a broadcast of `bytes` from `root`'s `src` into every rank's `dst` (device
    /// addresses on this rank's GPU; the same address on every rank moves in place) on
    /// `gpu`'s `lane`, then waits (see [`Comm::wait`]) until it is queued there.
    #[allow(clippy::too_many_arguments)]
    pub fn broadcast(
        &mut self,
        gpu: &Gpu,
        lane: Lane,
        src: u64,
        dst: u64,
        bytes: usize,
        root: u32,
        deadline: Instant,
    ) -> Result<(), NcclError> {
        gpu.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let stream = gpu.lane(lane).cu_stream() as *mut c_void;
        // SAFETY: `src` and `dst` are device addresses the caller guarantees hold `bytes` bytes
        // until the GPU's stream ran the broadcast; the communicator is live.
        let result = unsafe {
            (self.api.broadcast)(
                src as *const c_void,
                dst as *mut c_void,
                bytes,
                UINT8,
                root as c_int,
                self.raw,
                stream,
            )
        };
        check_on(self.api, "ncclBroadcast", result, self.raw)?;
        self.wait("ncclBroadcast", deadline)
    }

    /// Queues, as one group on `gpu`'s `lane`, every send (`sends`: address, bytes, peer) and
    /// receive (`recvs`: address, bytes, peer), then waits until they are queued there.
    pub fn exchange(
        &mut self,
        gpu: &Gpu,
        lane: Lane,
        sends: &[(u64, usize, u32)],
        recvs: &[(u64, usize, u32)],
        deadline: Instant,
    ) -> Result<(), NcclError> {
        gpu.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let stream = gpu.lane(lane).cu_stream() as *mut c_void;
        // SAFETY: no arguments; paired with the group end below on every path.
        check(self.api, "ncclGroupStart", unsafe { (self.api.group_start)() })?;
        let mut queued = Ok(());
        for &(ptr, bytes, peer) in sends {
            // SAFETY: as for `broadcast`: the caller guarantees the memory; the comm is live.
            let result = unsafe { (self.api.send)(ptr as *mut c_void, bytes, UINT8, peer as c_int, self.raw, stream) };
            queued = queued.and(check_on(self.api, "ncclSend", result, self.raw));
        }
        for &(ptr, bytes, peer) in recvs {
            // SAFETY: as above.
            let result = unsafe { (self.api.recv)(ptr as *mut c_void, bytes, UINT8, peer as c_int, self.raw, stream) };
            queued = queued.and(check_on(self.api, "ncclRecv", result, self.raw));
        }
        // SAFETY: no arguments; ends the group started above.
        let ended = check_on(self.api, "ncclGroupEnd", unsafe { (self.api.group_end)() }, self.raw);
        queued.and(ended)?;
        self.wait("ncclGroupEnd", deadline)
    }

    /// Moves an update's buckets through two device buffers, the next bucket's transfer
    /// queued while the last one is packed or scattered: per bucket `k` (buffer `k % 2`), the
    /// sender's pack on the main lane, the move on the side lane, the receiver's scatter on the
    /// main lane, each waiting on the GPU for what it needs (a buffer is written again only
    /// once its last bucket was sent or scattered). Returns once the GPU ran all of it, or
    /// with the first error; past `deadline` with [`NcclError::Timeout`].
    pub fn run_buckets(&mut self, gpu: &Gpu, buckets: &[BucketStep<'_>], deadline: Instant) -> Result<(), NcclError> {
        let mut free: [Option<Mark>; 2] = [None, None];
        for (k, step) in buckets.iter().enumerate() {
            let b = k % 2;
            match step.pack {
                Some(pack) => {
                    if let Some(mark) = &free[b] {
                        gpu.wait_mark(Lane::Main, mark)?;
                    }
                    gpu.run_copies(pack)?;
                    gpu.wait_mark(Lane::Side, &gpu.mark(Lane::Main)?)?;
                }
                None => {
                    if let Some(mark) = &free[b] {
                        gpu.wait_mark(Lane::Side, mark)?;
                    }
                }
            }
            let bytes = step.bytes as usize;
            match step.moves[b] {
                Move::Broadcast { buffer, root } => {
                    self.broadcast(gpu, Lane::Side, buffer, buffer, bytes, root, deadline)?;
                }
                Move::ToSelf { from, to } => {
                    let me = self.rank;
                    self.exchange(gpu, Lane::Side, &[(from, bytes, me)], &[(to, bytes, me)], deadline)?;
                }
            }
            let moved = gpu.mark(Lane::Side)?;
            free[b] = Some(match step.scatter {
                Some(scatter) => {
                    gpu.wait_mark(Lane::Main, &moved)?;
                    gpu.run_copies(scatter)?;
                    gpu.mark(Lane::Main)?
                }
                None => moved,
            });
        }
        gpu.wait_mark(Lane::Main, &gpu.mark(Lane::Side)?)?;
        let all = gpu.mark(Lane::Main)?;
        self.wait_for(&all, "the update's transfers", deadline)
    }
}

/// How one bucket reaches its buffer (see [`Comm::run_buckets`]), per buffer of the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    /// A broadcast in place from `root`'s buffer into every other rank's.
    Broadcast { buffer: u64, root: u32 },
    /// This rank sends its buffer `from` to itself, into `to` (one GPU, one rank: how the
    /// path is tested where there is one GPU).
    ToSelf { from: u64, to: u64 },
}

/// One bucket of [`Comm::run_buckets`]: packed into its buffer by `pack` (the sender), moved
/// by `moves[k % 2]`, scattered from it into the tensors by `scatter` (a receiver).
pub struct BucketStep<'a> {
    pub bytes: u64,
    pub pack: Option<&'a CopyBatch>,
    pub moves: [Move; 2],
    pub scatter: Option<&'a CopyBatch>,
}

impl Drop for Comm {
    fn drop(&mut self) {
        // SAFETY: this live communicator, aborted once and never used again. Abort frees it
        // without waiting for peers, which a rank tearing down after a failure needs.
        unsafe { (self.api.comm_abort)(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_ids_round_trip_through_hex_and_anything_else_is_refused() {
        let id = UniqueId { internal: std::array::from_fn(|i| (i * 7 + 3) as u8) };
        assert_eq!(UniqueId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(UniqueId::from_hex("00"), None);
        assert_eq!(UniqueId::from_hex(&"zz".repeat(128)), None);
        assert_eq!(UniqueId::from_hex(&"é".repeat(128)), None);
    }

    /// Without NCCL (or a GPU driver) every entry point is an error that says why, naming
    /// what was tried; never a panic.
    #[test]
    fn a_machine_without_nccl_gets_an_error_naming_what_was_tried() {
        if nccl_available().is_ok() {
            return; // NCCL is here: the GPU tests exercise it.
        }
        match nccl_available().unwrap_err() {
            NcclError::Cuda(CudaError::NoDriver) => assert!(!crate::driver_present()),
            NcclError::NoLibrary { reasons } => assert!(reasons.contains("libnccl.so.2"), "{reasons}"),
            other => panic!("unexpected: {other}"),
        }
        assert!(UniqueId::new().is_err());
    }

    #[test]
    fn the_path_from_the_environment_is_tried_first() {
        assert_eq!(candidates(None), LIBRARY_NAMES);
        assert_eq!(candidates(Some(String::new())), LIBRARY_NAMES);
        let path = "/site-packages/nvidia/nccl/lib/libnccl.so.2".to_string();
        assert_eq!(candidates(Some(path.clone())), [path.as_str(), LIBRARY_NAMES[0], LIBRARY_NAMES[1]]);
    }
}
