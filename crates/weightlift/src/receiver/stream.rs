//! The streaming receiver: updates land in a ring of a few buffers, not in a copy of the model,
//! and each tensor is handed to the engine's own loader as soon as its bucket is in and
//! verified. The ring's layout is `weightlift_core::stream_layout`'s; this module adds the
//! hand-over between the connection writing buckets and the engine taking them
//! ([`Handoff`]), the tensors the transfers write (the ring seen as the stream's tensors:
//! [`RingTensors`]), and the steps every transfer takes per bucket ([`StreamSteps`]): wait
//! for the buffer, verify the bucket's tensors, hand them over.
//!
//! The engine takes buckets in order and gives each back by asking for the next; bucket `k`
//! is written only once the bucket that last used its buffer was given back, so nothing the
//! engine holds is ever overwritten. The update commits only after the engine has taken every
//! bucket; an engine that gives up (its loader raised) fails it, naming what it was handed.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use weightlift_core::{
    plan, whole_tensor_buckets, Bucket, Manifest, Module, Plan, Preset, PresetOptions, RuleSet, SourceSet,
    StreamBuffer, StreamLayout, TensorSpec, TpRank, Version,
};

use crate::cuda_ipc::DeviceTensors;
use crate::report::StreamTiming;
use crate::tensors::DestinationTensors;

/// How a streaming receiver holds an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// Buffers in the ring: the engine loads one bucket while the next lands in another.
    pub depth: u32,
    /// Bytes of a bucket (a tensor larger than this is assembled whole in one dedicated buffer).
    pub bucket_bytes: u64,
    /// The part of an update carrying a main model and its draft these tensors are (the main
    /// model, its MTP module, a separate draft): the sender's other tensors are ignored by name.
    pub module: Module,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions { depth: 2, bucket_bytes: 64 << 20, module: Module::Whole }
    }
}

