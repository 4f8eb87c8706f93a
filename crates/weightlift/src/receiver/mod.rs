//! The engine side: holds the destination tensors, takes updates into them in place, verifies
//! every byte against the sender's digests, and commits versions.
//!
//! Any failure (a sender that dies or stalls, a corrupted bucket, a digest mismatch, a bad
//! message) leaves the receiver on its last committed version, marked dirty with the tensors
//! the failed update touched, and ready for the next attempt.

mod checker;
mod connection;
mod group;
mod handshake;
mod nccl;
mod settle;
mod stream;
mod transfer;

pub use stream::{DeviceRing, Handoff, RingTensors, StreamFailure, StreamOptions, StreamPlan, StreamSetupError};

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weightlift_core::{digest, Manifest, TpRank, Version, VersionError, VersionState};

use std::os::unix::net::UnixStream;

use weightlift_core::{plan, Plan, PlanError, RuleSet, SourceSet};

use crate::cuda_ipc::DeviceTensors;
use crate::net::{Listener, Stream};
use crate::protocol::{Conn, ProtocolError, TransportKind};
use crate::report::UpdateReport;
use crate::sender::{SendError, Sender, SenderOptions, DEFAULT_HOST_BUCKET_BYTES};
use crate::session::{ConnectionLimit, Token};
use crate::tensors::{DestinationTensors, SourceTensors};
use crate::transport::LocalRing;
use crate::update::{default_threads, Schedule};
use weightlift_cuda::{CudaError, Gpu};

use connection::ConnectionError;
use settle::Outcome;

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
    /// Page-lock a local source's memory ([`Receiver::apply_local`] into a GPU) for its
    /// copies (on), or stage each bucket through two page-locked buffers of this receiver's
    /// on the packing threads, the next while this one is copied (off, the default). Locking
    /// pays once per mapping, which a checkpoint opened for one update pays every update, and
    /// costs more than staging does (bench/results/staged-h100-2026-12-07); the lock lasts the
    /// update only, so no registration outlives it to trip other copies.
    pub pin_local_sources: bool,
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
            pin_local_sources: false,
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
    /// The device slots and their writer of the last update applied from a local source
    /// into the GPU, kept for the next (see `transfer::LocalSlots`).
    local_slots: Mutex<Option<transfer::LocalSlots>>,
    /// For a streaming receiver: the ring's layout and the hand-over to the engine.
    stream: Option<stream::Stream>,
    /// The ranks of a sharded trainer connected so far.
    gathering: group::Gathering,
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

