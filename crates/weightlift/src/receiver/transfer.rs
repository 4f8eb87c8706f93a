//! One way bytes move per connection, behind one trait, so the receiver's loop (begin ->
//! transfer -> settle, in `connection.rs`) is written once for every path. Each
//! [`Transfer`] is built at hello with what its path needs and owns it for the connection:
//! [`HostBuckets`] takes buckets from a host transport (ring or socket) into host memory or
//! through device staging into a GPU (the [`Sink`]); [`IpcPull`] pulls straight from the
//! sender's GPU memory over CUDA IPC, and can only be built for tensors on a GPU. Either way
//! the receiver digests what it wrote and compares with the sender's digests, which gives
//! the update's [`Outcome`].

use std::sync::Arc;
use std::time::Instant;

use weightlift_core::digest::{self, ChunkDigests};
use weightlift_core::{Manifest, Plan, Version};
use weightlift_cuda::{CudaError, Gpu, LaunchedUpdate};

use crate::cuda_ipc::{DeviceTensors, Importer};
use crate::device_writes::{BucketWrite, SlotWriter};
use crate::protocol::{Conn, Message};
use crate::report::UpdateReport;
use crate::staged::{Buffers, StagedUpdate, Staging};
use crate::tensors::{DestinationTensors, SourceTensors};
use crate::transport::{Arrived, RecvBucketsError, RecvPath, TransferError};
use crate::update::{completed_digests, pack, receiver_digests, sender_digests, unpack, Schedule};

use super::settle::Outcome;
use super::stream::StreamSteps;
use super::{Receiver, Store};

/// How one update's bytes reach the destination tensors on one connection.
pub(super) trait Transfer {
    /// Takes update `version` (skipping the destinations in `skip`, where the path can) into
    /// the tensors, digests what it wrote and compares with the sender's digests. Marks in
    /// `touched` each tensor written, for settling a failure.
    fn run(
        &mut self,
        receiver: &Receiver,
        conn: &mut Conn,
        plan: &Plan,
        version: Version,
        skip: &[u32],
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport);
}

/// Buckets over a host transport (ring or socket), written into host tensors, or into a GPU's
/// through `staging`.
pub(super) struct HostBuckets {
    // Declared first, so dropped first: the staging before the receive path whose memory it
    // pinned.
    pub(super) staging: Option<Staging>,
    pub(super) path: RecvPath,
    /// The schedule of an update that skips nothing.
    pub(super) full: Schedule,
    pub(super) bucket_bytes: u64,
}

/// CUDA IPC: the receiver pulls from the sender's GPU memory into its own device tensors.
pub(super) struct IpcPull {
    /// The sender's allocations mapped so far on this connection (kept across updates).
    importer: Importer,
    gpu: Arc<Gpu>,
    tensors: Arc<dyn DeviceTensors>,
    /// The sender's manifest, from its hello.
    source: Manifest,
}

/// CUDA IPC was asked of a receiver whose tensors are in host memory.
#[derive(Debug, thiserror::Error)]
#[error("this receiver's tensors are in host memory: cuda-ipc needs them on a GPU")]
pub(super) struct TensorsInHostMemory;

impl IpcPull {
    /// The IPC path into `receiver`'s device tensors, for a sender with `source`; refused for
    /// tensors in host memory.
    pub(super) fn new(receiver: &Receiver, source: Manifest) -> Result<IpcPull, TensorsInHostMemory> {
        match &*receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
            Store::Device { gpu, tensors } => {
                Ok(IpcPull { importer: Importer::default(), gpu: gpu.clone(), tensors: tensors.clone(), source })
            }
            Store::Host(_) => Err(TensorsInHostMemory),
        }
    }
}

