//! The trainer side: connects to a receiver, agrees on a plan, and pushes versions.

use std::time::{Duration, Instant};

use weightlift_core::{plan, Manifest, Plan, RuleSet, SourceSet, Version};

use std::sync::Arc;

use std::os::fd::AsFd;

use weightlift_cuda::Gpu;

use crate::cuda_ipc::{DeviceTensors, Exporter};
use crate::net::{Endpoint, Stream};
use crate::protocol::{Conn, Message, ProtocolError, TransportKind};
use crate::report::UpdateReport;
use crate::tensors::SourceTensors;
use crate::transport::{LocalRing, SendPath, TransferError};
use crate::update::{default_threads, expected_digests, pack, sender_digests, Schedule};

/// Host transfers default to 64 MiB buckets: a two-slot ring stays small next to any model.
pub const DEFAULT_HOST_BUCKET_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct SenderOptions {
    pub transport: TransportKind,
    pub bucket_bytes: u64,
    /// Skip tensors whose digest equals the receiver's committed one.
    pub delta: bool,
    /// Longest wait for any one message from the receiver.
    pub timeout: Duration,
    /// Threads that pack and digest.
    pub threads: usize,
    /// CUDA IPC: digest the sources on the sender's GPU for the receiver to compare with (a
    /// second read of the model, on the trainer's GPU). Off, the receiver's digests of what it
    /// wrote are recorded, and the sender's memory is identified by allocation id and handle.
    pub sender_digests: bool,
    /// For fault tests only: misbehave on purpose.
    pub fault: Option<Fault>,
}

impl Default for SenderOptions {
    fn default() -> Self {
        SenderOptions {
            transport: TransportKind::Shm,
            bucket_bytes: DEFAULT_HOST_BUCKET_BYTES,
            delta: false,
            timeout: Duration::from_secs(60),
            threads: default_threads(),
            sender_digests: true,
            fault: None,
        }
    }
}

/// Deliberate faults, so tests can show the receiver survives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip one byte of bucket `n` after packing it (and after digesting it).
    FlipByteInBucket(u32),
    /// Send `n` buckets, then hang up without ending the update.
    HangUpAfterBuckets(u32),
    /// Send `n` buckets, then kill this process on the spot.
    AbortAfterBuckets(u32),
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `flip:N`, `hangup:N` or `abort:N` (bucket N).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, n) = s.split_once(':').ok_or("expected KIND:BUCKET")?;
        let n: u32 = n.parse().map_err(|_| format!("bad bucket number in `{s}`"))?;
        Ok(match kind {
            "flip" => Fault::FlipByteInBucket(n),
            "hangup" => Fault::HangUpAfterBuckets(n),
            "abort" => Fault::AbortAfterBuckets(n),
            _ => return Err(format!("unknown fault `{kind}` (flip, hangup or abort)")),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect { endpoint: String, source: std::io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("the receiver rejected this sender: {0}")]
    Rejected(String),
    #[error("the receiver refused version {version}: {reason}")]
    Refused { version: Version, reason: String },
    #[error("this sender cannot plan for the receiver: {0}")]
    Plan(String),
    #[error("plans differ: the receiver's hash is {receiver}, this sender's is {sender} (mismatched versions?)")]
    PlanMismatch { receiver: String, sender: String },
    #[error("the tensors pushed do not match the manifest this sender connected with: {0}")]
    WrongTensors(String),
    #[error("GPU: {0}")]
    Device(String),
    #[error("fault injected: {0}")]
    Injected(String),
}

/// What a receiver said of itself when a sender connected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReceiverState {
    pub tp: weightlift_core::TpRank,
    pub committed: Version,
    pub dirty: Vec<String>,
}

pub struct Sender {
    conn: Conn,
    source: Manifest,
    plan: Plan,
    /// The schedule of an update that skips nothing, built once.
    schedule: Schedule,
    path: SendPath,
    /// The receiver's committed digest per destination, as last known.
    receiver_digests: Vec<Option<u64>>,
    receiver: ReceiverState,
    options: SenderOptions,
    /// What the receiver has of this sender's GPU memory (CUDA IPC).
    exporter: Exporter,
}

impl Sender {
    /// Connects, offers the source manifest and rules, and checks both sides plan the same.
    pub fn connect(
        endpoint: &Endpoint,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        let stream = endpoint
            .connect(options.timeout)
            .map_err(|e| SendError::Connect { endpoint: endpoint.to_string(), source: e })?;
        Sender::connect_stream(stream, source, rules, options, None)
    }

    /// A sender for a receiver that connected to us (one asked to fetch a version from this
    /// trainer): the same handshake as [`Sender::connect`], over the accepted stream.
    pub fn accept(
        stream: Stream,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        Sender::connect_stream(stream, source, rules, options, None)
    }