/// Why an update from a source in this process ([`Receiver::apply_local`]) was not started;
/// nothing was written and the version state is as it was.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("this receiver's layout follows {0}, and the update brings other rules")]
    Rules(String),
    #[error("cannot plan the source onto this receiver: {0}")]
    Plan(#[from] PlanError),
    #[error("cannot schedule the update: {0}")]
    Schedule(#[from] weightlift_core::BucketError),
    /// The write gate said no (the tensors' memory is released, say).
    #[error("version {version} refused: {reason}")]
    Refused { version: Version, reason: String },
    /// The version state refused it (another update in flight, or not newer).
    #[error("version refused: {0}")]
    Version(VersionError),
    #[error("the source's tensors are not the ones this receiver streams")]
    NotStreamed,
    #[error(transparent)]
    Quantized(#[from] CannotQuantize),
}

/// A plan into FP8 weights (quantized on the way) that this receiver cannot apply: only host
/// tensors written bucket by bucket from one sender quantize today; the GPU paths, the
/// streaming receiver and sharded trainers are refused, naming the weight, rather than write
/// bytes without their scales.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{weight}` is FP8 with its scales in `{scale}`, quantized on the way, and {why}")]
pub struct CannotQuantize {
    pub weight: String,
    pub scale: String,
    pub why: &'static str,
}

/// Where the receiver's tensors live.
enum Store {
    Host(Box<dyn DestinationTensors>),
    /// On a GPU: updates arrive over CUDA IPC.
    /// `tensors` is shared with the CUDA IPC transfer of each connection (see
    /// `transfer::IpcPull`); written only under this store's lock all the same.
    Device {
        gpu: Arc<Gpu>,
        tensors: Arc<dyn DeviceTensors>,
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

impl Receiver {
    /// A receiver holding `tensors` at `options.initial_version`.
    pub fn new(tensors: impl DestinationTensors + 'static, options: ReceiverOptions) -> Receiver {
        let manifest = tensors.manifest().clone();
        let digests = (0..manifest.len()).map(|i| Some(digest::digest(tensors.bytes(i)))).collect();
        Receiver::with_store(manifest, digests, Store::Host(Box::new(tensors)), options, None)
    }

    /// A receiver whose tensors live on `gpu` (written in place by updates over CUDA IPC).
    pub fn on_gpu(
        gpu: Arc<Gpu>,
        tensors: impl DeviceTensors + 'static,
        options: ReceiverOptions,
    ) -> Result<Receiver, CudaError> {
        let manifest = tensors.manifest().clone();
        let digests = tensors.digests(&gpu)?.into_iter().map(Some).collect();
        let store = Store::Device { gpu, tensors: Arc::new(tensors) };
        Ok(Receiver::with_store(manifest, digests, store, options, None))
    }

    /// A streaming receiver of the tensors `specs` (the trainer's names and layout), which
    /// lands each update in `buffers` in host memory (sized as [`StreamPlan::buffer_sizes`]
    /// says) and hands each tensor to the engine once verified (see [`Receiver::handoff`]).
    pub fn streaming(
        specs: &Manifest,
        buffers: impl DestinationTensors + 'static,
        stream: StreamOptions,
        options: ReceiverOptions,
    ) -> Result<Receiver, StreamSetupError> {
        let stream = stream::Stream::new(StreamPlan::new(specs, stream)?);
        let ring = stream::host_ring(&stream, buffers)?;
        let options = Receiver::stream_options(&stream.plan, options);
        let digests = vec![None; specs.len()];
        let store = Store::Host(Box::new(ring));
        Ok(Receiver::with_store(specs.clone(), digests, store, options, Some(stream)))
    }

    /// As [`Receiver::streaming`], with `buffers` on `gpu`.
    pub fn streaming_on_gpu(
        gpu: Arc<Gpu>,
        specs: &Manifest,
        buffers: impl DeviceTensors + 'static,
        stream: StreamOptions,
        options: ReceiverOptions,
    ) -> Result<Receiver, StreamSetupError> {
        let plan = StreamPlan::new(specs, stream)?;
        let ring = stream::device_ring(&plan, buffers)?;
        let options = Receiver::stream_options(&plan, options);
        let digests = vec![None; specs.len()];
        let store = Store::Device { gpu, tensors: Arc::new(ring) };
        Ok(Receiver::with_store(specs.clone(), digests, store, options, Some(stream::Stream::new(plan))))
    }

    /// A streaming receiver takes the identity layout only, whole tensors, at TP 1.
    fn stream_options(plan: &StreamPlan, options: ReceiverOptions) -> ReceiverOptions {
        let layout = "the streaming receiver's identity layout (of its module)".to_string();
        let expected_rules = Some((layout, plan.rules.clone()));
        let max_bucket_bytes = options.max_bucket_bytes.max(plan.layout.bucket_bytes);
        ReceiverOptions { tp: TpRank::SINGLE, expected_rules, max_bucket_bytes, ..options }
    }

    /// The streaming receiver's layout (None for one that takes updates in place).
    pub fn stream_plan(&self) -> Option<&StreamPlan> {
        self.shared.stream.as_ref().map(|s| &s.plan)
    }

    /// The streaming receiver's hand-over: where its engine waits for each update and takes
    /// its buckets (None for one that takes updates in place).
    pub fn handoff(&self) -> Option<Arc<Handoff>> {
        self.shared.stream.as_ref().map(|s| s.handoff.clone())
    }

    fn with_store(
        manifest: Manifest,
        digests: Vec<Option<u64>>,
        store: Store,
        options: ReceiverOptions,
        stream: Option<stream::Stream>,
    ) -> Receiver {
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
                local_slots: Mutex::new(None),
                stream,
                gathering: group::Gathering::default(),
            }),
        }
    }

    /// The engine rank this receiver holds.
    pub fn tp(&self) -> TpRank {
        self.shared.options.tp
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
            return Sender::connect_stream(Stream::Unix(ours), "in-process".into(), source, rules, options, None, None);
        }
        // A streaming receiver's buckets are its own size.
        let options = match self.stream_plan() {
            Some(stream) => SenderOptions { bucket_bytes: stream.layout.bucket_bytes, ..options },
            None => options,
        };
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
        Sender::connect_stream(Stream::Unix(ours), "in-process".into(), source, rules, options, Some(ring), None)
    }

    /// Applies `source` (a checkpoint read in this process, say) as `version`, with no sender
    /// (into host tensors, or through device slots into GPU ones, see
    /// [`transfer::LocalPack`]): the same begin, verify against digests computed while
    /// packing, settle, report and observers as an update over a connection. An update that
    /// began and failed is in the report (failed, its tensors dirty); one refused before it
    /// began is an error and changes nothing.
    pub fn apply_local(
        &self,
        version: Version,
        source: &dyn SourceTensors,
        rules: &RuleSet,
    ) -> Result<UpdateReport, LocalError> {
        let options = &self.shared.options;
        if let Some((name, expected)) = &options.expected_rules {
            if !expected.same_layout(rules) {
                return Err(LocalError::Rules(name.clone()));
            }
        }
        let plan = plan(&SourceSet::single(source.manifest().clone()), &self.shared.manifest, rules, options.tp)?;
        self.quantizes(&plan)?;
        let (bucket_bytes, full) = match self.stream_plan() {
            Some(stream) if !stream.streams(&plan) => return Err(LocalError::NotStreamed),
            Some(stream) => (stream.layout.bucket_bytes, Schedule::whole(&plan, stream.layout.bucket_bytes)?),
            None => {
                // A sender's default bucket, within this receiver's bound on the memory an
                // update holds.
                let bucket_bytes = DEFAULT_HOST_BUCKET_BYTES.min(options.max_bucket_bytes);
                (bucket_bytes, Schedule::new(&plan, &[], bucket_bytes)?)
            }
        };
        self.gate().map_err(|reason| LocalError::Refused { version, reason })?;
        self.state().versions.begin(version).map_err(LocalError::Version)?;
        let started = Instant::now();
        let mut touched = vec![false; plan.destinations.len()];
        let mut local = transfer::LocalPack { source, full, bucket_bytes };
        // A source that breaks while it is read (a tensor of the wrong size, say) panics in
        // the packing: that fails this update, as a sender dying mid-update fails one,
        // instead of leaving it in flight for ever.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            local.run(self, &plan, version, &[], &mut touched)
        }));
        let (outcome, report) = ran.unwrap_or_else(|panic| {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            (Outcome::Broken(format!("reading the source: {why}")), UpdateReport::default())
        });
        let (report, _) = self.settle(&plan, version, outcome, &touched, report, started);
        self.record(&report);
        Ok(report)
    }

    /// Whether this receiver can apply `plan`'s quantized weights (it has none, or its
    /// tensors are in host memory, not streamed, and one sender sends every tensor whole).
    pub(crate) fn quantizes(&self, plan: &Plan) -> Result<(), CannotQuantize> {
        let Some(s) = plan.scaled.first() else { return Ok(()) };
        let why = if self.is_on_gpu() {
            "this receiver's tensors are on a GPU, whose update paths do not quantize yet"
        } else if self.shared.stream.is_some() {
            "a streaming receiver does not quantize yet"
        } else if plan.senders() > 1 {
            "a sharded trainer's ranks do not quantize their shares yet"
        } else {
            return Ok(());
        };
        let name = |d: u32| plan.destinations[d as usize].name.clone();
        Err(CannotQuantize { weight: name(s.weight), scale: name(s.scale), why })
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

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> MutexGuard<'_, Store> {
        self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner())
    }
}