impl Transfer for HostBuckets {
    /// Takes one update's buckets from a host transport into the tensors (in host memory, or
    /// on a GPU through the staging), digesting them, and compares with the sender's digests.
    /// Marks in `touched` each tensor written.
    fn run(
        &mut self,
        receiver: &Receiver,
        conn: &mut Conn,
        plan: &Plan,
        version: Version,
        skip: &[u32],
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport) {
        let HostBuckets { staging, path, full, bucket_bytes } = self;
        let (staging, bucket_bytes) = (staging.as_ref(), *bucket_bytes);
        let timeout = receiver.shared.options.timeout;
        let schedule = full.for_skip(plan, skip, bucket_bytes).expect("bucket size was validated at hello");
        let threads = receiver.shared.options.threads;
        let mut store = receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
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
                staging.update(plan, &schedule, !skip.is_empty()).map(Sink::Device).map_err(WriteError::Stage)
            }
            (Store::Device { .. }, None) => Err(WriteError::NoStaging),
        };
        let mut sink = match sink {
            Ok(sink) => sink,
            Err(e) => return (Outcome::Broken(format!("preparing the update: {e}")), report),
        };
        let mut unpack_seconds = 0.0;
        let stream = receiver.shared.stream.as_ref();
        let mut steps = stream.map(|s| StreamSteps::begin(s, version, timeout));
        // Over a socket, bucket k+1 is read (on a thread of the path's) while bucket k is
        // written here; a tensor is touched once a bucket of it is consumed, not read.
        let sizes: Vec<u64> = schedule.buckets.iter().map(|b| b.bytes).collect();
        let received = path.recv_buckets(conn, &sizes, timeout, |k, arrived, theirs| {
            let k = k as usize;
            if let (Some(steps), Some(stream)) = (&mut steps, stream) {
                // Once the stream failed, the rest is drained, not written.
                if !steps.before(k) {
                    return Ok(());
                }
                stream.writing(k);
            }
            for entry in &schedule.buckets[k].entries {
                touched[entry.op.dst as usize] = true;
            }
            let t = Instant::now();
            let written = sink.write(plan, &schedule, k, arrived, threads);
            if let (Some(steps), Ok(())) = (&mut steps, &written) {
                let ours = sink.bucket_digests(k, steps.completes(k));
                steps.timing.write_seconds += t.elapsed().as_secs_f64();
                match ours {
                    Ok(ours) => steps.after(k, &ours, Some(theirs)),
                    Err(e) => steps.fail(e),
                }
            }
            unpack_seconds += t.elapsed().as_secs_f64();
            written
        });
        let outcome = match received {
            Ok(()) => None,
            // The error names its bucket.
            Err(RecvBucketsError::Consume { error, .. }) => Some(Outcome::Broken(error.to_string())),
            Err(RecvBucketsError::Transfer { error: TransferError::SenderAborted(reason), .. }) => {
                Some(Outcome::called_off(reason))
            }
            Err(RecvBucketsError::Transfer { index: k, error: e }) => {
                Some(Outcome::Broken(format!("bucket {k} of {}: {e}", schedule.buckets.len())))
            }
        };
        let outcome = outcome.unwrap_or_else(|| {
            let _ = receiver.state().versions.verify(version);
            if let Some(steps) = &mut steps {
                // Every bucket was compared as it landed; the end only closes the update.
                let failed = steps.finish();
                let t = Instant::now();
                let end = conn.recv(timeout);
                steps.timing.end_wait_seconds += t.elapsed().as_secs_f64();
                return match end {
                    Ok(Message::End { version: v, two_phase, .. }) if v == version => {
                        failed.unwrap_or(Outcome::Verified {
                            digests: vec![None; plan.destinations.len()],
                            compared: true,
                            two_phase,
                        })
                    }
                    Ok(Message::Abort { reason }) => Outcome::called_off(reason),
                    Ok(other) => {
                        Outcome::Broken(format!("expected the end of version {version}, got {}", other.name()))
                    }
                    Err(e) => Outcome::Broken(format!("waiting for the end of the update: {e}")),
                };
            }
            let t = Instant::now();
            let ours = match sink.digests(plan, &schedule) {
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
        report.stream_timing = steps.map(|steps| Box::new(steps.into_timing()));
        (outcome, report)
    }
}

impl Transfer for IpcPull {
    /// Takes one update over CUDA IPC: maps the sender's memory (what is not mapped yet), pulls
    /// every destination in one pass with its digests, and compares with the sender's.
    fn run(
        &mut self,
        receiver: &Receiver,
        conn: &mut Conn,
        plan: &Plan,
        version: Version,
        _skip: &[u32],
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport) {
        let timeout = receiver.shared.options.timeout;
        // Held for the whole pull, as over the host path: checkers wait while an update writes.
        let store = receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let IpcPull { importer, gpu, tensors, source } = self;
        let (gpu, source) = (&*gpu, &*source);
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
            if let Some(stream) = receiver.shared.stream.as_ref() {
                let completes = &stream.plan.layout.complete_after;
                let parts = importer
                    .plan_parts(gpu, plan, &resolved, &tensors.device_ptrs(), completes)
                    .map_err(|e| format!("binding the update to the sender's memory: {e}"))?;
                report.device_extra_bytes = parts.iter().flatten().map(|p| p.device_bytes()).sum();
                report.launches = parts.iter().flatten().map(|p| p.launches()).sum();
                return Ok(pull_streamed(
                    receiver,
                    conn,
                    plan,
                    version,
                    stream,
                    gpu,
                    parts,
                    sender_digests,
                    &mut report,
                ));
            }
            let bound = importer
                .plan(gpu, plan, &resolved, &tensors.device_ptrs())
                .map_err(|e| format!("binding the update to the sender's memory: {e}"))?;
            report.device_extra_bytes = bound.device_bytes();
            report.launches = bound.launches();
            touched.fill(true);
            let pulled = Instant::now();
            let ours = bound.update(gpu).map_err(|e| format!("pulling the update: {e}"))?;
            report.unpack_seconds = pulled.elapsed().as_secs_f64();
            let _ = receiver.state().versions.verify(version);
            end_of_update(conn, timeout, plan, version, touched, ours, sender_digests)
        })()
        .unwrap_or_else(Outcome::Broken);
        drop(store);
        (outcome, report)
    }
}

