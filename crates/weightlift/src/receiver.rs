//! The engine side: holds the destination tensors, takes updates into them in place, verifies
//! every byte against the sender's digests, and commits versions.
//!
//! Any failure (a sender that dies or stalls, a corrupted bucket, a digest mismatch, a bad
//! message) leaves the receiver on its last committed version, marked dirty with the tensors
//! the failed update touched, and ready for the next attempt.

use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weightlift_core::{digest, plan, Manifest, Plan, SourceSet, TpRank, Version, VersionError, VersionState};

use std::os::unix::net::UnixStream;

use weightlift_core::RuleSet;

use crate::cuda_ipc::{DeviceTensors, Importer};
use crate::net::{Listener, Stream};
use crate::protocol::{Conn, Message, ProtocolError, TransportKind, MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES};
use crate::report::{peak_rss_bytes, UpdateOutcome, UpdateReport};
use crate::sender::{SendError, Sender, SenderOptions};
use crate::session::{self, ConnectionLimit, SessionError, Token};
use crate::staged::{StagedUpdate, Staging};
use crate::tensors::DestinationTensors;
use crate::transport::{Arrived, LocalRing, RecvPath, TransferError};
use crate::update::{default_threads, receiver_digests, unpack, Schedule};
use weightlift_core::digest::ChunkDigests;
use weightlift_cuda::{CudaError, Gpu};

#[derive(Debug, Clone)]
pub struct ReceiverOptions {
    pub tp: TpRank,
    /// Slots in each sender's shared-memory ring (2: pack one while the other unpacks).
    pub ring_slots: u32,
    /// The largest bucket a sender may ask for; bounds the memory a connection holds.
    pub max_bucket_bytes: u64,
    /// Longest wait for the next message while an update is in flight.
    pub timeout: Duration,
    /// Longest a new connection may take from its first byte to its hello (one deadline for
    /// the whole handshake).
    pub handshake_timeout: Duration,
    /// Senders must prove they hold this token before anything else is read.
    pub token: Option<Token>,
    /// Connections served at once; more are refused with the reason.
    pub max_connections: usize,
    pub initial_version: Version,
    /// Threads that unpack and digest.
    pub threads: usize,
    /// The rules this engine's layout needs (named, e.g. by preset): a sender offering other
    /// rules is refused at hello. None accepts the sender's.
    pub expected_rules: Option<(String, RuleSet)>,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            tp: TpRank::SINGLE,
            ring_slots: 2,
            max_bucket_bytes: 1 << 30,
            timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            token: None,
            max_connections: 64,
            initial_version: Version(0),
            threads: default_threads(),
            expected_rules: None,
        }
    }
}

struct State {
    versions: VersionState,
    /// Digest of each tensor at the committed version; None while unknown or dirty.
    digests: Vec<Option<u64>>,
    last_report: Option<UpdateReport>,
}

struct Shared {
    options: ReceiverOptions,
    manifest: Manifest,
    state: Mutex<State>,
    /// Signalled whenever a version is committed.
    committed: Condvar,
    /// Written only by the connection whose update is in flight (the version state admits
    /// one at a time), read by checkers between updates.
    tensors: Mutex<Store>,
    /// Called with the report of every settled update (metrics, logs).
    observers: Mutex<Vec<UpdateObserver>>,
    /// Asked before the tensors are touched; see [`Receiver::set_write_gate`].
    gate: Mutex<Option<WriteGate>>,
}

/// Says whether the destination tensors may be touched now; `Err(reason)` when not (their
/// memory is released, say). See [`Receiver::set_write_gate`].
pub type WriteGate = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Something told of every settled update, committed or not.
pub type UpdateObserver = Arc<dyn Fn(&UpdateReport) + Send + Sync>;

/// The receiver's version state at a glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverStatus {
    pub committed: Version,
    /// The version being received or verified now, if any.
    pub in_flight: Option<Version>,
    /// Tensors that may not hold the committed version's bytes.
    pub dirty: Vec<String>,
}

/// What a connection this receiver dialled must bring: one update, of exactly this version,
/// over this transport when given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub version: Version,
    pub transport: Option<TransportKind>,
}

/// Why a fetch from a sender gave no update.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the sender at {endpoint}: {source}")]
    Connect { endpoint: String, source: std::io::Error },
    #[error("the sender at {endpoint}: {reason}")]
    Sender { endpoint: String, reason: String },
    #[error("the sender at {endpoint} closed the connection without an update")]
    NoUpdate { endpoint: String },
    /// This receiver's version state refused the sender's version (another update in flight,
    /// or not newer than the committed one).
    #[error("version refused: {0}")]
    Version(VersionError),
}

/// Where the receiver's tensors live.
enum Store {
    Host(Box<dyn DestinationTensors>),
    /// On a GPU: updates arrive over CUDA IPC.
    Device {
        gpu: Arc<Gpu>,
        tensors: Box<dyn DeviceTensors>,
    },
}