    /// The same over a connected stream; `local_ring` is the ring of an in-process receiver.
    pub(crate) fn connect_stream(
        stream: Stream,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
        local_ring: Option<Arc<LocalRing>>,
    ) -> Result<Sender, SendError> {
        let mut conn = Conn::client(stream)?;
        conn.send(&Message::Hello {
            source: source.clone(),
            rules: rules.clone(),
            bucket_bytes: options.bucket_bytes,
            transport: options.transport,
        })?;
        let (destination, tp, plan_hash, digests, ring, receiver) = match conn.recv(options.timeout)? {
            Message::Welcome { destination, tp, plan_hash, digests, ring, committed, dirty } => {
                (destination, tp, plan_hash, digests, ring, ReceiverState { tp, committed, dirty })
            }
            Message::Reject { reason } => return Err(SendError::Rejected(reason)),
            other => return Err(ProtocolError::Unexpected { expected: "welcome", got: other.name().into() }.into()),
        };
        let plan = plan(&SourceSet::single(source.clone()), &destination, rules, tp)
            .map_err(|e| SendError::Plan(e.to_string()))?;
        let ours = plan.hash_hex();
        if ours != plan_hash {
            return Err(SendError::PlanMismatch { receiver: plan_hash, sender: ours });
        }
        let path = match (options.transport, ring) {
            (TransportKind::Shm, Some(info)) => {
                let path = SendPath::ring(&info)?;
                conn.send(&Message::RingMapped)?;
                path
            }
            (TransportKind::InProcess, Some(info)) => {
                let ring = local_ring.ok_or_else(|| SendError::Rejected("no in-process ring to use".into()))?;
                conn.send(&Message::RingMapped)?;
                SendPath::local(ring, &info)
            }
            (TransportKind::Shm | TransportKind::InProcess, None) => {
                return Err(SendError::Rejected("the receiver offered no ring".into()))
            }
            (TransportKind::Tcp, _) => SendPath::socket(options.bucket_bytes),
            // Nothing travels through the connection but control messages.
            (TransportKind::CudaIpc, _) => SendPath::socket(0),
        };
        let schedule = Schedule::new(&plan, &[], options.bucket_bytes).map_err(|e| SendError::Plan(e.to_string()))?;
        Ok(Sender {
            conn,
            source: source.clone(),
            plan,
            schedule,
            path,
            receiver_digests: digests,
            receiver,
            options,
            exporter: Exporter::default(),
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// GPU memory this sender holds beyond the tensors (CUDA IPC: to digest what it sends).
    pub fn device_extra_bytes(&self) -> u64 {
        self.exporter.device_bytes()
    }

    /// The receiver as it was when this sender connected.
    pub fn receiver_at_connect(&self) -> &ReceiverState {
        &self.receiver
    }

    /// Pushes `tensors` as `version`; returns the receiver's report. A report whose
    /// `verified` is false means the receiver kept its previous version.
    pub fn push(&mut self, version: Version, tensors: &dyn SourceTensors) -> Result<UpdateReport, SendError> {
        self.check_tensors(tensors.manifest())?;
        if self.options.transport == TransportKind::CudaIpc {
            return Err(SendError::WrongTensors("cuda-ipc moves GPU tensors: use push_device".into()));
        }
        let started = Instant::now();
        let skip: Vec<u32> = if self.options.delta {
            let expected = expected_digests(&self.plan, &self.schedule, tensors);
            (0..expected.len() as u32)
                .filter(|&d| self.receiver_digests[d as usize] == Some(expected[d as usize]))
                .collect()
        } else {
            Vec::new()
        };
        let timeout = self.options.timeout;
        let skip = self.begin(version, skip)?;

        let schedule = self
            .schedule
            .for_skip(&self.plan, &skip, self.options.bucket_bytes)
            .map_err(|e| SendError::Plan(e.to_string()))?;
        let mut digests = schedule.digests(&self.plan);
        for (k, bucket) in schedule.buckets.iter().enumerate() {
            let k = k as u32;
            match self.options.fault {
                Some(Fault::HangUpAfterBuckets(n)) if n == k => {
                    self.conn.shutdown();
                    return Err(SendError::Injected(format!("hung up after {n} bucket(s)")));
                }
                Some(Fault::AbortAfterBuckets(n)) if n == k => std::process::abort(),
                _ => {}
            }
            let flip = self.options.fault == Some(Fault::FlipByteInBucket(k));
            let plan = &self.plan;
            let threads = self.options.threads;
            self.path.send_bucket(&mut self.conn, k, bucket.bytes, timeout, |payload| {
                pack(plan, &schedule, k as usize, tensors, payload, &mut digests, threads);
                if flip {
                    payload[payload.len() / 2] ^= 0x40;
                }
            })?;
        }
        let digests = sender_digests(&self.plan, &schedule, tensors, &digests);
        self.conn.send(&Message::End { version, digests: digests.clone() })?;
        let report = self.path.await_report(&mut self.conn, timeout)?;
        for (d, value) in digests {
            self.receiver_digests[d as usize] = report.verified.then_some(value);
        }
        tracing::debug!(version = %version, seconds = started.elapsed().as_secs_f64(), "push finished");
        Ok(report)
    }
}

impl Sender {
    /// Pushes GPU tensors (on `gpu`) as `version` over CUDA IPC: the receiver maps the memory
    /// (once per allocation) and pulls; this side digests what it sends from its own memory
    /// meanwhile. Returns the receiver's report.
    pub fn push_device(
        &mut self,
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
    ) -> Result<UpdateReport, SendError> {
        let started = Instant::now();
        self.check_tensors(tensors.manifest())?;
        let checked = started.elapsed();
        if self.options.transport != TransportKind::CudaIpc {
            return Err(SendError::WrongTensors(format!(
                "GPU tensors travel over cuda-ipc, not {} (stage them in host memory for that)",
                self.options.transport
            )));
        }
        let timeout = self.options.timeout;
        let sender_digests = self.options.sender_digests;
        let (sources, fds) =
            self.exporter.describe(gpu, tensors, sender_digests).map_err(|e| SendError::Device(e.to_string()))?;
        let described = started.elapsed();
        self.begin(version, Vec::new())?;
        let begun = started.elapsed();
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        if let Err(e) = self.conn.send(&sources).and_then(|()| self.conn.send_fds(&borrowed)) {
            return self.report_instead_of(e);
        }
        self.exporter.sent(&sources);
        // Digest while the receiver pulls.
        let digests: Vec<(u32, u64)> = if sender_digests {
            let ptrs = tensors.device_ptrs();
            match self.exporter.expected_digests(gpu, &self.plan, &ptrs) {
                Ok(d) => d.iter().enumerate().map(|(d, &v)| (d as u32, v)).collect(),
                Err(e) => {
                    let reason = format!("the sender could not digest its tensors: {e}");
                    let _ = self.conn.send(&Message::Abort { reason: reason.clone() });
                    return Err(SendError::Device(reason));
                }
            }
        } else {
            Vec::new()
        };
        if let Err(e) = self.conn.send(&Message::End { version, digests }) {
            return self.report_instead_of(e);
        }
        let ended = started.elapsed();
        let report = self.path.await_report(&mut self.conn, timeout)?;
        if !report.verified {
            self.exporter.forget_locations();
        }
        // Where a push's time goes outside the receiver (RUST_LOG=weightlift=debug).
        tracing::debug!(
            version = %version,
            check_ms = checked.as_secs_f64() * 1e3,
            describe_ms = (described - checked).as_secs_f64() * 1e3,
            begin_ms = (begun - described).as_secs_f64() * 1e3,
            send_ms = (ended - begun).as_secs_f64() * 1e3,
            report_ms = (started.elapsed() - ended).as_secs_f64() * 1e3,
            receiver_ms = report.seconds * 1e3,
            "push_device finished"
        );
        Ok(report)
    }
}

impl Sender {
    /// The tensors of a push must be those announced at connect: same names, dtypes and shapes
    /// in the same order (by fingerprint once the tensors were checked: O(1) per push).
    fn check_tensors(&self, manifest: &Manifest) -> Result<(), SendError> {
        // Known here (once per sender), it passes to tensors that compare equal spec by spec.
        self.source.fingerprint();
        if self.source.matches(manifest) {
            return Ok(());
        }
        Err(SendError::WrongTensors(describe_difference(&self.source, manifest)))
    }

    /// After a send failed mid-update: the receiver may have ended the update with a report
    /// that says why (a mapping it could not make) and closed the connection. That report (not
    /// verified), else the send's own error.
    fn report_instead_of(&mut self, error: ProtocolError) -> Result<UpdateReport, SendError> {
        self.exporter.forget_locations();
        self.path.await_report(&mut self.conn, Duration::from_secs(1)).map_err(|_| error.into())
    }

    /// Opens an update of `version` that leaves the destinations in `skip` alone; returns what
    /// may really be skipped (the receiver names those it no longer holds).
    fn begin(&mut self, version: Version, skip: Vec<u32>) -> Result<Vec<u32>, SendError> {
        self.conn.send(&Message::Begin { version, skip: skip.clone() })?;
        match self.conn.recv(self.options.timeout)? {
            Message::Accepted { version: v, stale } if v == version => {
                for &d in &stale {
                    if let Some(known) = self.receiver_digests.get_mut(d as usize) {
                        *known = None;
                    }
                }
                Ok(skip.into_iter().filter(|d| !stale.contains(d)).collect())
            }
            Message::Refused { reason } => Err(SendError::Refused { version, reason }),
            other => Err(ProtocolError::Unexpected { expected: "accepted", got: other.name().into() }.into()),
        }
    }
}

/// The first few names whose specs differ, for an error message.
fn describe_difference(expected: &Manifest, got: &Manifest) -> String {
    let mut diffs: Vec<String> = Vec::new();
    for spec in expected {
        match got.get(&spec.name) {
            None => diffs.push(format!("`{}` is missing", spec.name)),
            Some(other) if other != spec => diffs.push(format!("`{}` is {other}, expected {spec}", spec.name)),
            _ => {}
        }
    }
    for spec in got {
        if expected.get(&spec.name).is_none() {
            diffs.push(format!("`{}` is unexpected", spec.name));
        }
    }
    if diffs.is_empty() {
        diffs.push("same tensors in a different order".into());
    }
    diffs.truncate(8);
    diffs.join("; ")
}