/// A streamed update over CUDA IPC: each bucket's tensors pulled into the ring once its buffer
/// is free, digested in the same pass, compared with the sender's digests (sent in parts as it
/// digests its memory, in hand-over order, each read when a hand-over needs it) and handed to
/// the engine. Only the hand-overs mark tensors touched (see `settle`).
#[allow(clippy::too_many_arguments)]
fn pull_streamed(
    receiver: &Receiver,
    conn: &mut Conn,
    plan: &Plan,
    version: Version,
    stream: &super::stream::Stream,
    gpu: &Gpu,
    parts: &[Option<crate::gpu::GpuPlan>],
    sender_digests: bool,
    report: &mut UpdateReport,
) -> Outcome {
    let timeout = receiver.shared.options.timeout;
    let mut steps = StreamSteps::begin(stream, version, timeout);
    let outcome = pull_buckets(receiver, conn, plan, version, &mut steps, gpu, parts, sender_digests, report);
    report.stream_timing = Some(Box::new(steps.into_timing()));
    outcome
}

/// [`pull_streamed`]'s buckets, each step timed in `steps.timing`.
#[allow(clippy::too_many_arguments)]
fn pull_buckets(
    receiver: &Receiver,
    conn: &mut Conn,
    plan: &Plan,
    version: Version,
    steps: &mut StreamSteps<'_>,
    gpu: &Gpu,
    parts: &[Option<crate::gpu::GpuPlan>],
    sender_digests: bool,
    report: &mut UpdateReport,
) -> Outcome {
    let timeout = receiver.shared.options.timeout;
    let mut theirs = SenderDigests::default();
    // Waits for bucket `j`'s pull, compares its digests and hands it over (only waits once the
    // update failed: the pull must end before its buffer can be written again).
    let mut finish = |steps: &mut StreamSteps<'_>, theirs: &mut SenderDigests, j: usize, launched| {
        let t = Instant::now();
        let ours = Option::map(launched, LaunchedUpdate::wait).transpose();
        steps.timing.gpu_wait_seconds += t.elapsed().as_secs_f64();
        if steps.failed.is_some() {
            return Ok(());
        }
        match ours {
            Ok(ours) => {
                let compared = match sender_digests {
                    true => {
                        let t = Instant::now();
                        let read = theirs.read(conn, version, timeout, |d| d.cover(steps.completes(j)));
                        steps.timing.end_wait_seconds += t.elapsed().as_secs_f64();
                        read?;
                        Some(theirs.digests.as_slice())
                    }
                    false => None,
                };
                steps.after(j, &ours.unwrap_or_default(), compared);
            }
            Err(e) => steps.fail(format!("pulling bucket {j}: {e}")),
        }
        Ok(())
    };
    let pulled = Instant::now();
    // One bucket ahead: bucket k is queued on the GPU before bucket k - 1's digests are read
    // and it is handed over, so the GPU copies k while this thread compares k - 1 and the
    // engine loads it.
    let mut pending: Option<(usize, Option<LaunchedUpdate<'_>>)> = None;
    for (k, part) in parts.iter().enumerate() {
        // Bucket k waits for a bucket the engine still holds. The engine gives each back as
        // it asks for the next, so a wait for one before the pending bucket needs nothing
        // more (k is queued beside the pending one, two buckets on the GPU at once); a wait
        // for the pending bucket itself, or a later one, must hand it over first.
        let hand_over_first =
            !steps.ready(k) && pending.as_ref().is_some_and(|&(j, _)| steps.waits_for(k).is_some_and(|w| w >= j));
        if hand_over_first {
            if let Some((j, launched)) = pending.take() {
                if let Err(outcome) = finish(steps, &mut theirs, j, launched) {
                    return outcome;
                }
            }
        }
        if !steps.before(k) {
            break;
        }
        let t = Instant::now();
        let launched = part.as_ref().map(|p| p.launch(gpu)).transpose();
        steps.timing.launch_seconds += t.elapsed().as_secs_f64();
        let launched = match launched {
            Ok(launched) => launched,
            Err(e) => {
                steps.fail(format!("pulling bucket {k}: {e}"));
                break;
            }
        };
        if let Some((j, previous)) = pending.replace((k, launched)) {
            if let Err(outcome) = finish(steps, &mut theirs, j, previous) {
                return outcome;
            }
        }
    }
    if let Some((j, launched)) = pending.take() {
        if let Err(outcome) = finish(steps, &mut theirs, j, launched) {
            return outcome;
        }
    }
    report.unpack_seconds = pulled.elapsed().as_secs_f64();
    let failed = steps.finish();
    let _ = receiver.state().versions.verify(version);
    let t = Instant::now();
    let ended = theirs.read(conn, version, timeout, |_| false);
    steps.timing.end_wait_seconds += t.elapsed().as_secs_f64();
    if let Err(outcome) = ended {
        return outcome;
    }
    let two_phase = theirs.two_phase == Some(true);
    failed.unwrap_or(Outcome::Verified {
        digests: vec![None; plan.destinations.len()],
        compared: sender_digests,
        two_phase,
    })
}