/// Why a streaming receiver cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum StreamSetupError {
    #[error("cannot plan the streamed tensors: {0}")]
    Plan(#[from] weightlift_core::PlanError),
    #[error("the tensors' names as the trainer sends them: {0}")]
    Names(#[from] weightlift_core::ManifestError),
    #[error("cannot make the rules of the identity layout: {0}")]
    Rules(#[from] weightlift_core::RuleError),
    #[error("cannot cut the tensors into buckets: {0}")]
    Buckets(#[from] weightlift_core::BucketError),
    #[error("cannot lay the tensors out over the ring: {0}")]
    Layout(#[from] weightlift_core::StreamError),
    #[error("buffer {index} of the ring holds {actual} bytes, and the layout needs {expected}")]
    BufferSize { index: usize, expected: u64, actual: u64 },
    #[error("the ring takes {expected} buffers ({depth} of a bucket and one for tensors larger than a bucket), got {actual}")]
    BufferCount { expected: usize, depth: u32, actual: usize },
}

/// Why the engine's side of a streamed update stopped.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StreamFailure {
    /// The update failed (sender gone, a digest mismatch, the engine gave up); `handed` names
    /// the tensors the engine was handed before (they may hold either version).
    #[error("version {version} failed: {reason}")]
    Failed { version: Version, reason: String, handed: Vec<String> },
    #[error("no update is being streamed")]
    NoUpdate,
    #[error("no bucket of version {version} came within {seconds:.1} s")]
    Timeout { version: Version, seconds: f64 },
    #[error("version {version} was not committed or failed within {seconds:.1} s of its last bucket")]
    Undecided { version: Version, seconds: f64 },
}

/// What the identity layout of `specs` streams through: its plan, buckets and ring layout.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    pub plan: Plan,
    pub rules: RuleSet,
    pub buckets: Vec<Bucket>,
    pub layout: StreamLayout,
}

impl StreamPlan {
    /// Streams `specs` as the trainer names and shapes them (the identity preset, for
    /// `options.module`), in buckets of `options.bucket_bytes` over a ring of `options.depth`.
    pub fn new(specs: &Manifest, options: StreamOptions) -> Result<StreamPlan, StreamSetupError> {
        let rules = Preset::Identity.module_rules(options.module, PresetOptions::default(), None)?;
        let module = options.module;
        let named = specs.iter().map(|s| TensorSpec { name: module.trainer_name(&s.name), ..s.clone() }).collect();
        let source = Manifest::new(named)?;
        let plan = plan(&SourceSet::single(source), specs, &rules, TpRank::SINGLE)?;
        let buckets = whole_tensor_buckets(&plan, options.bucket_bytes)?;
        let layout = weightlift_core::stream_layout(&plan, &buckets, options.bucket_bytes, options.depth)?;
        Ok(StreamPlan { plan, rules, buckets, layout })
    }

    /// Bytes of each buffer the ring takes, in order: `depth` ring buffers, then the
    /// dedicated one if any tensor is larger than a bucket.
    pub fn buffer_sizes(&self) -> Vec<u64> {
        let layout = &self.layout;
        let mut sizes = vec![layout.buffer_bytes; layout.depth as usize];
        if layout.dedicated_bytes > 0 {
            sizes.push(layout.dedicated_bytes);
        }
        sizes
    }

    /// The buffer index and byte offset of each tensor (None for one of no bytes).
    pub fn places(&self) -> Vec<Option<(usize, u64)>> {
        let depth = self.layout.depth as usize;
        let index = |b: StreamBuffer| match b {
            StreamBuffer::Ring(r) => r as usize,
            StreamBuffer::Dedicated => depth,
        };
        self.layout.places.iter().map(|p| p.map(|p| (index(p.buffer), p.offset))).collect()
    }

    /// Whether a connection's `plan` streams through this layout: the same tensors, in the
    /// same buckets and places. Its sources may be more (a group's other modules, ignored
    /// here), named or cut otherwise; what lands in the ring must be what the engine was
    /// shown when the ring was made.
    pub fn streams(&self, plan: &Plan) -> bool {
        let layout = &self.layout;
        plan.destinations == self.plan.destinations
            && whole_tensor_buckets(plan, layout.bucket_bytes)
                .ok()
                .and_then(|buckets| {
                    weightlift_core::stream_layout(plan, &buckets, layout.bucket_bytes, layout.depth).ok()
                })
                .is_some_and(|ours| &ours == layout)
    }

    fn check_buffers(&self, actual: &[u64]) -> Result<(), StreamSetupError> {
        let expected = self.buffer_sizes();
        if actual.len() != expected.len() {
            let depth = self.layout.depth;
            return Err(StreamSetupError::BufferCount { expected: expected.len(), depth, actual: actual.len() });
        }
        match expected.iter().zip(actual).position(|(e, a)| a < e) {
            Some(index) => {
                Err(StreamSetupError::BufferSize { index, expected: expected[index], actual: actual[index] })
            }
            None => Ok(()),
        }
    }
}

/// The ring in host memory (`buffers`: one tensor per buffer, as [`StreamPlan::buffer_sizes`])
/// seen as the streamed tensors. Tensors of different buckets share bytes, so every tensor at
/// once ([`DestinationTensors::all_mut`]) gives only those of the bucket being written (which
/// the transfer sets, [`Stream::writing`]), the others empty.
pub struct RingTensors<B> {
    manifest: Manifest,
    buffers: B,
    places: Vec<Option<(usize, u64)>>,
    /// Per bucket, the tensors it writes.
    writes: Vec<Vec<u32>>,
    writing: Arc<AtomicUsize>,
}

impl<B> RingTensors<B> {
    fn new(stream: &StreamPlan, buffers: B, writing: Arc<AtomicUsize>) -> RingTensors<B> {
        let mut writes: Vec<Vec<u32>> = stream.buckets.iter().map(|_| Vec::new()).collect();
        for (k, bucket) in stream.buckets.iter().enumerate() {
            for entry in &bucket.entries {
                if !writes[k].contains(&entry.op.dst) {
                    writes[k].push(entry.op.dst);
                }
            }
        }
        let manifest = Manifest::new(stream.plan.destinations.clone()).expect("the plan's destinations are a manifest");
        RingTensors { manifest, buffers, places: stream.places(), writes, writing }
    }

    fn range(&self, index: usize) -> (usize, std::ops::Range<usize>) {
        let len = self.manifest.specs()[index].byte_len() as usize;
        match self.places[index] {
            Some((buffer, offset)) => (buffer, offset as usize..offset as usize + len),
            None => (0, 0..0),
        }
    }
}

impl<B: DestinationTensors> DestinationTensors for RingTensors<B> {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn bytes(&self, index: usize) -> &[u8] {
        let (buffer, range) = self.range(index);
        &self.buffers.bytes(buffer)[range]
    }

    fn bytes_mut(&mut self, index: usize) -> &mut [u8] {
        let (buffer, range) = self.range(index);
        &mut self.buffers.bytes_mut(buffer)[range]
    }

    fn all_mut(&mut self) -> Vec<&mut [u8]> {
        let mut wanted: Vec<(usize, std::ops::Range<usize>, usize)> = self
            .writes
            .get(self.writing.load(Ordering::Relaxed))
            .into_iter()
            .flatten()
            .map(|&d| {
                let (buffer, range) = self.range(d as usize);
                (buffer, range, d as usize)
            })
            .collect();
        wanted.sort_by_key(|(buffer, range, _)| (*buffer, range.start));
        let mut out: Vec<&mut [u8]> = (0..self.manifest.len()).map(|_| Default::default()).collect();
        let mut buffers: Vec<Option<&mut [u8]>> = self.buffers.all_mut().into_iter().map(Some).collect();
        // Within one bucket the tensors are disjoint: cut each buffer front to back.
        let mut rest: Option<(usize, usize, &mut [u8])> = None;
        for (buffer, range, d) in wanted {
            let (at, tail) = match rest.take() {
                Some((b, at, tail)) if b == buffer => (at, tail),
                _ => (0, buffers[buffer].take().expect("each buffer is cut once")),
            };
            let (_, tail) = tail.split_at_mut(range.start - at);
            let (mine, tail) = tail.split_at_mut(range.len());
            out[d] = mine;
            rest = Some((buffer, range.end, tail));
        }
        out
    }
}

/// The ring on a GPU seen as the streamed tensors: each tensor's address is its place in its
/// buffer.
pub struct DeviceRing<B> {
    manifest: Manifest,
    buffers: B,
    places: Vec<Option<(usize, u64)>>,
}

impl<B: DeviceTensors> DeviceTensors for DeviceRing<B> {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn device_ptrs(&self) -> Vec<u64> {
        let bases = self.buffers.device_ptrs();
        self.places.iter().map(|p| p.map_or(bases[0], |(buffer, offset)| bases[buffer] + offset)).collect()
    }
}

impl<B> DeviceRing<B> {
    fn new(stream: &StreamPlan, buffers: B) -> DeviceRing<B> {
        let manifest = Manifest::new(stream.plan.destinations.clone()).expect("the plan's destinations are a manifest");
        DeviceRing { manifest, buffers, places: stream.places() }
    }
}

/// Checks `buffers` against `stream`'s layout and wraps them as the streamed tensors.
pub(super) fn host_ring<B: DestinationTensors>(
    stream: &Stream,
    buffers: B,
) -> Result<RingTensors<B>, StreamSetupError> {
    let sizes: Vec<u64> = buffers.manifest().iter().map(|s| s.byte_len()).collect();
    stream.plan.check_buffers(&sizes)?;
    Ok(RingTensors::new(&stream.plan, buffers, stream.writing.clone()))
}

/// As [`host_ring`], for buffers on a GPU.
pub(super) fn device_ring<B: DeviceTensors>(
    stream: &StreamPlan,
    buffers: B,
) -> Result<DeviceRing<B>, StreamSetupError> {
    let sizes: Vec<u64> = buffers.manifest().iter().map(|s| s.byte_len()).collect();
    stream.check_buffers(&sizes)?;
    Ok(DeviceRing::new(stream, buffers))
}

/// How long a wait for the other side spins before it sleeps: a few buckets' time.
const SPIN: Duration = Duration::from_micros(200);

/// Why a streamed update failed, and the tensors handed to the engine before.
type Failure = (String, Vec<String>);

/// The update being streamed, as both sides see it.
#[derive(Debug, Default)]
struct HandoffState {
    /// The version in flight, from its first bucket's wait to its settling.
    version: Option<Version>,
    buckets: usize,
    /// Buckets `0..handed` are verified and the engine's to take.
    handed: usize,
    /// The bucket the engine holds (taken, not given back).
    taken: Option<usize>,
    /// Buckets `0..given_back` are given back: their buffers may be written again.
    given_back: usize,
    /// The engine gave up, with its reason.
    abandoned: Option<String>,
    /// How the last update settled: its version and, if it failed, why and what was handed.
    settled: Option<(Version, Option<Failure>)>,
    /// Tensors handed over in the update in flight.
    handed_names: Vec<String>,
    /// The engine's waits for the buckets of the update in flight.
    engine: EngineWaits,
}

/// How long the engine waited in [`Handoff::next_bucket`] for the buckets it took.
#[derive(Debug, Default, Clone, Copy)]
struct EngineWaits {
    taken: usize,
    total: Duration,
    first: Duration,
}

impl HandoffState {
    /// How `version` settled, once it has: committed, or failed with why and what was handed.
    fn outcome(&self, version: Version) -> Option<Result<(), StreamFailure>> {
        match &self.settled {
            Some((v, failure)) if *v == version => Some(match failure {
                None => Ok(()),
                Some((reason, handed)) => {
                    Err(StreamFailure::Failed { version, reason: reason.clone(), handed: handed.clone() })
                }
            }),
            _ => None,
        }
    }
}

/// Between the connection writing an update's buckets and the engine loading them.
pub struct Handoff {
    state: Mutex<HandoffState>,
    changed: Condvar,
    /// Bumped (under the lock) by every change, so a wait can spin on it before it sleeps.
    epoch: AtomicU64,
}

/// The receiver's wait for a buffer or for the engine ended without it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(super) enum WaitError {
    #[error("the engine stopped loading: {0}")]
    Abandoned(String),
    #[error("the engine did not take bucket {bucket} within {seconds:.1} s")]
    Stalled { bucket: usize, seconds: f64 },
}

impl Handoff {
    fn new() -> Handoff {
        Handoff { state: Mutex::new(HandoffState::default()), changed: Condvar::new(), epoch: AtomicU64::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, HandoffState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a change up to `deadline`; false once it passed. A bucket takes tens of
    /// microseconds to land or load, about what waking a sleeping thread takes: the wait spins
    /// for up to [`SPIN`] first, so a hand-over in steady state wakes nobody.
    fn wait<'a>(
        &'a self,
        state: MutexGuard<'a, HandoffState>,
        deadline: Instant,
    ) -> (MutexGuard<'a, HandoffState>, bool) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (state, false);
        }
        let seen = self.epoch.load(Ordering::Acquire);
        drop(state);
        let spin_until = Instant::now() + SPIN.min(left);
        while self.epoch.load(Ordering::Acquire) == seen && Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        let state = self.lock();
        // Changes bump the epoch under the lock: unchanged here, the next change notifies
        // after this thread waits.
        if self.epoch.load(Ordering::Acquire) != seen {
            return (state, true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (state, _) = self.changed.wait_timeout(state, left).unwrap_or_else(|e| e.into_inner());
        (state, true)
    }

    /// Tells the waiting side something changed (called with the lock held).
    fn notify(&self) {
        self.epoch.fetch_add(1, Ordering::Release);
        self.changed.notify_all();
    }

    /// The receiver starts streaming `version` in `buckets` buckets.
    pub(super) fn begin(&self, version: Version, buckets: usize) {
        let mut state = self.lock();
        *state = HandoffState { version: Some(version), buckets, settled: state.settled.take(), ..Default::default() };
        self.notify();
    }

    /// Waits until bucket `j` is given back (the engine asked for the bucket after it).
    pub(super) fn wait_given_back(&self, j: usize, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(reason) = &state.abandoned {
                return Err(WaitError::Abandoned(reason.clone()));
            }
            if state.given_back > j {
                return Ok(());
            }
            let (next, more) = self.wait(state, deadline);
            state = next;
            if !more {
                return Err(WaitError::Stalled { bucket: j, seconds: timeout.as_secs_f64() });
            }
        }
    }

    /// Whether bucket `j` was given back (its buffer may be written again).
    pub(super) fn is_given_back(&self, j: usize) -> bool {
        self.lock().given_back > j
    }

    /// Bucket `k` is verified: its tensors (`names`) are the engine's.
    pub(super) fn hand_over(&self, k: usize, names: impl IntoIterator<Item = String>) {
        let mut state = self.lock();
        state.handed = state.handed.max(k + 1);
        state.handed_names.extend(names);
        self.notify();
    }

    /// Waits until the engine has taken and given back every bucket.
    pub(super) fn wait_consumed(&self, timeout: Duration) -> Result<(), WaitError> {
        let last = self.lock().buckets.checked_sub(1);
        match last {
            Some(last) => self.wait_given_back(last, timeout),
            None => Ok(()),
        }
    }

    /// The engine's waits for the buckets of the update in flight so far.
    fn engine_waits(&self) -> EngineWaits {
        self.lock().engine
    }

    /// The tensors handed over in the update in flight.
    pub(super) fn handed_names(&self) -> Vec<String> {
        self.lock().handed_names.clone()
    }

    /// The update settled: committed (`failure` None) or failed with its reason; the engine's
    /// waits end.
    pub(super) fn settle(&self, version: Version, failure: Option<String>) {
        let mut state = self.lock();
        let handed = std::mem::take(&mut state.handed_names);
        if state.version == Some(version) {
            state.version = None;
        }
        state.settled = Some((version, failure.map(|reason| (reason, handed))));
        self.notify();
    }

    /// The engine: waits up to `timeout` for an update newer than `after` to stream (or to
    /// have settled); its version.
    pub fn next_update(&self, after: Version, timeout: Duration) -> Option<Version> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            let settled = state.settled.as_ref().map(|(v, _)| *v).filter(|&v| v > after);
            if let Some(v) = state.version.filter(|&v| v > after).or(settled) {
                return Some(v);
            }
            let (next, more) = self.wait(state, deadline);
            state = next;
            if !more {
                return None;
            }
        }
    }

    /// The engine: gives back the bucket it holds and waits for the next of `version`; None
    /// once every bucket was taken (then [`Handoff::settled`] says whether it committed).
    pub fn next_bucket(&self, version: Version, timeout: Duration) -> Result<Option<usize>, StreamFailure> {
        let called = Instant::now();
        let deadline = called + timeout;
        let mut state = self.lock();
        if state.version == Some(version) {
            if let Some(j) = state.taken.take() {
                state.given_back = state.given_back.max(j + 1);
                self.notify();
            }
        }
        loop {
            if let Some(settled) = state.outcome(version) {
                return settled.map(|()| None);
            }
            if state.version == Some(version) && state.handed > state.given_back {
                let k = state.given_back;
                state.taken = Some(k);
                let waited = called.elapsed();
                let engine = &mut state.engine;
                if engine.taken == 0 {
                    engine.first = waited;
                }
                engine.taken += 1;
                engine.total += waited;
                return Ok(Some(k));
            }
            if state.version == Some(version) && state.given_back >= state.buckets {
                return Ok(None);
            }
            let newer = |v: Option<Version>| v.is_some_and(|v| v > version);
            if newer(state.version) || newer(state.settled.as_ref().map(|(v, _)| *v)) {
                return Err(StreamFailure::NoUpdate);
            }
            let (next, more) = self.wait(state, deadline);
            state = next;
            if !more {
                return Err(StreamFailure::Timeout { version, seconds: timeout.as_secs_f64() });
            }
        }
    }

    /// The engine, after the last bucket: waits up to `timeout` for `version` to settle (a
    /// group's decision included); Ok once it committed.
    pub fn settled(&self, version: Version, timeout: Duration) -> Result<(), StreamFailure> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(settled) = state.outcome(version) {
                return settled;
            }
            if state.version != Some(version) {
                return Err(StreamFailure::NoUpdate);
            }
            let (next, more) = self.wait(state, deadline);
            state = next;
            if !more {
                return Err(StreamFailure::Undecided { version, seconds: timeout.as_secs_f64() });
            }
        }
    }

    /// The engine gives up on `version` (its loader raised): the update fails with `reason`.
    pub fn abandon(&self, version: Version, reason: String) {
        let mut state = self.lock();
        if state.version == Some(version) && state.abandoned.is_none() {
            state.abandoned = Some(reason);
            self.notify();
        }
    }
}

