//! The trainer side: connects to a receiver, agrees on a plan, and pushes versions.

use std::time::{Duration, Instant};

use weightlift_core::{plan, Manifest, Plan, PlanError, RuleSet, SourceSet, Version};

use std::sync::Arc;

use std::os::fd::AsFd;

use weightlift_cuda::Gpu;

use crate::cuda_ipc::{DeviceTensors, Exporter};
use crate::device_sources::{fill_from_device, Downloads};
use crate::device_writes::{BucketWrite, SlotWriter};
use crate::net::{Endpoint, Stream};
use crate::protocol::{Conn, Message, ProblemNote, ProtocolError, Shard, TransportKind};
use crate::report::{UpdateOutcome, UpdateReport};
use crate::session::{self, SessionError, Token};
use crate::tensors::SourceTensors;
use crate::transport::{LocalRing, SendPath, TransferError};
use crate::update::{
    all_cores, completed_digests, default_threads, digest_verbatim, expected_digests, pack, sender_digests, Schedule,
};

mod nccl;

use nccl::NcclSend;

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
    /// The receivers' token (see [`crate::session`]).
    pub token: Option<Token>,
    /// Host tensors into a GPU receiver on this host: copy buckets into its device slots with
    /// this process's copy engines (when the CUDA driver loads and the GPU is visible here),
    /// rather than through the ring. Off, or where that cannot be, the ring carries them.
    pub device_writes: bool,
    /// With device slots: page-lock the sources' memory (cuMemHostRegister, once while they
    /// stay where they are) so the copies run at the pinned rate. Only for memory this
    /// process keeps allocated and copies no other way meanwhile: while registered, a CUDA
    /// copy of a range that reaches past a registered one fails (torch's, say). Off, pageable
    /// sources are copied at the driver's pageable rate; pinned ones (torch's
    /// `pin_memory()`) at the pinned rate either way.
    pub pin_sources: bool,
    /// With device slots: digest what is copied from the sources as it is on this process's
    /// CPUs, from the sources' host memory (a second read of it, beside the copy engines'),
    /// rather than on the GPU from the slot it landed in (the default). Either way the
    /// receiver compares them with its digests of what its tensors then hold; host digests
    /// also catch a source changed while it was copied, at the host memory's read rate.
    pub host_digests: bool,
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
            token: None,
            device_writes: true,
            pin_sources: false,
            host_digests: false,
            fault: None,
        }
    }
}

/// Deliberate faults, so tests can show the receiver survives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Flip one byte of bucket `n` after packing it (and after digesting it); over CUDA IPC,
    /// where nothing is packed, one bit of the sender's digest of the first tensor completed
    /// from bucket `n` on (what the receiver read then differs from what the sender holds).
    FlipByteInBucket(u32),
    /// Send `n` buckets, then hang up without ending the update.
    HangUpAfterBuckets(u32),
    /// Send `n` buckets, then kill this process on the spot.
    AbortAfterBuckets(u32),
    /// Send `n` buckets, then stop for [`Fault::STALL`] (longer than a test receiver waits).
    StallAfterBuckets(u32),
    /// Two-phase: never send the receiver the commit it waits for (nor anything else).
    WithholdCommit,
}