/// What a streaming receiver has of the sender's digests over CUDA IPC: the parts that came
/// (`Digests`), sorted by destination, and once `End` came, its two-phase flag.
#[derive(Default)]
struct SenderDigests {
    digests: Vec<(u32, u64)>,
    two_phase: Option<bool>,
}

impl SenderDigests {
    /// Whether every destination of `wanted` has the sender's digest, or none is to come.
    fn cover(&self, wanted: &[u32]) -> bool {
        self.two_phase.is_some() || wanted.iter().all(|d| self.digests.binary_search_by_key(d, |&(t, _)| t).is_ok())
    }

    /// Reads the sender's messages until `enough` says so or its `End` came.
    fn read(
        &mut self,
        conn: &mut Conn,
        version: Version,
        timeout: std::time::Duration,
        enough: impl Fn(&SenderDigests) -> bool,
    ) -> Result<(), Outcome> {
        while self.two_phase.is_none() && !enough(self) {
            let (digests, end) = match conn.recv(timeout) {
                Ok(Message::Digests { version: v, digests }) if v == version => (digests, None),
                Ok(Message::End { version: v, digests, two_phase }) if v == version => (digests, Some(two_phase)),
                Ok(Message::Abort { reason }) => return Err(Outcome::called_off(reason)),
                Ok(other) => {
                    let expected = format!("digests or the end of version {version}");
                    return Err(Outcome::Broken(format!("expected {expected}, got {}", other.name())));
                }
                Err(e) => return Err(Outcome::Broken(format!("waiting for the sender's digests: {e}"))),
            };
            // Parts come in hand-over order, not by destination: kept sorted for the search.
            let after_the_last = self.digests.last().zip(digests.first()).is_none_or(|(a, b)| a.0 < b.0);
            let in_order = after_the_last && digests.is_sorted_by_key(|&(t, _)| t);
            self.digests.extend(digests);
            if !in_order {
                self.digests.sort_unstable_by_key(|&(t, _)| t);
            }
            self.two_phase = end;
        }
        Ok(())
    }
}

/// A source in this process (a checkpoint read from disk) into the tensors, so nothing plays
/// sender to itself over a socket. Into host memory, each bucket is packed from the source
/// into a buffer, as a sender would, and unpacked into the tensors; into a GPU, it is written
/// into one of two device slots with the copy engines, as a sender on this host writes them
/// ([`SlotWriter`]: straight from the source's memory, or from its files when mostly out of
/// the page cache, digested where it landed), then copied into the tensors there. Not a
/// [`Transfer`]: there is no connection; the version state, compare and settling are the same.
pub(super) struct LocalPack<'a> {
    pub(super) source: &'a dyn SourceTensors,
    /// The schedule of an update that skips nothing.
    pub(super) full: Schedule,
    pub(super) bucket_bytes: u64,
}

/// What a local update computed: the receiver's digests of what it wrote, the sender-side
/// digests gathered while packing, and the seconds spent writing the tensors.
type Written = (Vec<Option<u64>>, Vec<ChunkDigests>, f64);