/// A streaming receiver's layout and hand-over.
pub(super) struct Stream {
    pub(super) plan: StreamPlan,
    pub(super) handoff: Arc<Handoff>,
    /// The bucket being written into host ring buffers (see [`RingTensors`]).
    writing: Arc<AtomicUsize>,
}

impl Stream {
    pub(super) fn new(plan: StreamPlan) -> Stream {
        Stream { plan, handoff: Arc::new(Handoff::new()), writing: Arc::new(AtomicUsize::new(0)) }
    }

    /// Bucket `k` is written next (into host buffers: their tensors are its).
    pub(super) fn writing(&self, k: usize) {
        self.writing.store(k, Ordering::Relaxed);
    }
}

/// Why a streamed update failed while its bytes kept coming (the connection stays in step).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum StepFailure {
    Wait(WaitError),
    /// These tensors' digests differ from the sender's (or it sent none).
    Mismatch(Vec<String>),
    Write(String),
}

/// What one transfer does per bucket of a streamed update: wait for the bucket's buffer,
/// and, once written, verify the tensors it completes and hand them over. After the first
/// failure the rest of the update is only drained (nothing more written or handed over), so
/// the connection stays in step and the update fails with the first reason.
pub(super) struct StreamSteps<'a> {
    stream: &'a Stream,
    timeout: Duration,
    pub(super) failed: Option<StepFailure>,
    /// Where the update's time went; the transfer adds the steps these methods do not take.
    pub(super) timing: StreamTiming,
    began: Instant,
}