/// A [`Receiver`] that may have been dropped (for hooks that must not keep it alive).
#[derive(Clone)]
pub struct WeakReceiver(std::sync::Weak<Shared>);

impl WeakReceiver {
    pub fn upgrade(&self) -> Option<Receiver> {
        self.0.upgrade().map(|shared| Receiver { shared })
    }
}

/// A receiver; cheap to clone (all clones share the tensors and the state).
#[derive(Clone)]
pub struct Receiver {
    shared: Arc<Shared>,
}

/// Why one connection ended early (logged; the receiver keeps serving).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Version(VersionError),
}

impl Receiver {
    /// A receiver holding `tensors` at `options.initial_version`.
    pub fn new(tensors: impl DestinationTensors + 'static, options: ReceiverOptions) -> Receiver {
        let manifest = tensors.manifest().clone();
        let digests = (0..manifest.len()).map(|i| Some(digest::digest(tensors.bytes(i)))).collect();
        Receiver::with_store(manifest, digests, Store::Host(Box::new(tensors)), options)
    }

    /// A receiver whose tensors live on `gpu` (written in place by updates over CUDA IPC).
    pub fn on_gpu(
        gpu: Arc<Gpu>,
        tensors: impl DeviceTensors + 'static,
        options: ReceiverOptions,
    ) -> Result<Receiver, CudaError> {
        let manifest = tensors.manifest().clone();
        let digests = tensors.digests(&gpu)?.into_iter().map(Some).collect();
        let store = Store::Device { gpu, tensors: Box::new(tensors) };
        Ok(Receiver::with_store(manifest, digests, store, options))
    }

    fn with_store(manifest: Manifest, digests: Vec<Option<u64>>, store: Store, options: ReceiverOptions) -> Receiver {
        let state = State { versions: VersionState::new(options.initial_version), digests, last_report: None };
        Receiver {
            shared: Arc::new(Shared {
                options,
                manifest,
                state: Mutex::new(state),
                committed: Condvar::new(),
                tensors: Mutex::new(store),
                observers: Mutex::new(Vec::new()),
                gate: Mutex::new(None),
            }),
        }
    }

    pub fn manifest(&self) -> &Manifest {
        &self.shared.manifest
    }

    pub fn committed(&self) -> Version {
        self.state().versions.committed()
    }

    /// Tensors whose bytes may not match the committed version (empty when clean).
    pub fn dirty(&self) -> Vec<String> {
        self.state().versions.dirty().iter().cloned().collect()
    }

    pub fn last_report(&self) -> Option<UpdateReport> {
        self.state().last_report.clone()
    }

    pub fn status(&self) -> ReceiverStatus {
        let state = self.state();
        ReceiverStatus {
            committed: state.versions.committed(),
            in_flight: state.versions.in_flight(),
            dirty: state.versions.dirty().iter().cloned().collect(),
        }
    }

    /// Calls `observer` with the report of every update settled from now on (committed or
    /// failed), from whatever connection brought it.
    pub fn observe(&self, observer: UpdateObserver) {
        self.shared.observers.lock().unwrap_or_else(|e| e.into_inner()).push(observer);
    }

    /// Dials a sender waiting at `endpoint` (one that accepts receivers, such as `weightlift
    /// push --listen`) and takes the one update it brings, which must be `expect`'s version
    /// (and transport). Returns that update's report, committed or not; a sender that offers
    /// another version or transport, or brings nothing, is an error and changes nothing.
    pub fn fetch(&self, endpoint: &crate::net::Endpoint, expect: Expect) -> Result<UpdateReport, FetchError> {
        let name = endpoint.to_string();
        let stream = endpoint
            .connect(self.shared.options.handshake_timeout)
            .map_err(|source| FetchError::Connect { endpoint: name.clone(), source })?;
        match self.run_connection(stream, None, Some(expect)) {
            Ok(Some(report)) => Ok(report),
            Ok(None) | Err(ConnectionError::Protocol(ProtocolError::Closed)) => {
                Err(FetchError::NoUpdate { endpoint: name })
            }
            Err(ConnectionError::Version(e)) => Err(FetchError::Version(e)),
            Err(e) => Err(FetchError::Sender { endpoint: name, reason: e.to_string() }),
        }
    }