impl LocalPack<'_> {
    /// Writes every bucket of update `version`, digesting both sides as a connection's path
    /// does, and compares them. Marks in `touched` each tensor written.
    pub(super) fn run(
        &mut self,
        receiver: &Receiver,
        plan: &Plan,
        version: Version,
        skip: &[u32],
        touched: &mut [bool],
    ) -> (Outcome, UpdateReport) {
        if let Some(stream) = receiver.shared.stream.as_ref() {
            return self.run_streamed(receiver, stream, plan, version);
        }
        let schedule = self.full.for_skip(plan, skip, self.bucket_bytes).expect("bucket size was validated");
        let mut store = receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = UpdateReport {
            bytes: schedule.bytes,
            tensors: schedule.written.iter().filter(|&&w| w).count(),
            buckets: schedule.buckets.len(),
            skipped_tensors: skip.len(),
            bytes_saved: skip.iter().map(|&d| plan.destinations[d as usize].byte_len()).sum(),
            sender_digests: true,
            ..UpdateReport::default()
        };
        let written = match &mut *store {
            Store::Host(tensors) => Ok(self.write_host(receiver, plan, &schedule, tensors.as_mut(), touched)),
            Store::Device { gpu, tensors } => {
                let skips = !skip.is_empty();
                self.write_device(receiver, plan, version, &schedule, skips, gpu, &**tensors, touched, &mut report)
            }
        };
        let (ours, sent, seconds) = match written {
            Ok(written) => written,
            Err(e) => return (Outcome::Broken(e.to_string()), report),
        };
        report.unpack_seconds = seconds;
        let _ = receiver.state().versions.verify(version);
        let theirs = sender_digests(plan, &schedule, self.source, &sent);
        let mismatched = compare(plan, &schedule.written, &ours, &theirs);
        let outcome = if mismatched.is_empty() {
            Outcome::Verified { digests: ours, compared: true, two_phase: false }
        } else {
            Outcome::Mismatch(mismatched)
        };
        drop(store);
        (outcome, report)
    }

    /// Into a streaming receiver: each bucket packed from the source (digested as packed),
    /// written into the ring (host memory, or through a staging buffer on the GPU), digested
    /// there, compared and handed over, as a connection's buckets are.
    fn run_streamed(
        &self,
        receiver: &Receiver,
        stream: &super::stream::Stream,
        plan: &Plan,
        version: Version,
    ) -> (Outcome, UpdateReport) {
        let options = &receiver.shared.options;
        let schedule = &self.full;
        let mut report = UpdateReport {
            bytes: schedule.bytes,
            tensors: plan.destinations.len(),
            buckets: schedule.buckets.len(),
            sender_digests: true,
            ..UpdateReport::default()
        };
        let mut store = receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let mut payload = vec![0u8; self.bucket_bytes as usize];
        let staging = match &*store {
            Store::Device { gpu, tensors } => {
                let staged =
                    Staging::new(gpu.clone(), plan, schedule, tensors.device_ptrs(), self.bucket_bytes, Buffers::One)
                        .and_then(|mut staging| {
                            staging.digest_per_bucket(plan, &stream.plan.layout.complete_after)?;
                            staging.pin(&payload);
                            Ok(staging)
                        });
                match staged {
                    Ok(staging) => Some(staging),
                    Err(e) => return (Outcome::Broken(WriteError::Stage(e).to_string()), report),
                }
            }
            Store::Host(_) => None,
        };
        report.device_extra_bytes = staging.as_ref().map_or(0, Staging::device_bytes);
        let sink = match (&mut *store, &staging) {
            (Store::Host(tensors), _) => Ok(Sink::Host { tensors: tensors.as_mut(), digests: schedule.digests(plan) }),
            (Store::Device { .. }, Some(staging)) => {
                staging.update(plan, schedule, false).map(Sink::Device).map_err(WriteError::Stage)
            }
            (Store::Device { .. }, None) => Err(WriteError::NoStaging),
        };
        let mut sink = match sink {
            Ok(sink) => sink,
            Err(e) => return (Outcome::Broken(e.to_string()), report),
        };
        let mut steps = StreamSteps::begin(stream, version, options.timeout);
        let mut sent = schedule.digests(plan);
        let written = Instant::now();
        for (k, bucket) in schedule.buckets.iter().enumerate() {
            if !steps.before(k) {
                break;
            }
            let payload = &mut payload[..bucket.bytes as usize];
            pack(plan, schedule, k, self.source, payload, &mut sent, options.threads);
            let theirs = completed_digests(plan, schedule, k, self.source, &sent);
            stream.writing(k);
            let t = Instant::now();
            let ours = sink
                .write(plan, schedule, k, Arrived::Host(payload), options.threads)
                .and_then(|()| sink.bucket_digests(k, steps.completes(k)));
            steps.timing.write_seconds += t.elapsed().as_secs_f64();
            match ours {
                Ok(ours) => steps.after(k, &ours, Some(&theirs)),
                Err(e) => steps.fail(e),
            }
        }
        report.unpack_seconds = written.elapsed().as_secs_f64();
        let failed = steps.finish();
        report.stream_timing = Some(Box::new(steps.into_timing()));
        let _ = receiver.state().versions.verify(version);
        drop(sink);
        drop(store);
        let outcome = failed.unwrap_or(Outcome::Verified {
            digests: vec![None; plan.destinations.len()],
            compared: true,
            two_phase: false,
        });
        (outcome, report)
    }

    fn write_host(
        &self,
        receiver: &Receiver,
        plan: &Plan,
        schedule: &Schedule,
        tensors: &mut dyn DestinationTensors,
        touched: &mut [bool],
    ) -> Written {
        let threads = receiver.shared.options.threads;
        let mut sent = schedule.digests(plan);
        let mut ours = schedule.digests(plan);
        let mut payload = vec![0u8; schedule.buckets.iter().map(|b| b.bytes).max().unwrap_or(0) as usize];
        let mut seconds = 0.0;
        for (k, bucket) in schedule.buckets.iter().enumerate() {
            let payload = &mut payload[..bucket.bytes as usize];
            pack(plan, schedule, k, self.source, payload, &mut sent, threads);
            for entry in &bucket.entries {
                touched[entry.op.dst as usize] = true;
            }
            let t = Instant::now();
            unpack(plan, schedule, k, payload, tensors, &mut ours, threads);
            seconds += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let ours = receiver_digests(plan, schedule, tensors, &ours);
        (ours, sent, seconds + t.elapsed().as_secs_f64())
    }

    /// Through two device slots of this receiver's own, which its process maps a second time
    /// to write them as a sender on this host does: device memory, two buckets.
    #[allow(clippy::too_many_arguments)]
    fn write_device(
        &self,
        receiver: &Receiver,
        plan: &Plan,
        version: Version,
        schedule: &Schedule,
        skips: bool,
        gpu: &Arc<Gpu>,
        tensors: &dyn DeviceTensors,
        touched: &mut [bool],
        report: &mut UpdateReport,
    ) -> Result<Written, WriteError> {
        let options = &receiver.shared.options;
        let key = (plan.hash_hex(), self.bucket_bytes, tensors.device_ptrs());
        let mut kept = receiver.shared.local_slots.lock().unwrap_or_else(|e| e.into_inner());
        if kept.as_ref().is_none_or(|k| k.key != key) {
            // The old slots go first: the device memory of two buckets, not four.
            *kept = None;
            *kept = Some(LocalSlots::new(gpu, plan, &self.full, key, self.bucket_bytes)?);
        }
        let LocalSlots { staging, writer, count, .. } = kept.as_mut().expect("made just above");
        let (count, writer) = (*count, writer);
        let update = staging.update(plan, schedule, skips).map_err(WriteError::Stage)?;
        report.device_extra_bytes = staging.device_bytes() + writer.device_bytes();
        let mut sent = schedule.digests(plan);
        let mut seconds = 0.0;
        let mut write_all = || -> Result<(), WriteError> {
            for (k, bucket) in schedule.buckets.iter().enumerate() {
                let slot = k as u32 % count;
                for entry in &bucket.entries {
                    touched[entry.op.dst as usize] = true;
                }
                let write = BucketWrite {
                    plan,
                    schedule,
                    k,
                    sources: self.source,
                    threads: options.threads,
                    flip: false,
                    pin: options.pin_local_sources,
                    landed: true,
                };
                writer.write_bucket(slot, &write, &mut sent).map_err(|source| WriteError::Slot { k, source })?;
                let t = Instant::now();
                update.bucket_in_slot(k, slot).map_err(|source| WriteError::FromSlot { k, slot, source })?;
                seconds += t.elapsed().as_secs_f64();
            }
            writer.finish_digests(&mut sent).map_err(WriteError::Landed)
        };
        let written = write_all();
        writer.log_phases(version, "local update written through device slots");
        // The source is unmapped after this update, and its pages must not stay locked with it
        // (a later map at the same addresses would pass for the same memory): the lock, if
        // any, lasts this update only, failed or not.
        writer.release_sources();
        written?;
        let t = Instant::now();
        let ours = update.digests().map_err(WriteError::Digest)?;
        let ours = ours.into_iter().zip(&schedule.written).map(|(d, &w)| w.then_some(d)).collect();
        report.read_from_disk = writer.read_from_disk();
        Ok((ours, sent, seconds + t.elapsed().as_secs_f64()))
    }
}