impl<'a> StreamSteps<'a> {
    pub(super) fn begin(stream: &'a Stream, version: Version, timeout: Duration) -> StreamSteps<'a> {
        let began = Instant::now();
        stream.handoff.begin(version, stream.plan.buckets.len());
        StreamSteps { stream, timeout, failed: None, timing: StreamTiming::default(), began }
    }

    /// Before writing bucket `k`: waits until its buffer is free; false when the update
    /// already failed (drain the bucket, write nothing).
    pub(super) fn before(&mut self, k: usize) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if let Some(j) = self.stream.plan.layout.reuses.get(k).copied().flatten() {
            let t = Instant::now();
            let given_back = self.stream.handoff.wait_given_back(j, self.timeout);
            self.timing.buffer_wait_seconds += t.elapsed().as_secs_f64();
            if let Err(e) = given_back {
                self.failed = Some(StepFailure::Wait(e));
                return false;
            }
        }
        true
    }

    /// Whether bucket `k`'s buffer is free now (no wait): the bucket that last used it, if
    /// any, was given back.
    pub(super) fn ready(&mut self, k: usize) -> bool {
        match self.stream.plan.layout.reuses.get(k).copied().flatten() {
            Some(j) => {
                // Only the lock: counted with the waits, as what stands between buckets.
                let t = Instant::now();
                let given_back = self.stream.handoff.is_given_back(j);
                self.timing.buffer_wait_seconds += t.elapsed().as_secs_f64();
                given_back
            }
            None => true,
        }
    }