    /// Runs `f` on the tensors if they are in host memory (waits while an update is writing
    /// them); None for tensors on a GPU.
    pub fn with_host_tensors<R>(&self, f: impl FnOnce(&dyn DestinationTensors) -> R) -> Option<R> {
        match &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
            Store::Host(tensors) => Some(f(tensors.as_ref())),
            Store::Device { .. } => None,
        }
    }

    /// Installs `gate`, asked before every update, digest and overwrite: an update is refused
    /// (at its begin, nothing written) and a digest or overwrite fails with its reason while
    /// the gate says no. For tensors in tagged memory that may be paused, where touching them
    /// would fault the GPU.
    pub fn set_write_gate(&self, gate: WriteGate) {
        *self.shared.gate.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate);
    }

    fn gate(&self) -> Result<(), String> {
        let gate = self.shared.gate.lock().unwrap_or_else(|e| e.into_inner()).clone();
        gate.map_or(Ok(()), |gate| gate())
    }

    /// The digest of every tensor as its bytes are now, computed where they live.
    pub fn current_digests(&self) -> Result<Vec<u64>, CudaError> {
        self.gate().map_err(CudaError::Invalid)?;
        match &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
            Store::Host(tensors) => {
                Ok((0..self.shared.manifest.len()).map(|i| digest::digest(tensors.bytes(i))).collect())
            }
            Store::Device { gpu, tensors } => tensors.digests(gpu),
        }
    }

    /// Accepts connections until the listener fails; one thread per connection, at most
    /// `max_connections` at once (one more is told so and closed).
    pub fn serve(&self, listener: &Listener) -> std::io::Result<()> {
        let limit = ConnectionLimit::new(self.shared.options.max_connections);
        loop {
            let stream = listener.accept()?;
            let Some(slot) = limit.try_take() else {
                let reason = format!("this receiver serves at most {} connections at once", limit.max());
                tracing::warn!(peer = stream.peer(), "{reason}");
                // Best effort, without waiting on the peer: the frame fits any socket buffer.
                let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
                let _ = Conn::refuse(stream, reason);
                continue;
            };
            let receiver = self.clone();
            std::thread::spawn(move || {
                let _slot = slot;
                receiver.handle(stream)
            });
        }
    }

    /// Serves one connection to its end; problems are logged, never propagated.
    pub fn handle(&self, stream: Stream) {
        self.handle_with(stream, None);
    }

    /// A sender in this process: with `options.transport` cuda-ipc (GPU sources), the receiver
    /// pulls straight from the sender's GPU memory; otherwise (host sources) buckets move
    /// through a ring in this process's memory, into host tensors or through device staging
    /// into GPU ones.
    pub fn connect_in_process(
        &self,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| SendError::Connect { endpoint: "in-process".into(), source: e })?;
        let receiver = self.clone();
        // The same process holds the token on both sides.
        let options = SenderOptions { token: self.shared.options.token.clone(), ..options };
        if options.transport == TransportKind::CudaIpc {
            std::thread::spawn(move || receiver.handle_with(Stream::Unix(theirs), None));
            return Sender::connect_stream(Stream::Unix(ours), "in-process".into(), source, rules, options, None);
        }
        if options.bucket_bytes > self.shared.options.max_bucket_bytes {
            return Err(SendError::Rejected(format!(
                "bucket size {} exceeds the receiver's limit of {}",
                options.bucket_bytes, self.shared.options.max_bucket_bytes
            )));
        }
        let ring = Arc::new(LocalRing::new(self.shared.options.ring_slots, options.bucket_bytes));
        let receiver_ring = ring.clone();
        std::thread::spawn(move || receiver.handle_with(Stream::Unix(theirs), Some(receiver_ring)));
        let options = SenderOptions { transport: TransportKind::InProcess, ..options };
        Sender::connect_stream(Stream::Unix(ours), "in-process".into(), source, rules, options, Some(ring))
    }

    /// Whether the tensors live on a GPU (updates then arrive over CUDA IPC).
    pub fn is_on_gpu(&self) -> bool {
        matches!(*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()), Store::Device { .. })
    }

    /// Waits until the committed version is above `version`, up to `timeout`; returns the
    /// committed version either way.
    pub fn wait_for_version_after(&self, version: Version, timeout: Duration) -> Version {
        let mut state = self.state();
        let deadline = Instant::now() + timeout;
        while state.versions.committed() <= version {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.shared.committed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        state.versions.committed()
    }

    /// Fills every tensor with `value` bytes and marks them all dirty (what a checker does to
    /// prove the next update writes everything). Waits while an update is writing.
    pub fn poison(&self, value: u8) -> Result<(), CudaError> {
        self.overwrite(|_, bytes| bytes.fill(value), |_| value)
    }

    /// Overwrites every tensor with pseudo-random bytes from `seed` (on a GPU, each tensor with
    /// one random byte value) and marks them all dirty, like [`Receiver::poison`].
    pub fn scramble(&self, seed: u64) -> Result<(), CudaError> {
        self.overwrite(|i, bytes| fill_random(bytes, seed ^ (i as u64)), |i| mix(seed ^ (i as u64)) as u8)
    }

    /// Forgets the bytes of the tensors named (their memory was released without a backup):
    /// their digests become unknown and they are marked dirty, so the next update rewrites
    /// them whatever the sender's digests say.
    pub fn forget(&self, names: &[String]) {
        let mut state = self.state();
        for (i, spec) in self.shared.manifest.iter().enumerate() {
            if names.contains(&spec.name) {
                state.digests[i] = None;
            }
        }
        state.versions.mark_dirty(names.to_vec());
    }

    /// A handle that does not keep the receiver (and its tensors) alive.
    pub fn downgrade(&self) -> WeakReceiver {
        WeakReceiver(Arc::downgrade(&self.shared))
    }

    fn overwrite(&self, host: impl Fn(usize, &mut [u8]), device: impl Fn(usize) -> u8) -> Result<(), CudaError> {
        self.gate().map_err(CudaError::Invalid)?;
        let mut store = self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *store {
            Store::Host(tensors) => tensors.all_mut().into_iter().enumerate().for_each(|(i, t)| host(i, t)),
            Store::Device { gpu, tensors } => tensors.fill_each(gpu, &device)?,
        }
        let mut state = self.state();
        state.digests.iter_mut().for_each(|d| *d = None);
        let names: Vec<String> = self.shared.manifest.iter().map(|s| s.name.clone()).collect();
        state.versions.mark_dirty(names);
        Ok(())
    }

    fn handle_with(&self, stream: Stream, local_ring: Option<Arc<LocalRing>>) {
        let peer = stream.peer();
        match self.run_connection(stream, local_ring, None) {
            Ok(_) | Err(ConnectionError::Protocol(ProtocolError::Closed)) => {
                tracing::debug!(%peer, "connection closed")
            }
            Err(e) => tracing::warn!(%peer, "dropping connection: {e}"),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves a connection's updates until it closes; with `expect` (a connection this
    /// receiver dialled), takes only that one update and returns its report.
    fn run_connection(
        &self,
        stream: Stream,
        local_ring: Option<Arc<LocalRing>>,
        expect: Option<Expect>,
    ) -> Result<Option<UpdateReport>, ConnectionError> {
        let options = &self.shared.options;
        // The whole handshake, authentication to welcome, has one deadline: a peer that
        // trickles bytes cannot hold a connection open longer.
        let deadline = Instant::now() + options.handshake_timeout;
        let mut conn = Conn::server(stream, deadline)?;
        session::authenticate_sender(&mut conn, options.token.as_ref(), deadline)?;
        let (source, rules, bucket_bytes, transport, device_writes) =
            match conn.recv_before(deadline, MAX_MESSAGE_BYTES)? {
                Message::Hello { source, rules, bucket_bytes, transport, device_writes } => {
                    (source, rules, bucket_bytes, transport, device_writes)
                }
                other => {
                    return Err(ProtocolError::Unexpected { expected: "hello", got: other.name().into() }.into());
                }
            };
        let refuse = |conn: &mut Conn, reason: String| {
            let _ = conn.send(&Message::Reject { reason: reason.clone() });
            ConnectionError::Refused(reason)
        };
        if bucket_bytes < 8 || bucket_bytes > options.max_bucket_bytes {
            let max = options.max_bucket_bytes;
            return Err(refuse(&mut conn, format!("bucket size {bucket_bytes} is outside 8..={max} bytes")));
        }
        if let Some(wanted) = expect.and_then(|e| e.transport).filter(|&t| t != transport) {
            return Err(refuse(
                &mut conn,
                format!("this receiver asked for {wanted}, and the sender offers {transport}"),
            ));
        }
        if let Some((name, expected)) = &options.expected_rules {
            if !expected.same_layout(&rules) {
                return Err(refuse(
                    &mut conn,
                    format!("this receiver's layout follows {name}, and the sender offered other rules"),
                ));
            }
        }
        let plan = match plan(&SourceSet::single(source.clone()), &self.shared.manifest, &rules, options.tp) {
            Ok(plan) => plan,
            Err(e) => return Err(refuse(&mut conn, e.to_string())),
        };
        // The schedule of an update that skips nothing: built once for this connection.
        let full = Schedule::new(&plan, &[], bucket_bytes).expect("bucket size was validated above");
        if transport == TransportKind::CudaIpc && !self.is_on_gpu() {
            let reason = "this receiver's tensors are in host memory: cuda-ipc needs them on a GPU".to_string();
            return Err(refuse(&mut conn, reason));
        }
        let (mut path, ring) = match transport {
            TransportKind::CudaIpc => (RecvPath::socket(0), None),
            TransportKind::Shm => {
                let (path, info) = RecvPath::ring(options.ring_slots, bucket_bytes)?;
                (path, Some(info))
            }
            TransportKind::Tcp => (RecvPath::socket(bucket_bytes), None),
            TransportKind::InProcess => match local_ring {
                Some(ring) => {
                    let (path, info) = RecvPath::local(ring);
                    (path, Some(info))
                }
                None => {
                    return Err(refuse(
                        &mut conn,
                        "the in-process transport is for Receiver::connect_in_process".into(),
                    ))
                }
            },
        };
        // Host buckets into a GPU's tensors go through device staging.
        let staging = match (transport, &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner())) {
            (TransportKind::CudaIpc, _) | (_, Store::Host(_)) => None,
            (_, Store::Device { gpu, tensors }) => {
                // A sender on this host that can copy to the GPU itself gets device slots; one
                // across a socket cannot map them.
                let slots = device_writes && matches!(transport, TransportKind::Shm | TransportKind::InProcess);
                match Staging::new(gpu.clone(), &plan, &full, tensors.device_ptrs(), bucket_bytes, slots) {
                    Ok(mut staging) => {
                        path.each_memory(|memory| staging.pin(memory));
                        Some(staging)
                    }
                    Err(e) => return Err(refuse(&mut conn, format!("cannot stage updates on the GPU: {e}"))),
                }
            }
        };
        let (committed, dirty, digests) = {
            let state = self.state();
            (state.versions.committed(), state.versions.dirty().iter().cloned().collect(), state.digests.clone())
        };
        let offer = match staging.as_ref().map(|s| s.offer(bucket_bytes)).transpose() {
            Ok(offer) => offer.flatten(),
            Err(e) => return Err(refuse(&mut conn, format!("cannot share device slots: {e}"))),
        };
        let (slots, slot_fds) = offer.map_or((None, Vec::new()), |(info, fds)| (Some(info), fds));
        conn.send(&Message::Welcome {
            destination: self.shared.manifest.clone(),
            tp: options.tp,
            plan_hash: plan.hash_hex(),
            committed,
            dirty,
            digests,
            ring,
            slots: slots.clone(),
        })?;
        if !slot_fds.is_empty() {
            conn.send_fds(&slot_fds.iter().map(|fd| fd.as_fd()).collect::<Vec<_>>())?;
        }
        drop(slot_fds);
        if matches!(transport, TransportKind::Shm | TransportKind::InProcess) {
            match (conn.recv_before(deadline, MAX_HANDSHAKE_BYTES)?, &slots) {
                (Message::RingMapped, _) => path.unlink(),
                (Message::SlotsMapped, Some(slots)) => {
                    path.unlink();
                    path.use_device_slots(slots.count);
                }
                (other, _) => {
                    return Err(ProtocolError::Unexpected { expected: "ring_mapped", got: other.name().into() }.into())
                }
            }
        }
        tracing::info!(peer = conn.peer(), %transport, ops = plan.ops.len(), "sender connected");
        let mut importer = Importer::default();

        loop {
            // Between updates a sender may stay idle for as long as training takes; a sender
            // this receiver dialled brings its update now.
            let idle = if expect.is_some() { options.timeout } else { Duration::from_secs(24 * 3600) };
            let (version, skip) = match conn.recv(idle)? {
                Message::Begin { version, skip } => (version, skip),
                other => return Err(ProtocolError::Unexpected { expected: "begin", got: other.name().into() }.into()),
            };
            if let Some(&bad) = skip.iter().find(|&&d| d as usize >= self.shared.manifest.len()) {
                conn.send(&Message::Refused {
                    reason: format!("skip list names tensor index {bad}, which does not exist"),
                })?;
                continue;
            }
            if let Some(wanted) = expect.map(|e| e.version).filter(|&v| v != version) {
                let reason = format!("this receiver asked for version {wanted}, and the sender offers {version}");
                conn.send(&Message::Refused { reason: reason.clone() })?;
                return Err(ConnectionError::Refused(reason));
            }
            if let Err(reason) = self.gate() {
                let reason = format!("version {version} refused: {reason}");
                tracing::info!(%version, "{reason}");
                conn.send(&Message::Refused { reason: reason.clone() })?;
                if expect.is_some() {
                    return Err(ConnectionError::Refused(reason));
                }
                continue;
            }
            if let Err(e) = self.state().versions.begin(version) {
                tracing::info!(%version, "refused: {e}");
                conn.send(&Message::Refused { reason: e.to_string() })?;
                if expect.is_some() {
                    return Err(ConnectionError::Version(e));
                }
                continue;
            }
            // A tensor whose bytes the receiver no longer vouches for cannot be skipped.
            let stale: Vec<u32> = {
                let state = self.state();
                skip.iter().copied().filter(|&d| state.digests[d as usize].is_none()).collect()
            };
            let skip: Vec<u32> = skip.into_iter().filter(|d| !stale.contains(d)).collect();
            let started = Instant::now();
            let mut touched = vec![false; plan.destinations.len()];
            let (outcome, report) = match conn.send(&Message::Accepted { version, stale }) {
                Err(e) => (Outcome::Broken(format!("accepting the update: {e}")), UpdateReport::default()),
                Ok(()) if transport == TransportKind::CudaIpc => {
                    self.transfer_ipc(&mut conn, &mut importer, &plan, &source, version, &mut touched)
                }
                Ok(()) => {
                    let staging = staging.as_ref();
                    self.transfer_host(
                        &mut conn,
                        &mut path,
                        &plan,
                        &full,
                        staging,
                        version,
                        &skip,
                        bucket_bytes,
                        &mut touched,
                    )
                }
            };
            let outcome = match outcome {
                Outcome::Verified { two_phase: true, .. } => self.await_decision(&mut conn, version, outcome),
                other => other,
            };
            let (report, in_sync) = self.settle(&plan, version, outcome, &touched, report, started);
            log_report(&report);
            self.state().last_report = Some(report.clone());
            let observers = self.shared.observers.lock().unwrap_or_else(|e| e.into_inner()).clone();
            observers.iter().for_each(|observe| observe(&report));
            // Best effort: a sender that broke the transfer may be gone already.
            let sent = conn.send(&Message::Report { report: report.clone() });
            if expect.is_some() {
                return Ok(Some(report));
            }
            if !in_sync {
                // The stream may be mid-message after a broken transfer: this connection is done.
                return Err(ConnectionError::Refused(report.error.unwrap_or_default()));
            }
            sent?;
        }
    }

    /// Takes one update's buckets from a host transport into the tensors (in host memory, or
    /// on a GPU through `staging`), digesting them, and compares with the sender's digests.
    /// Marks in `touched` each tensor written.
    #[allow(clippy::too_many_arguments)]
    fn transfer_host(
        &self,
        conn: &mut Conn,
        path: &mut RecvPath,
        plan: &Plan,
        full: &Schedule,
        staging: Option<&Staging>,
        version: Version,
        skip: &[u32],
        bucket_bytes: u64,
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport) {
        let timeout = self.shared.options.timeout;
        let schedule = full.for_skip(plan, skip, bucket_bytes).expect("bucket size was validated at hello");
        let threads = self.shared.options.threads;
        let mut store = self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = UpdateReport {
            bytes: schedule.bytes,
            tensors: schedule.written.iter().filter(|&&w| w).count(),
            buckets: schedule.buckets.len(),
            skipped_tensors: skip.len(),
            bytes_saved: skip.iter().map(|&d| plan.destinations[d as usize].byte_len()).sum(),
            sender_digests: true,
            device_extra_bytes: staging.map_or(0, Staging::device_bytes),
            ..UpdateReport::default()
        };
        let sink = match (&mut *store, staging) {
            (Store::Host(tensors), _) => Ok(Sink::Host { tensors: tensors.as_mut(), digests: schedule.digests(plan) }),
            (Store::Device { .. }, Some(staging)) => {
                staging.update(plan, &schedule, !skip.is_empty()).map(Sink::Device).map_err(|e| e.to_string())
            }
            (Store::Device { .. }, None) => Err("no staging for a GPU receiver".to_string()),
        };
        let mut sink = match sink {
            Ok(sink) => sink,
            Err(e) => return (Outcome::Broken(format!("preparing the update: {e}")), report),
        };
        let mut unpack_seconds = 0.0;
        let mut outcome = None;
        for (k, bucket) in schedule.buckets.iter().enumerate() {
            let received = path.recv_bucket(conn, k as u32, bucket.bytes, timeout, |arrived| {
                for entry in &bucket.entries {
                    touched[entry.op.dst as usize] = true;
                }
                let t = Instant::now();
                let written = sink.write(plan, &schedule, k, arrived, threads);
                unpack_seconds += t.elapsed().as_secs_f64();
                written
            });
            match received {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    outcome = Some(Outcome::Broken(format!("writing bucket {k}: {e}")));
                    break;
                }
                Err(TransferError::SenderAborted(reason)) => {
                    outcome = Some(Outcome::called_off(reason));
                    break;
                }
                Err(e) => {
                    outcome = Some(Outcome::Broken(format!("bucket {k} of {}: {e}", schedule.buckets.len())));
                    break;
                }
            }
        }
        let outcome = outcome.unwrap_or_else(|| {
            let _ = self.state().versions.verify(version);
            let t = Instant::now();
            let ours = match sink.digests(&schedule) {
                Ok(ours) => ours,
                Err(e) => return Outcome::Broken(format!("digesting the update: {e}")),
            };
            unpack_seconds += t.elapsed().as_secs_f64();
            match conn.recv(timeout) {
                Ok(Message::End { version: v, digests, two_phase }) if v == version => {
                    let mismatched = compare(plan, &schedule.written, &ours, &digests);
                    if mismatched.is_empty() {
                        Outcome::Verified { digests: ours, compared: true, two_phase }
                    } else {
                        Outcome::Mismatch(mismatched)
                    }
                }
                Ok(Message::Abort { reason }) => Outcome::called_off(reason),
                Ok(other) => Outcome::Broken(format!("expected the end of version {version}, got {}", other.name())),
                Err(e) => Outcome::Broken(format!("waiting for the end of the update: {e}")),
            }
        });
        drop(sink);
        drop(store);
        report.unpack_seconds = unpack_seconds;
        (outcome, report)
    }

    /// Takes one update over CUDA IPC: maps the sender's memory (what is not mapped yet), pulls
    /// every destination in one pass with its digests, and compares with the sender's.
    fn transfer_ipc(
        &self,
        conn: &mut Conn,
        importer: &mut Importer,
        plan: &Plan,
        source: &Manifest,
        version: Version,
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport) {
        let timeout = self.shared.options.timeout;
        let store = self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let Store::Device { gpu, tensors } = &*store else {
            unreachable!("cuda-ipc is refused at hello for tensors in host memory");
        };
        let mut report = UpdateReport {
            bytes: plan.destinations.iter().map(|d| d.byte_len()).sum(),
            tensors: plan.destinations.len(),
            ..UpdateReport::default()
        };
        // Any error here means the transfer broke off (Outcome::Broken, with the reason).
        let outcome = (|| -> Result<Outcome, String> {
            let message = conn.recv(timeout).map_err(|e| format!("waiting for the sender's memory: {e}"))?;
            let (pid, device, segments, located, fds, sender_digests) = match message {
                Message::IpcSources { pid, device, segments, tensors, fds, sender_digests } => {
                    (pid, device, segments, tensors, fds, sender_digests)
                }
                Message::Abort { reason } => return Ok(Outcome::called_off(reason)),
                other => return Err(format!("expected ipc_sources, got {}", other.name())),
            };
            let fds = conn
                .recv_fds(fds as usize, timeout)
                .map_err(|e| format!("receiving the sender's memory descriptors: {e}"))?;
            report.sender_digests = sender_digests;
            let resolved = importer.resolve(gpu, source, pid, &device, segments, located, fds)?;
            report.ipc_opens = resolved.opens;
            report.same_gpu = Some(resolved.same_gpu);
            let bound = importer
                .plan(gpu, plan, &resolved, &tensors.device_ptrs())
                .map_err(|e| format!("binding the update to the sender's memory: {e}"))?;
            report.device_extra_bytes = bound.device_bytes();
            report.launches = bound.launches();
            touched.fill(true);
            let pulled = Instant::now();
            let ours = bound.update(gpu).map_err(|e| format!("pulling the update: {e}"))?;
            report.unpack_seconds = pulled.elapsed().as_secs_f64();
            let _ = self.state().versions.verify(version);
            let ours: Vec<Option<u64>> = ours.into_iter().map(Some).collect();
            match conn.recv(timeout).map_err(|e| format!("waiting for the end of the update: {e}"))? {
                // Nothing to compare with: the receiver's digests are recorded as pulled, and
                // the update is committed but not verified.
                Message::End { version: v, two_phase, .. } if v == version && !sender_digests => {
                    Ok(Outcome::Verified { digests: ours, compared: false, two_phase })
                }
                Message::End { version: v, digests, two_phase } if v == version => {
                    let mismatched = compare(plan, touched, &ours, &digests);
                    Ok(if mismatched.is_empty() {
                        Outcome::Verified { digests: ours, compared: true, two_phase }
                    } else {
                        Outcome::Mismatch(mismatched)
                    })
                }
                Message::Abort { reason } => Ok(Outcome::called_off(reason)),
                other => Err(format!("expected the end of version {version}, got {}", other.name())),
            }
        })()
        .unwrap_or_else(Outcome::Broken);
        drop(store);
        (outcome, report)
    }

    /// Two-phase: tells the sender every tensor verified and waits, up to the update timeout,
    /// for its decision. Without a commit the update fails (the bytes written are dirty).
    fn await_decision(&self, conn: &mut Conn, version: Version, verified: Outcome) -> Outcome {
        if let Err(e) = conn.send(&Message::Verified { version }) {
            return Outcome::Broken(format!("telling the sender version {version} verified: {e}"));
        }
        match conn.recv(self.shared.options.timeout) {
            Ok(Message::Commit { version: v }) if v == version => verified,
            Ok(Message::Abort { reason }) => Outcome::called_off(reason),
            Ok(other) => {
                Outcome::Broken(format!("expected the sender's decision on version {version}, got {}", other.name()))
            }
            Err(ProtocolError::Timeout(waited)) => {
                Outcome::Broken(format!("no commit of version {version} from the sender within {waited:.1?}"))
            }
            Err(e) => Outcome::Broken(format!("waiting for the sender's decision on version {version}: {e}")),
        }
    }

    /// Settles the version state after an update (commit, or fail marking what it touched
    /// dirty) and completes its report. Also says whether the connection is still in step
    /// (false after a broken transfer).
    fn settle(
        &self,
        plan: &Plan,
        version: Version,
        outcome: Outcome,
        touched: &[bool],
        mut report: UpdateReport,
        started: Instant,
    ) -> (UpdateReport, bool) {
        report.version = version;
        let mut state = self.state();
        let in_sync = !matches!(outcome, Outcome::Broken(_));
        let (outcome, reason) = match outcome {
            Outcome::Verified { digests, compared, .. } => {
                state.versions.commit(version).expect("this connection holds the update in flight");
                for (d, value) in digests.into_iter().enumerate() {
                    if value.is_some() {
                        state.digests[d] = value;
                    }
                }
                report.verified = compared;
                self.shared.committed.notify_all();
                (UpdateOutcome::Committed, None)
            }
            Outcome::Mismatch(names) => {
                let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
                report.mismatched = names;
                (UpdateOutcome::Failed, Some(format!("digest mismatch: {}", quoted.join(", "))))
            }
            Outcome::Aborted(reason) => (UpdateOutcome::Aborted, Some(reason)),
            Outcome::Broken(reason) => (UpdateOutcome::Failed, Some(reason)),
        };
        report.outcome = outcome;
        if let Some(reason) = reason {
            // Every tensor this update touched may now hold neither version's bytes.
            let dirty: Vec<String> = (0..touched.len())
                .filter(|&d| touched[d])
                .map(|d| {
                    state.digests[d] = None;
                    plan.destinations[d].name.clone()
                })
                .collect();
            state.versions.fail(version, reason.clone(), dirty).expect("this connection holds the update in flight");
            report.error = Some(reason);
        }
        report.committed = state.versions.committed();
        report.dirty = state.versions.dirty().iter().cloned().collect();
        report.seconds = started.elapsed().as_secs_f64();
        report.gbps = report.bytes as f64 / report.seconds.max(1e-9) / 1e9;
        report.receiver_peak_rss = peak_rss_bytes();
        (report, in_sync)
    }
}