/// Two device slots of a receiver's own and this process's mapping of them, for updates it
/// applies from local sources: made for one plan, bucket size and set of tensor addresses, and
/// kept while those stay (a checkpoint applied every step pays for them once, not per update:
/// device memory of two buckets and page-locked host memory of two more, held between updates
/// as a connection's staging is while it lasts).
pub(super) struct LocalSlots {
    key: (String, u64, Vec<u64>),
    staging: Staging,
    writer: SlotWriter,
    count: u32,
}

impl LocalSlots {
    fn new(
        gpu: &Arc<Gpu>,
        plan: &Plan,
        full: &Schedule,
        key: (String, u64, Vec<u64>),
        bucket_bytes: u64,
    ) -> Result<LocalSlots, WriteError> {
        let staging = Staging::new(gpu.clone(), plan, full, key.2.clone(), bucket_bytes, Buffers::Slots)
            .map_err(WriteError::Stage)?;
        let (info, fds) = staging.offer(bucket_bytes).map_err(WriteError::Share)?.ok_or(WriteError::NoSlots)?;
        let writer = SlotWriter::map_on(gpu.clone(), &info, &fds).map_err(WriteError::Map)?;
        Ok(LocalSlots { key, staging, writer, count: info.count })
    }
}

/// Why the bytes of an update could not be written into this receiver's tensors (or
/// digested there); its message becomes the failed update's reason.
#[derive(Debug, thiserror::Error)]
pub(super) enum WriteError {
    #[error("cannot stage the update on the GPU: {0}")]
    Stage(CudaError),
    #[error("no staging for a GPU receiver")]
    NoStaging,
    #[error("cannot share the device slots: {0}")]
    Share(CudaError),
    #[error("the staging has no device slots")]
    NoSlots,
    #[error("cannot map the device slots: {0}")]
    Map(CudaError),
    #[error("writing bucket {k} into its device slot: {source}")]
    Slot { k: usize, source: TransferError },
    #[error("writing bucket {k} from device slot {slot}: {source}")]
    FromSlot { k: usize, slot: u32, source: CudaError },
    #[error("bucket {k} came in device slot {slot}, and this receiver's tensors are in host memory")]
    SlotIntoHost { k: usize, slot: u32 },
    #[error("copying bucket {k} to the GPU: {source}")]
    ToGpu { k: usize, source: CudaError },
    #[error("digesting what landed: {0}")]
    Landed(TransferError),
    #[error("on the GPU: {0}")]
    Digest(CudaError),
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
    ) -> Result<(), WriteError> {
        match (self, arrived) {
            (Sink::Host { tensors, digests }, Arrived::Host(payload)) => {
                unpack(plan, schedule, k, payload, &mut **tensors, digests, threads);
                Ok(())
            }
            (Sink::Host { .. }, Arrived::DeviceSlot(slot)) => Err(WriteError::SlotIntoHost { k, slot }),
            (Sink::Device(update), Arrived::Host(payload)) => {
                update.bucket(k, payload).map_err(|source| WriteError::ToGpu { k, source })
            }
            (Sink::Device(update), Arrived::DeviceSlot(slot)) => {
                update.bucket_in_slot(k, slot).map_err(|source| WriteError::FromSlot { k, slot, source })
            }
        }
    }

    /// The receiver's digest of each destination of `completes` (bucket `k` completed them).
    fn bucket_digests(&mut self, k: usize, completes: &[u32]) -> Result<Vec<u64>, WriteError> {
        match self {
            Sink::Host { tensors, digests } => Ok(completes
                .iter()
                .map(|&d| digests[d as usize].finish().unwrap_or_else(|| digest::digest(tensors.bytes(d as usize))))
                .collect()),
            Sink::Device(update) => update.bucket_digests(k).map_err(WriteError::Digest),
        }
    }

    /// The receiver's digest of each written destination (None for the others).
    fn digests(&mut self, plan: &Plan, schedule: &Schedule) -> Result<Vec<Option<u64>>, WriteError> {
        match self {
            Sink::Host { tensors, digests } => Ok(receiver_digests(plan, schedule, &**tensors, digests)),
            Sink::Device(update) => {
                let all = update.digests().map_err(WriteError::Digest)?;
                Ok(all.into_iter().zip(&schedule.written).map(|(d, &w)| w.then_some(d)).collect())
            }
        }
    }
}