    /// The bucket that must be given back before bucket `k` is written, if any.
    pub(super) fn waits_for(&self, k: usize) -> Option<usize> {
        self.stream.plan.layout.reuses.get(k).copied().flatten()
    }

    /// The tensors bucket `k` completes (handed over once it is verified).
    pub(super) fn completes(&self, k: usize) -> &'a [u32] {
        &self.stream.plan.layout.complete_after[k]
    }

    /// After writing bucket `k`: compares the receiver's digests of the tensors it completes
    /// (`ours`, in [`StreamSteps::completes`] order) with the sender's (`theirs`, any order;
    /// None: nothing to compare with) and hands them over when they match.
    pub(super) fn after(&mut self, k: usize, ours: &[u64], theirs: Option<&[(u32, u64)]>) {
        let t = Instant::now();
        self.compare_and_hand_over(k, ours, theirs);
        self.timing.hand_over_seconds += t.elapsed().as_secs_f64();
    }

    fn compare_and_hand_over(&mut self, k: usize, ours: &[u64], theirs: Option<&[(u32, u64)]>) {
        let plan = &self.stream.plan.plan;
        let completes = self.completes(k);
        if let Some(theirs) = theirs {
            let mismatched: Vec<String> = completes
                .iter()
                .zip(ours)
                // Senders list digests by destination index: a search, not a scan per tensor
                // (a scan is quadratic in a MoE model's 18,867 tensors). A list out of order
                // can only fail the comparison, never pass a wrong digest.
                .filter(|(&d, &value)| {
                    theirs.binary_search_by_key(&d, |&(t, _)| t).map_or(true, |i| theirs[i].1 != value)
                })
                .map(|(&d, _)| plan.destinations[d as usize].name.clone())
                .collect();
            if !mismatched.is_empty() {
                self.failed = Some(StepFailure::Mismatch(mismatched));
                return;
            }
        }
        self.stream.handoff.hand_over(k, completes.iter().map(|&d| plan.destinations[d as usize].name.clone()));
        self.timing.buckets += 1;
    }

    /// Writing bucket `k` failed with `error`.
    pub(super) fn fail(&mut self, error: impl std::fmt::Display) {
        if self.failed.is_none() {
            self.failed = Some(StepFailure::Write(error.to_string()));
        }
    }

    /// After the last bucket: waits until the engine took every bucket. The failure, if any,
    /// as the update's outcome.
    pub(super) fn finish(&mut self) -> Option<super::settle::Outcome> {
        use super::settle::Outcome;
        if self.failed.is_none() {
            let t = Instant::now();
            let consumed = self.stream.handoff.wait_consumed(self.timeout);
            self.timing.last_given_back_seconds += t.elapsed().as_secs_f64();
            if let Err(e) = consumed {
                self.failed = Some(StepFailure::Wait(e));
            }
        }
        self.failed.take().map(|failure| match failure {
            StepFailure::Mismatch(names) => Outcome::Mismatch(names),
            StepFailure::Wait(e) => Outcome::Failed(e.to_string()),
            StepFailure::Write(e) => Outcome::Failed(e),
        })
    }

    /// Where the update's time went, the engine's waits included (complete once
    /// [`StreamSteps::finish`] saw every bucket given back).
    pub(super) fn into_timing(self) -> StreamTiming {
        let engine = self.stream.handoff.engine_waits();
        StreamTiming {
            seconds: self.began.elapsed().as_secs_f64(),
            engine_buckets: engine.taken,
            engine_wait_seconds: engine.total.as_secs_f64(),
            engine_first_wait_seconds: engine.first.as_secs_f64(),
            ..self.timing
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensors::HostTensors;
    use weightlift_core::{DType, TensorSpec};

    fn manifest(sizes: &[u64]) -> Manifest {
        Manifest::new(
            sizes.iter().enumerate().map(|(i, &n)| TensorSpec::new(format!("t{i}"), DType::U8, vec![n])).collect(),
        )
        .unwrap()
    }

    fn buffers(stream: &StreamPlan) -> HostTensors {
        let sizes = stream.buffer_sizes();
        let specs =
            sizes.iter().enumerate().map(|(i, &n)| TensorSpec::new(format!("b{i}"), DType::U8, vec![n])).collect();
        HostTensors::new(Manifest::new(specs).unwrap(), sizes.iter().map(|&n| vec![0; n as usize]).collect()).unwrap()
    }

    #[test]
    fn the_ring_gives_each_bucket_its_tensors_disjoint_and_where_the_layout_says() {
        let specs = manifest(&[100, 300, 50, 700, 20, 90]);
        let stream =
            StreamPlan::new(&specs, StreamOptions { depth: 2, bucket_bytes: 400, ..StreamOptions::default() }).unwrap();
        let stream = Stream::new(stream);
        let mut ring = host_ring(&stream, buffers(&stream.plan)).unwrap();
        let stream = &stream.plan;
        for k in 0..stream.buckets.len() {
            ring.writing.store(k, Ordering::Relaxed);
            let value = k as u8 + 1;
            for bytes in ring.all_mut() {
                bytes.fill(value);
            }
            for &d in &ring.writes[k].clone() {
                assert!(ring.bytes(d as usize).iter().all(|&b| b == value), "t{d} of bucket {k}");
                assert_eq!(ring.bytes(d as usize).len() as u64, specs.specs()[d as usize].byte_len());
            }
        }
        // t3 (700 bytes) is larger than a bucket: alone, in the dedicated buffer.
        assert_eq!(stream.places()[3], Some((2, 0)));
        assert_eq!(stream.buffer_sizes().len(), 3);
    }

    #[test]
    fn buffers_of_the_wrong_size_or_count_are_named() {
        let specs = manifest(&[100, 300]);
        let stream = Stream::new(
            StreamPlan::new(&specs, StreamOptions { depth: 2, bucket_bytes: 400, ..StreamOptions::default() }).unwrap(),
        );
        let short = HostTensors::new(manifest(&[10, 10]), vec![vec![0; 10]; 2]).unwrap();
        let err = host_ring(&stream, short).err().unwrap();
        assert!(matches!(err, StreamSetupError::BufferSize { index: 0, .. }), "{err}");
        let one = HostTensors::new(manifest(&[400]), vec![vec![0; 400]]).unwrap();
        assert!(matches!(host_ring(&stream, one).err().unwrap(), StreamSetupError::BufferCount { expected: 2, .. }));
    }

    /// The engine takes buckets in order and gives each back by asking for the next; the
    /// receiver's wait for a buffer ends exactly when the bucket that used it is given back.
    #[test]
    fn buckets_are_taken_in_order_and_given_back_by_asking_for_the_next() {
        let handoff = Arc::new(Handoff::new());
        let v = Version(3);
        handoff.begin(v, 3);
        let short = Duration::from_millis(20);
        assert_eq!(handoff.wait_given_back(0, short), Err(WaitError::Stalled { bucket: 0, seconds: 0.02 }));
        handoff.hand_over(0, ["a".to_string()]);
        assert_eq!(handoff.next_bucket(v, short), Ok(Some(0)));
        // Held, not given back, until the engine asks again.
        assert!(handoff.wait_given_back(0, short).is_err());
        let engine = {
            let handoff = handoff.clone();
            std::thread::spawn(move || handoff.next_bucket(v, Duration::from_secs(5)))
        };
        // The engine waits for bucket 1; asking gave bucket 0 back.
        handoff.wait_given_back(0, Duration::from_secs(5)).unwrap();
        handoff.hand_over(1, ["b".to_string()]);
        assert_eq!(engine.join().unwrap(), Ok(Some(1)));
        handoff.hand_over(2, []);
        assert_eq!(handoff.next_bucket(v, short), Ok(Some(2)));
        let done = {
            let handoff = handoff.clone();
            std::thread::spawn(move || handoff.next_bucket(v, Duration::from_secs(5)))
        };
        handoff.wait_consumed(Duration::from_secs(5)).unwrap();
        // Every bucket taken: the iteration ends before the version settles (a group's
        // decision may still be out), and the engine waits for that apart.
        assert_eq!(done.join().unwrap(), Ok(None));
        assert_eq!(handoff.settled(v, short), Err(StreamFailure::Undecided { version: v, seconds: 0.02 }));
        handoff.settle(v, None);
        assert_eq!(handoff.settled(v, short), Ok(()));
        assert_eq!(handoff.settled(Version(2), short), Err(StreamFailure::NoUpdate));
        assert_eq!(handoff.next_update(Version(2), short), Some(v));
        assert_eq!(handoff.next_update(v, short), None);
    }

    #[test]
    fn an_engine_that_gives_up_fails_the_wait_and_hears_what_it_was_handed() {
        let handoff = Handoff::new();
        let v = Version(1);
        handoff.begin(v, 4);
        handoff.hand_over(0, ["x".to_string(), "y".to_string()]);
        assert_eq!(handoff.next_bucket(v, Duration::from_secs(1)), Ok(Some(0)));
        handoff.abandon(v, "load_weights raised KeyError".into());
        let err = handoff.wait_given_back(0, Duration::from_secs(1)).unwrap_err();
        assert_eq!(err, WaitError::Abandoned("load_weights raised KeyError".into()));
        handoff.settle(v, Some(err.to_string()));
        match handoff.next_bucket(v, Duration::from_secs(1)) {
            Err(StreamFailure::Failed { handed, reason, .. }) => {
                assert_eq!(handed, ["x", "y"]);
                assert!(reason.contains("KeyError"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