/// How an update ended.
enum Outcome {
    /// Every written tensor matched the sender's digest (`compared`), or, with nothing to
    /// compare with, was recorded as written; the receiver's digest of each. `two_phase`: the
    /// sender decides whether it commits.
    Verified { digests: Vec<Option<u64>>, compared: bool, two_phase: bool },
    /// The transfer completed but these tensors' digests differ from the sender's.
    Mismatch(Vec<String>),
    /// The sender called the update off, in step with this side.
    Aborted(String),
    /// The transfer broke off (sender gone, stalled, or out of protocol).
    Broken(String),
}

impl Outcome {
    /// The sender's `Abort`, with its reason.
    fn called_off(reason: String) -> Outcome {
        Outcome::Aborted(format!("the sender called the update off: {reason}"))
    }
}

/// Where a host transport's buckets are written.
enum Sink<'a> {
    /// Tensors in host memory, digested piece by piece as they are written.
    Host { tensors: &'a mut dyn DestinationTensors, digests: Vec<ChunkDigests> },
    /// Tensors on a GPU, through device staging; digested there once all is written.
    Device(StagedUpdate<'a>),
}

impl Sink<'_> {
    fn write(
        &mut self,
        plan: &Plan,
        schedule: &Schedule,
        k: usize,
        arrived: Arrived<'_>,
        threads: usize,
    ) -> Result<(), String> {
        match (self, arrived) {
            (Sink::Host { tensors, digests }, Arrived::Host(payload)) => {
                unpack(plan, schedule, k, payload, &mut **tensors, digests, threads);
                Ok(())
            }
            (Sink::Host { .. }, Arrived::DeviceSlot(slot)) => {
                Err(format!("bucket {k} came in device slot {slot}, and this receiver's tensors are in host memory"))
            }
            (Sink::Device(update), Arrived::Host(payload)) => {
                update.bucket(k, payload).map_err(|e| format!("copying to the GPU: {e}"))
            }
            (Sink::Device(update), Arrived::DeviceSlot(slot)) => {
                update.bucket_in_slot(k, slot).map_err(|e| format!("writing from device slot {slot}: {e}"))
            }
        }
    }

    /// The receiver's digest of each written destination (None for the others).
    fn digests(&mut self, schedule: &Schedule) -> Result<Vec<Option<u64>>, String> {
        match self {
            Sink::Host { tensors, digests } => Ok(receiver_digests(schedule, &**tensors, digests)),
            Sink::Device(update) => {
                let all = update.digests().map_err(|e| format!("on the GPU: {e}"))?;
                Ok(all.into_iter().zip(&schedule.written).map(|(d, &w)| w.then_some(d)).collect())
            }
        }
    }
}