/// Reads the sender's `End` of `version` after every byte landed and the receiver digested
/// it (`ours`, per destination), and compares. Without `sender_digests` there is nothing to
/// compare with: the receiver's digests are recorded as written, and the update is committed
/// but not verified.
pub(super) fn end_of_update(
    conn: &mut Conn,
    timeout: std::time::Duration,
    plan: &Plan,
    version: Version,
    written: &[bool],
    ours: Vec<u64>,
    sender_digests: bool,
) -> Result<Outcome, String> {
    let ours: Vec<Option<u64>> = ours.into_iter().map(Some).collect();
    match conn.recv(timeout).map_err(|e| format!("waiting for the end of the update: {e}"))? {
        Message::End { version: v, two_phase, .. } if v == version && !sender_digests => {
            Ok(Outcome::Verified { digests: ours, compared: false, two_phase })
        }
        Message::End { version: v, digests, two_phase } if v == version => {
            let mismatched = compare(plan, written, &ours, &digests);
            Ok(match mismatched.is_empty() {
                true => Outcome::Verified { digests: ours, compared: true, two_phase },
                false => Outcome::Mismatch(mismatched),
            })
        }
        Message::Abort { reason } => Ok(Outcome::called_off(reason)),
        other => Err(format!("expected the end of version {version}, got {}", other.name())),
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

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::net::Stream;

    const T: Duration = Duration::from_secs(5);

    /// A connection whose far end (a sender) writes `messages`, then stays open.
    fn sender_saying(messages: Vec<Message>) -> (Conn, std::thread::JoinHandle<Conn>) {
        let (a, b) = UnixStream::pair().unwrap();
        let sender = std::thread::spawn(move || {
            let mut conn = Conn::client(Stream::Unix(a)).unwrap();
            messages.iter().for_each(|m| conn.send(m).unwrap());
            conn
        });
        (Conn::server(Stream::Unix(b), Instant::now() + T).unwrap(), sender)
    }

    /// The sender's digests come in parts, in any order of destinations: each hand-over reads
    /// only as far as it needs, the parts stay searchable, and `End` (with the rest) closes.
    #[test]
    fn a_streaming_receiver_reads_sender_digests_in_parts_as_hand_overs_need_them() {
        let v = Version(4);
        let (mut conn, sender) = sender_saying(vec![
            Message::Digests { version: v, digests: vec![(5, 50), (2, 20)] },
            Message::Digests { version: v, digests: vec![(7, 70)] },
            Message::End { version: v, digests: vec![(1, 10), (9, 90)], two_phase: true },
        ]);
        let mut theirs = SenderDigests::default();
        theirs.read(&mut conn, v, T, |d| d.cover(&[2])).map_err(|o| format!("{o:?}")).unwrap();
        assert_eq!(theirs.digests, [(2, 20), (5, 50)], "one part read, sorted");
        assert!(!theirs.cover(&[7]) && theirs.two_phase.is_none());
        theirs.read(&mut conn, v, T, |d| d.cover(&[7])).map_err(|o| format!("{o:?}")).unwrap();
        assert_eq!(theirs.digests.len(), 3);
        theirs.read(&mut conn, v, T, |_| false).map_err(|o| format!("{o:?}")).unwrap();
        assert_eq!(theirs.digests, [(1, 10), (2, 20), (5, 50), (7, 70), (9, 90)]);
        assert_eq!(theirs.two_phase, Some(true));
        // Once `End` came nothing more is read, and every wait is covered.
        theirs.read(&mut conn, v, T, |_| false).map_err(|o| format!("{o:?}")).unwrap();
        assert!(theirs.cover(&[3]), "a digest the sender never sent fails the comparison, not a wait");
        drop(sender.join());
    }

    /// An abort, another version's digests or a closed connection end the reading with the
    /// outcome that says so.
    #[test]
    fn sender_digests_of_another_version_an_abort_or_a_hang_up_end_the_update() {
        let v = Version(4);
        let cases = [
            (vec![Message::Abort { reason: "trainer stopped".into() }], "trainer stopped"),
            (vec![Message::Digests { version: Version(3), digests: vec![(1, 1)] }], "expected digests or the end"),
            (Vec::new(), "waiting for the sender's digests"),
        ];
        for (messages, says) in cases {
            let hang_up = messages.is_empty();
            let (mut conn, sender) = sender_saying(messages);
            if hang_up {
                drop(sender.join());
            }
            let mut theirs = SenderDigests::default();
            let outcome = theirs.read(&mut conn, v, Duration::from_millis(500), |d| d.cover(&[1])).unwrap_err();
            let text = format!("{outcome:?}");
            assert!(text.contains(says), "{text}");
        }
    }
}