impl Fault {
    pub const STALL: Duration = Duration::from_secs(3);
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `flip:N`, `hangup:N`, `abort:N`, `stall:N` (bucket N), or `withhold-commit`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "withhold-commit" {
            return Ok(Fault::WithholdCommit);
        }
        let (kind, n) = s.split_once(':').ok_or("expected KIND:BUCKET or withhold-commit")?;
        let n: u32 = n.parse().map_err(|_| format!("bad bucket number in `{s}`"))?;
        Ok(match kind {
            "flip" => Fault::FlipByteInBucket(n),
            "hangup" => Fault::HangUpAfterBuckets(n),
            "abort" => Fault::AbortAfterBuckets(n),
            "stall" => Fault::StallAfterBuckets(n),
            _ => return Err(format!("unknown fault `{kind}` (flip, hangup, abort, stall or withhold-commit)")),
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
    /// The receiver could not plan this sender's tensors onto its own: every problem, typed.
    #[error("the receiver rejected this sender: {reason}")]
    Unplannable { reason: String, problems: Vec<ProblemNote> },
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the receiver refused version {version}: {reason}")]
    Refused { version: Version, reason: String },
    #[error("this sender cannot plan for the receiver: {0}")]
    Plan(#[from] PlanError),
    #[error("this sender cannot schedule the update: {0}")]
    Schedule(#[from] weightlift_core::BucketError),
    #[error("plans differ: the receiver's hash is {receiver}, this sender's is {sender} (mismatched versions?)")]
    PlanMismatch { receiver: String, sender: String },
    #[error("the tensors pushed do not match the manifest this sender connected with: {0}")]
    WrongTensors(String),
    #[error("GPU, {doing}: {source}")]
    Cuda { doing: String, source: weightlift_cuda::CudaError },
    #[error("NCCL, {doing}: {source}")]
    Nccl { doing: String, source: weightlift_cuda::NcclError },
    /// One failure on this side that ended the update for every receiver of a fan-out class.
    #[error(transparent)]
    Class(Arc<SendError>),
    #[error("fault injected: {0}")]
    Injected(String),
    #[error("a sharded trainer's rank: {0}")]
    BadShard(String),
    /// The plan quantizes `weight` to FP8 on the way, and this sender's path does not: only
    /// host tensors from one trainer, packed over shm or tcp, are quantized today.
    #[error("`{weight}` is FP8 in the engine, quantized on the way, and {why}")]
    Quantized { weight: String, why: &'static str },
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
    /// Whom this sender talks to (an endpoint, or the peer that connected), for messages.
    name: String,
    source: Manifest,
    plan: Plan,
    /// The schedule of an update that skips nothing, built once.
    schedule: Schedule,
    path: SendPath,
    /// The receiver's committed digest per destination, as last known.
    receiver_digests: Vec<Option<u64>>,
    receiver: ReceiverState,
    /// The receiver's committed version and dirty tensors as of its last report.
    last_known: ReceiverState,
    options: SenderOptions,
    /// What the receiver has of this sender's GPU memory (CUDA IPC).
    exporter: Exporter,
    /// The update begun and not settled yet.
    in_flight: Option<Version>,
    /// The digests of the update in flight, recorded as the receiver's once it commits.
    sent_digests: Vec<(u32, u64)>,
    /// The payload memory page-locked for copies down from a GPU (GPU tensors over a host
    /// transport), once.
    payload_pins: Option<Vec<weightlift_cuda::PinnedRanges>>,
    /// The receiver streams updates into its engine's loader: whole-tensor buckets of its
    /// size, each sent with its digests, and no delta (it keeps nothing between updates).
    streaming: bool,
    /// This sender's rank as one rank of a sharded trainer.
    shard_rank: Option<u32>,
    /// Over NCCL, in the first sender of a fan-out class: the communicator with the class's
    /// receivers and the packing bound to the tensors, kept from update to update; None before
    /// the first and after one that did not go through.
    nccl: Option<NcclSend>,
}

/// How a receiver answered the end of a transfer.
#[derive(Debug)]
pub enum Vote {
    /// Two-phase: every tensor verified; the receiver waits for [`Sender::send_decision`].
    Verified,
    /// The receiver settled the update on its own (committed, or failed and said why). Boxed:
    /// a report is far larger than the other variant.
    Settled(Box<UpdateReport>),
}

/// What a push moves: tensors in this process's host memory (a trainer's, a mapped
/// checkpoint), or on one of its GPUs.
#[derive(Clone, Copy)]
pub enum Sources<'a> {
    Host(&'a dyn SourceTensors),
    Device { gpu: &'a Gpu, tensors: &'a dyn DeviceTensors },
}

impl Sources<'_> {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Sources::Host(tensors) => tensors.manifest(),
            Sources::Device { tensors, .. } => tensors.manifest(),
        }
    }
}

impl Sender {
    /// Connects, offers the source manifest and rules, and checks both sides plan the same.
    pub fn connect(
        endpoint: &Endpoint,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        let stream = dial(endpoint, &options)?;
        Sender::connect_stream(stream, endpoint.to_string(), source, rules, options, None, None)
    }

    /// Connects as rank `shard.rank` of a sharded trainer of `shard.world` ranks, each of which
    /// connects to the same receiver with its own pieces (`source`, placed by
    /// `shard.placements`): the receiver plans once every rank's hello came, and this sender
    /// moves its own share of that plan. Rank 0 coordinates every version (begin, the
    /// receivers' votes, commit); the receiver commits only when every rank's share verified.
    pub fn connect_shard(
        endpoint: &Endpoint,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
        shard: Shard,
    ) -> Result<Sender, SendError> {
        let stream = dial(endpoint, &options)?;
        Sender::connect_stream(stream, endpoint.to_string(), source, rules, options, None, Some(shard))
    }

    /// A sender for a receiver that connected to us (one asked to fetch a version from this
    /// trainer): the same handshake as [`Sender::connect`], over the accepted stream.
    pub fn accept(
        stream: Stream,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
    ) -> Result<Sender, SendError> {
        let name = stream.peer();
        Sender::connect_stream(stream, name, source, rules, options, None, None)
    }

    /// The same over a connected stream; `local_ring` is the ring of an in-process receiver,
    /// `shard` this sender's rank of a sharded trainer.
    pub(crate) fn connect_stream(
        stream: Stream,
        name: String,
        source: &Manifest,
        rules: &RuleSet,
        options: SenderOptions,
        local_ring: Option<Arc<LocalRing>>,
        shard: Option<Shard>,
    ) -> Result<Sender, SendError> {
        if let Some(shard) = &shard {
            if shard.rank >= shard.world || shard.placements.len() != source.len() {
                return Err(SendError::BadShard(format!(
                    "rank {} of {} with {} placement(s) for {} tensor(s): the rank must be below the world size \
                     and each tensor needs one placement (or none)",
                    shard.rank,
                    shard.world,
                    shard.placements.len(),
                    source.len()
                )));
            }
        }
        let mut conn = Conn::client(stream)?;
        session::authenticate_receiver(&mut conn, options.token.as_ref(), Instant::now() + options.timeout)?;
        conn.send(&Message::Hello {
            source: source.clone(),
            rules: rules.clone(),
            bucket_bytes: options.bucket_bytes,
            transport: options.transport,
            device_writes: options.device_writes
                && matches!(options.transport, TransportKind::Shm | TransportKind::InProcess)
                && weightlift_cuda::driver_present(),
            shard: shard.clone(),
        })?;
        let mut options = options;
        let (destination, tp, plan_hash, digests, ring, slots, receiver, stream, shards) =
            match conn.recv(options.timeout)? {
                Message::Welcome {
                    destination,
                    tp,
                    plan_hash,
                    digests,
                    ring,
                    slots,
                    committed,
                    dirty,
                    stream_bucket_bytes,
                    shards,
                } => {
                    let receiver = ReceiverState { tp, committed, dirty };
                    (destination, tp, plan_hash, digests, ring, slots, receiver, stream_bucket_bytes, shards)
                }
                Message::Reject { reason, problems } if !problems.is_empty() => {
                    return Err(SendError::Unplannable { reason, problems })
                }
                Message::Reject { reason, .. } => return Err(SendError::Rejected(reason)),
                other => return Err(ProtocolError::Unexpected { expected: "welcome", got: other.name().into() }.into()),
            };
        if let Some(bytes) = stream {
            options.bucket_bytes = bytes;
        }
        // A rank of a sharded trainer plans over every rank's pieces, as the receiver did, and
        // moves its share.
        let sources = match (&shard, shards) {
            (None, _) => SourceSet::single(source.clone()),
            (Some(shard), Some(all)) if all.len() == shard.world as usize => {
                let (manifests, placements) = all.into_iter().map(|s| (s.source, s.placements)).unzip();
                SourceSet::placed(manifests, placements)?
            }
            (Some(shard), _) => {
                return Err(SendError::BadShard(format!(
                    "the receiver did not plan over the {} ranks of this trainer",
                    shard.world
                )))
            }
        };
        let plan = plan(&sources, &destination, rules, tp)?;
        let ours = plan.hash_hex();
        if ours != plan_hash {
            return Err(SendError::PlanMismatch { receiver: plan_hash, sender: ours });
        }
        if let (Some(s), Some(_)) = (plan.scaled.first(), &shard) {
            let weight = plan.destinations[s.weight as usize].name.clone();
            return Err(SendError::Quantized {
                weight,
                why: "a sharded trainer's ranks do not quantize their shares yet",
            });
        }
        let plan = match &shard {
            Some(shard) => plan.share_of(shard.rank),
            None => plan,
        };
        let slot_fds = match &slots {
            Some(info) => conn.recv_fds(info.count as usize, options.timeout)?,
            None => Vec::new(),
        };
        // Device slots where this process can map them; the ring where it cannot.
        let writer = slots.as_ref().and_then(|info| match SlotWriter::map(info, &slot_fds) {
            Ok(writer) => Some(writer),
            Err(e) => {
                tracing::info!("the receiver's device slots stay unused, buckets go through the ring: {e}");
                None
            }
        });
        drop(slot_fds);
        let path = match (options.transport, ring, writer) {
            (TransportKind::Shm | TransportKind::InProcess, Some(_), Some(writer)) => {
                conn.send(&Message::SlotsMapped)?;
                SendPath::Device(Box::new(writer))
            }
            (TransportKind::Shm, Some(info), None) => {
                let path = SendPath::ring(&info)?;
                conn.send(&Message::RingMapped)?;
                path
            }
            (TransportKind::InProcess, Some(info), None) => {
                let ring = local_ring.ok_or_else(|| SendError::Rejected("no in-process ring to use".into()))?;
                conn.send(&Message::RingMapped)?;
                SendPath::local(ring, &info)
            }
            (TransportKind::Shm | TransportKind::InProcess, None, _) => {
                return Err(SendError::Rejected("the receiver offered no ring".into()))
            }
            (TransportKind::Tcp, _, _) => SendPath::socket(options.bucket_bytes),
            // Nothing travels through the connection but control messages.
            (TransportKind::CudaIpc | TransportKind::Nccl, _, _) => SendPath::socket(0),
        };
        let schedule = match stream {
            Some(bytes) => Schedule::whole(&plan, bytes)?,
            None => Schedule::new(&plan, &[], options.bucket_bytes)?,
        };
        Ok(Sender {
            conn,
            name,
            source: source.clone(),
            plan,
            schedule,
            path,
            receiver_digests: digests,
            last_known: receiver.clone(),
            receiver,
            options,
            exporter: Exporter::default(),
            in_flight: None,
            sent_digests: Vec::new(),
            payload_pins: None,
            streaming: stream.is_some(),
            shard_rank: shard.map(|s| s.rank),
            nccl: None,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn transport(&self) -> TransportKind {
        self.options.transport
    }

    /// Whom this sender talks to: the receiver's rank and endpoint (or the peer that connected).
    /// Whether buckets go into the receiver's device slots, copied by this process.
    pub fn writes_device_slots(&self) -> bool {
        matches!(self.path, SendPath::Device(_))
    }

    /// Whether the last update into device slots read its sources from their files (a
    /// checkpoint mostly out of the page cache) rather than from their memory.
    pub fn reads_from_disk(&self) -> bool {
        matches!(&self.path, SendPath::Device(writer) if writer.read_from_disk())
    }

    /// Whether this sender decides versions: any sender but a sharded trainer's ranks past 0,
    /// which leave the decision to rank 0 and take the receiver's report.
    pub fn coordinates(&self) -> bool {
        self.shard_rank.is_none_or(|rank| rank == 0)
    }

    pub fn name(&self) -> String {
        format!("rank {} at {}", self.receiver.tp.rank, self.name)
    }

    /// GPU memory this sender holds beyond the tensors (CUDA IPC: to digest what it sends;
    /// device slots: the digests of what landed; NCCL: two send buffers too).
    pub fn device_extra_bytes(&self) -> u64 {
        let slot_digests = match &self.path {
            SendPath::Device(writer) => writer.device_bytes(),
            _ => 0,
        };
        let send_buffers = self.nccl.as_ref().map_or(0, NcclSend::device_bytes);
        self.exporter.device_bytes() + slot_digests + send_buffers
    }

    /// The receiver as it was when this sender connected.
    pub fn receiver_at_connect(&self) -> &ReceiverState {
        &self.receiver
    }

    /// Pushes host `tensors` as `version`; returns the receiver's report. A report whose
    /// `outcome` is not `committed` means the receiver kept its previous version.
    pub fn push(&mut self, version: Version, tensors: &dyn SourceTensors) -> Result<UpdateReport, SendError> {
        self.push_sources(version, Sources::Host(tensors))
    }

    /// Pushes GPU tensors (on `gpu`) as `version`, as [`Sender::push`]: over CUDA IPC the
    /// receiver maps the memory (once per allocation) and pulls while this side digests it;
    /// over a host transport each bucket comes down from the GPU first.
    pub fn push_device(
        &mut self,
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
    ) -> Result<UpdateReport, SendError> {
        self.push_sources(version, Sources::Device { gpu, tensors })
    }

    /// Pushes `sources` as `version`: checks them, opens the update, moves it by this sender's
    /// path ([`Sender::transfer`]) and returns the receiver's report.
    pub fn push_sources(&mut self, version: Version, sources: Sources<'_>) -> Result<UpdateReport, SendError> {
        let started = Instant::now();
        let skip = self.skip_for(sources)?;
        let checked = started.elapsed();
        let skip = self.begin(version, skip)?;
        let begun = started.elapsed();
        let vote = self.transfer(version, &skip, sources, false)?;
        // Where a push's time goes outside the receiver (RUST_LOG=weightlift=debug).
        tracing::debug!(
            version = %version,
            check_ms = checked.as_secs_f64() * 1e3,
            begin_ms = (begun - checked).as_secs_f64() * 1e3,
            transfer_ms = (started.elapsed() - begun).as_secs_f64() * 1e3,
            "push finished"
        );
        match vote {
            Vote::Settled(report) => Ok(*report),
            Vote::Verified => Err(unexpected_vote()),
        }
    }

    /// Checks `sources` against the manifest connected with and this sender's transport, and
    /// returns the destinations a delta update may skip: those whose digest the receiver holds
    /// already (none unless `delta`, and none for GPU sources, whose digests are taken as
    /// they are sent).
    pub fn skip_for(&self, sources: Sources<'_>) -> Result<Vec<u32>, SendError> {
        self.check_tensors(sources.manifest())?;
        if let (Some(s), Sources::Device { .. }) = (self.plan.scaled.first(), sources) {
            let weight = self.plan.destinations[s.weight as usize].name.clone();
            return Err(SendError::Quantized { weight, why: "GPU sources are not quantized yet: push host tensors" });
        }
        if let (Some(s), SendPath::Device(_)) = (self.plan.scaled.first(), &self.path) {
            let weight = self.plan.destinations[s.weight as usize].name.clone();
            return Err(SendError::Quantized { weight, why: "device slots do not quantize yet" });
        }
        let Sources::Host(tensors) = sources else { return Ok(Vec::new()) };
        if let TransportKind::CudaIpc | TransportKind::Nccl = self.options.transport {
            let transport = self.options.transport;
            return Err(SendError::WrongTensors(format!("{transport} moves GPU tensors: push them from the GPU")));
        }
        // A rank of a sharded trainer cannot digest whole destinations: it holds parts.
        if !self.options.delta || self.streaming || self.shard_rank.is_some() {
            return Ok(Vec::new());
        }
        let expected = expected_digests(&self.plan, &self.schedule, tensors);
        Ok((0..expected.len() as u32)
            .filter(|&d| self.receiver_digests[d as usize] == Some(expected[d as usize]))
            .collect())
    }

    /// Opens an update of `version` that leaves the destinations in `skip` alone; returns what
    /// may really be skipped (the receiver names those it no longer holds).
    pub fn begin(&mut self, version: Version, skip: Vec<u32>) -> Result<Vec<u32>, SendError> {
        self.send_begin(version, &skip)?;
        self.accepted(version, skip)
    }

    /// The first half of [`Sender::begin`], so that a group asks every receiver at once.
    pub fn send_begin(&mut self, version: Version, skip: &[u32]) -> Result<(), SendError> {
        self.conn.send(&Message::Begin { version, skip: skip.to_vec() })?;
        self.in_flight = Some(version);
        Ok(())
    }

    /// The second half of [`Sender::begin`].
    pub fn accepted(&mut self, version: Version, skip: Vec<u32>) -> Result<Vec<u32>, SendError> {
        match self.conn.recv(self.options.timeout)? {
            Message::Accepted { version: v, stale } if v == version => {
                for &d in &stale {
                    if let Some(known) = self.receiver_digests.get_mut(d as usize) {
                        *known = None;
                    }
                }
                Ok(skip.into_iter().filter(|d| !stale.contains(d)).collect())
            }
            Message::Refused { reason } => {
                self.in_flight = None;
                Err(SendError::Refused { version, reason })
            }
            other => Err(ProtocolError::Unexpected { expected: "accepted", got: other.name().into() }.into()),
        }
    }

    /// Moves an accepted update (less `skip`) and its digests, then takes the receiver's
    /// vote; `two_phase` leaves the commit to [`Sender::send_decision`]. One way per kind of
    /// source and path: host tensors into device slots or as packed buckets (ring, socket);
    /// GPU tensors exported over CUDA IPC or copied down into buckets. Each returns the
    /// digests the receiver must match; the `End`, the vote and the fault handling are
    /// shared. A receiver that ended the update early (it timed out, a mapping failed)
    /// answers with its report, which says why.
    pub fn transfer(
        &mut self,
        version: Version,
        skip: &[u32],
        sources: Sources<'_>,
        two_phase: bool,
    ) -> Result<Vote, SendError> {
        let ipc = self.options.transport == TransportKind::CudaIpc;
        let sent = match (sources, &mut self.path) {
            (Sources::Host(tensors), SendPath::Device(writer)) => {
                let schedule = self.schedule.for_skip(&self.plan, skip, self.options.bucket_bytes)?;
                write_device_slots(writer, &mut self.conn, &self.plan, &schedule, &self.options, version, tensors)
            }
            (Sources::Host(tensors), _) => self.send_packed(skip, tensors),
            (Sources::Device { gpu, tensors }, _) if ipc => self.export(version, gpu, tensors),
            (Sources::Device { gpu, tensors }, _) if self.options.transport == TransportKind::Nccl => {
                let mut votes = Sender::transfer_nccl(&mut [self], version, gpu, tensors, two_phase);
                return votes.pop().expect("one vote per receiver");
            }
            (Sources::Device { gpu, tensors }, _) => self.send_downloaded(gpu, tensors),
        };
        self.finish(version, sent, two_phase)
    }

    /// Ends a transfer that sent `sent` (the digests to compare with) or failed: the `End`,
    /// then the receiver's vote, or the report it ended the update with.
    fn finish(
        &mut self,
        version: Version,
        sent: Result<Vec<(u32, u64)>, SendError>,
        two_phase: bool,
    ) -> Result<Vote, SendError> {
        let ended = sent.and_then(|digests| {
            self.conn.send(&Message::End { version, digests: digests.clone(), two_phase })?;
            self.sent_digests = digests;
            Ok(())
        });
        match ended {
            Ok(()) => self.vote(),
            Err(e) => self.report_instead_of(e),
        }
    }

    /// Host tensors as packed buckets through the ring or the socket: packed (and digested)
    /// in bucket order on this thread; over a socket the next bucket is packed while the last
    /// one is written. Faults strike where the buckets go, after those before them went.
    fn send_packed(&mut self, skip: &[u32], tensors: &dyn SourceTensors) -> Result<Vec<(u32, u64)>, SendError> {
        let schedule = self.schedule.for_skip(&self.plan, skip, self.options.bucket_bytes)?;
        let mut digests = schedule.digests(&self.plan);
        let plan = &self.plan;
        let (threads, fault) = (self.options.threads, self.options.fault);
        let sizes: Vec<u64> = schedule.buckets.iter().map(|b| b.bytes).collect();
        let before = |k, conn: &Conn| inject(fault, k, conn);
        let streaming = self.streaming;
        self.path.send_buckets(&mut self.conn, &sizes, self.options.timeout, before, |k, payload| {
            pack(plan, &schedule, k as usize, tensors, payload, &mut digests, threads);
            if fault == Some(Fault::FlipByteInBucket(k)) {
                payload[payload.len() / 2] ^= 0x40;
            }
            let completed = match streaming {
                true => completed_digests(plan, &schedule, k as usize, tensors, &digests),
                false => Vec::new(),
            };
            Ok::<_, SendError>(completed)
        })?;
        Ok(sender_digests(plan, &schedule, tensors, &digests))
    }

    /// GPU tensors over CUDA IPC: tells the receiver where they live (it maps what it has
    /// not yet) and, with `sender_digests`, digests them while the receiver pulls. To a
    /// streaming receiver the digests go out in parts as they are computed (`Digests`, in the
    /// order it hands tensors over), the last part left for `End`. A failure on this side
    /// calls the update off with the receiver.
    fn export(
        &mut self,
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
    ) -> Result<Vec<(u32, u64)>, SendError> {
        let sender_digests = self.options.sender_digests;
        let (sources, fds) = match self.exporter.describe(gpu, tensors, sender_digests) {
            Ok(described) => described,
            Err(source) => return Err(self.call_off(SendError::Cuda { doing: "describing its memory".into(), source })),
        };
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        self.conn.send(&sources)?;
        self.conn.send_fds(&borrowed)?;
        self.exporter.sent(&sources);
        if !sender_digests {
            return Ok(Vec::new());
        }
        let parts = match self.streaming {
            true => self.schedule.digest_parts(&self.plan, 2 * self.options.bucket_bytes),
            false => vec![(0..self.plan.destinations.len() as u32).collect()],
        };
        let digested = (|| {
            let batches = self.exporter.expected_parts(gpu, &self.plan, &tensors.device_ptrs(), &parts)?;
            let launched = batches.iter().map(|(_, batch)| batch.launch(gpu)).collect::<Result<Vec<_>, _>>()?;
            let flipped = match self.options.fault {
                Some(Fault::FlipByteInBucket(k)) => self.schedule.completes.iter().skip(k as usize).flatten().next(),
                _ => None,
            };
            let mut last = Vec::new();
            for (i, ((part, _), launched)) in batches.iter().zip(launched).enumerate() {
                let mut digests: Vec<(u32, u64)> = part.iter().copied().zip(launched.wait()?).collect();
                for (d, value) in &mut digests {
                    if Some(&*d) == flipped {
                        *value ^= 1;
                    }
                }
                if i + 1 == batches.len() {
                    last = digests;
                } else if let Err(e) = self.conn.send(&Message::Digests { version, digests }) {
                    return Ok(Err(e));
                }
            }
            Ok(Ok(last))
        })();
        match digested {
            Ok(sent) => Ok(sent?),
            Err(source) => Err(self.call_off(SendError::Cuda { doing: "digesting its tensors".into(), source })),
        }
    }

    /// Tells the receiver the update is off because of `error` on this side (it answers
    /// with its report, which [`Sender::transfer`] then returns); `error` is passed on.
    fn call_off(&mut self, error: SendError) -> SendError {
        let reason = format!("the sender failed: {error}");
        match self.conn.send(&Message::Abort { reason }) {
            Ok(()) => error,
            Err(e) => e.into(),
        }
    }

    /// GPU tensors over a host transport (a socket to another host, say): each bucket copied
    /// down from the GPU into the payload (page-locked), then sent; the digests to compare
    /// with are taken on the GPU, where the tensors live.
    fn send_downloaded(&mut self, gpu: &Gpu, tensors: &dyn DeviceTensors) -> Result<Vec<(u32, u64)>, SendError> {
        let timeout = self.options.timeout;
        let ptrs = tensors.device_ptrs();
        if self.payload_pins.is_none() {
            // Only a hint: copies into pageable memory are slower, not wrong.
            let mut pins = Vec::new();
            self.path.each_memory(|memory| pins.extend(gpu.pin_ranges(&[memory]).ok()));
            self.payload_pins = Some(pins);
        }
        let mut downloads = Downloads::default();
        let fault = self.options.fault;
        // A streaming receiver takes each bucket's digests with it: taken first, on the GPU.
        let expected = match self.streaming {
            true => Some(
                self.exporter
                    .expected_digests(gpu, &self.plan, &ptrs)
                    .map_err(|source| SendError::Cuda { doing: "digesting the tensors".into(), source })?,
            ),
            false => None,
        };
        let (plan, schedule) = (&self.plan, &self.schedule);
        let sizes: Vec<u64> = schedule.buckets.iter().map(|b| b.bytes).collect();
        // Over a socket, bucket k+1 comes down from the GPU (on this thread, the GPU's) while
        // bucket k is written.
        let before = |k, conn: &Conn| inject(fault, k, conn);
        self.path.send_buckets(&mut self.conn, &sizes, timeout, before, |k, payload| {
            let filled = fill_from_device(plan, schedule, k as usize, gpu, &ptrs, payload, &mut downloads);
            if fault == Some(Fault::FlipByteInBucket(k)) {
                payload[payload.len() / 2] ^= 0x40;
            }
            filled.map_err(|source| SendError::Cuda { doing: format!("copying bucket {k} down"), source })?;
            let completed =
                expected.as_ref().map(|all| schedule.completes[k as usize].iter().map(|&d| (d, all[d as usize])));
            Ok(completed.into_iter().flatten().collect())
        })?;
        let digests = match expected {
            Some(digests) => digests,
            None => self
                .exporter
                .expected_digests(gpu, &self.plan, &ptrs)
                .map_err(|source| SendError::Cuda { doing: "digesting the tensors".into(), source })?,
        };
        Ok(digests.iter().enumerate().map(|(d, &v)| (d as u32, v)).collect())
    }

    /// Two-phase: tells a receiver that voted [`Vote::Verified`] to commit (`Ok`) or to call
    /// the update off (`Err(reason)`); [`Sender::await_settled`] then takes its report.
    pub fn send_decision(&mut self, decision: Result<(), &str>) -> Result<(), SendError> {
        let Some(version) = self.in_flight else {
            return Err(ProtocolError::Unexpected { expected: "an update in flight", got: "none".into() }.into());
        };
        match decision {
            Ok(()) if self.options.fault == Some(Fault::WithholdCommit) => Ok(()),
            Ok(()) => Ok(self.conn.send(&Message::Commit { version })?),
            Err(reason) => Ok(self.conn.send(&Message::Abort { reason: reason.to_string() })?),
        }
    }

    /// The report that settles the update in flight.
    pub fn await_settled(&mut self) -> Result<UpdateReport, SendError> {
        // A receiver that hears no decision gives up after its own timeout and reports.
        let report = self.path.await_report(&mut self.conn, self.options.timeout * 2)?;
        Ok(self.settled(report))
    }

    /// Calls off an accepted update before its transfer (another receiver refused it);
    /// returns the receiver's report (nothing written).
    pub fn abort(&mut self, reason: &str) -> Result<UpdateReport, SendError> {
        self.sent_digests.clear();
        self.conn.send(&Message::Abort { reason: reason.to_string() })?;
        self.await_settled()
    }

    /// The receiver's answer to `End`.
    fn vote(&mut self) -> Result<Vote, SendError> {
        loop {
            match self.conn.recv(self.options.timeout)? {
                Message::Verified { .. } => return Ok(Vote::Verified),
                Message::Report { report } => return Ok(Vote::Settled(Box::new(self.settled(report)))),
                Message::SlotFree { slot } => self.path.give_back(slot),
                other => {
                    return Err(
                        ProtocolError::Unexpected { expected: "verified or report", got: other.name().into() }.into()
                    )
                }
            }
        }
    }

    /// After a send or receive failed mid-update: the receiver may have ended the update with a
    /// report that says why (it timed out, a mapping failed) and closed the connection. That
    /// report, else the error itself.
    fn report_instead_of(&mut self, error: SendError) -> Result<Vote, SendError> {
        self.exporter.forget_locations();
        if let SendError::Transfer(TransferError::ReceiverFailed(report)) = error {
            return Ok(Vote::Settled(Box::new(self.settled(*report))));
        }
        match self.path.await_report(&mut self.conn, Duration::from_secs(1)) {
            Ok(report) => Ok(Vote::Settled(Box::new(self.settled(report)))),
            Err(_) => Err(error),
        }
    }

    /// Records what a report says of the receiver.
    fn settled(&mut self, report: UpdateReport) -> UpdateReport {
        self.in_flight = None;
        let committed = report.is_committed();
        for (d, value) in std::mem::take(&mut self.sent_digests) {
            if let Some(known) = self.receiver_digests.get_mut(d as usize) {
                // A streaming receiver keeps none of it.
                *known = (committed && !self.streaming).then_some(value);
            }
        }
        if !committed {
            self.exporter.forget_locations();
        }
        self.last_known.committed = report.committed;
        self.last_known.dirty = report.dirty.clone();
        report
    }

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

    /// A report for a receiver that refused `version` or could not be reached, made on this
    /// side from what it last said of itself.
    pub fn report_for(&self, version: Version, outcome: UpdateOutcome, error: String) -> UpdateReport {
        UpdateReport {
            version,
            committed: self.last_known.committed,
            dirty: self.last_known.dirty.clone(),
            outcome,
            error: Some(error),
            ..UpdateReport::default()
        }
    }
}

/// A connection to `endpoint`, within the sender's timeout.
fn dial(endpoint: &Endpoint, options: &SenderOptions) -> Result<Stream, SendError> {
    endpoint.connect(options.timeout).map_err(|e| SendError::Connect { endpoint: endpoint.to_string(), source: e })
}

/// Host tensors into the receiver's device slots, copied by this process's copy engines (see
/// [`crate::device_writes`]); returns the digests the receiver must match.
fn write_device_slots(
    writer: &mut SlotWriter,
    conn: &mut Conn,
    plan: &Plan,
    schedule: &Schedule,
    options: &SenderOptions,
    version: Version,
    tensors: &dyn SourceTensors,
) -> Result<Vec<(u32, u64)>, SendError> {
    let mut digests = schedule.digests(plan);
    let (threads, fault, timeout) = (options.threads, options.fault, options.timeout);
    let (pin, landed) = (options.pin_sources, !options.host_digests);
    // Host digests go beside the copy engines, over the whole update, on threads of their
    // own: every core, as the receiver spends none on device slots and that digest is what
    // bounds the update.
    let digest_threads = all_cores().max(threads);
    let (sent, verbatim, digest_seconds) = std::thread::scope(|scope| {
        let job = (!landed).then(|| {
            scope.spawn(|| {
                let started = Instant::now();
                (digest_verbatim(schedule, tensors, digest_threads), started.elapsed().as_secs_f64())
            })
        });
        let sent = (0..schedule.buckets.len() as u32).try_for_each(|k| {
            inject(fault, k, conn)?;
            let flip = fault == Some(Fault::FlipByteInBucket(k));
            let bucket = BucketWrite { plan, schedule, k: k as usize, sources: tensors, threads, flip, pin, landed };
            writer.send_bucket(conn, &bucket, &mut digests, timeout)?;
            Ok::<(), SendError>(())
        });
        let sent = sent.and_then(|()| Ok(writer.finish_digests(&mut digests)?));
        let joined = job.map(|job| job.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        let (verbatim, seconds) = joined.unwrap_or_default();
        (sent, verbatim, seconds)
    });
    sent?;
    if !landed {
        writer.phases.digest = digest_seconds;
    }
    for (d, piece) in verbatim {
        digests[d as usize].add(piece);
    }
    writer.log_phases(version, "device slots written");
    Ok(sender_digests(plan, schedule, tensors, &digests))
}

/// The faults that strike before bucket `k` is sent (see [`Fault`]).
fn inject(fault: Option<Fault>, k: u32, conn: &Conn) -> Result<(), SendError> {
    match fault {
        Some(Fault::HangUpAfterBuckets(n)) if n == k => {
            conn.shutdown();
            Err(SendError::Injected(format!("hung up after {n} bucket(s)")))
        }
        Some(Fault::AbortAfterBuckets(n)) if n == k => std::process::abort(),
        Some(Fault::StallAfterBuckets(n)) if n == k => {
            std::thread::sleep(Fault::STALL);
            Ok(())
        }
        _ => Ok(()),
    }
}

fn unexpected_vote() -> SendError {
    ProtocolError::Unexpected { expected: "report", got: "verified".into() }.into()
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