/// Names of written tensors whose digest differs from the sender's, that the sender sent no
/// digest for, or whose bytes did not all arrive.
fn compare(plan: &Plan, written: &[bool], ours: &[Option<u64>], theirs: &[(u32, u64)]) -> Vec<String> {
    let mut sent: Vec<Option<u64>> = vec![None; ours.len()];
    for &(d, value) in theirs {
        if let Some(slot) = sent.get_mut(d as usize) {
            *slot = Some(value);
        }
    }
    (0..ours.len())
        .filter(|&d| written[d] && (ours[d].is_none() || ours[d] != sent[d]))
        .map(|d| plan.destinations[d].name.clone())
        .collect()
}

fn log_report(report: &UpdateReport) {
    if report.is_committed() {
        tracing::info!(
            version = %report.version,
            bytes = report.bytes,
            seconds = report.seconds,
            gbps = report.gbps,
            "update committed"
        );
    } else {
        tracing::warn!(
            version = %report.version,
            committed = %report.committed,
            dirty = report.dirty.len(),
            "update failed: {}",
            report.error.as_deref().unwrap_or("")
        );
    }
}

/// splitmix64: a well-mixed 64-bit value from `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Pseudo-random bytes (a splitmix64 stream from `seed`): what a checker reset writes.
fn fill_random(bytes: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in bytes.chunks_mut(8) {
        state = state.wrapping_add(1);
        let word = mix(state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}
