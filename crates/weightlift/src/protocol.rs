//! The control protocol between a sender (trainer side) and a receiver (engine side).
//!
//! A connection opens with an 8-byte preamble from the sender (`WLFT` and the protocol
//! version), then carries frames: `[u32 LE length][u8 kind][body]`. Kind 1 is a JSON
//! [`Message`]; kind 2 is raw bucket bytes (the socket transport). Every frame is bounded before
//! anything is allocated, a body's memory grows only as its bytes arrive, and every read has a
//! deadline, so a peer that sends garbage, an oversized frame, a trickle or nothing at all is
//! dropped with a reason, never crashes the receiver or grows it without bound.
//!
//! A session: `Challenge` -> `Proof` -> `Authenticated` (see [`crate::session`]; frames stay
//! under [`MAX_HANDSHAKE_BYTES`] until then), `Hello` (the sender's source manifest and rules)
//! -> `Welcome` (the receiver's parameters, its plan's hash, its committed version) or
//! `Reject`. One update: `Begin` -> `Accepted` | `Refused`, buckets (through the transport),
//! `End` with the sender's digests; then, for an update of one receiver, `Report`; for an
//! update of several (two-phase), `Verified` (or a failed `Report`), the sender's `Commit` or
//! `Abort`, and `Report`.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use weightlift_core::{Manifest, Placement, RuleSet, TpRank, Version};

use crate::net::Stream;
use crate::report::UpdateReport;

/// 5: authentication (`Challenge`, `Proof`, `Authenticated`) and the two-phase commit of an
/// update to several receivers (`End::two_phase`, `Verified`, `Commit`). 6: device slots.
/// 7: buckets cut on digest chunks where they can be (both sides compute the same layout).
/// 8: sharded trainers (`Hello::shard`, `Welcome::shards`). 9: `Digests`, a streaming
/// receiver's sender digests over CUDA IPC in parts. 10: the NCCL transport (`NcclSession`).
pub const PROTOCOL_VERSION: u32 = 10;
const MAGIC: &[u8; 4] = b"WLFT";
/// Bound on a JSON frame: a manifest of 100k tensors is ~10 MB.
pub const MAX_MESSAGE_BYTES: u32 = 64 << 20;
/// Bound on every frame before the session is authenticated: a challenge or a proof is ~200 B.
pub const MAX_HANDSHAKE_BYTES: u32 = 4 << 10;
/// A body's buffer grows by at most this much ahead of the bytes that arrived.
const BODY_STEP_BYTES: usize = 1 << 20;
const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;

/// How bucket bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// Through a ring of slots in shared memory (same host).
    Shm,
    /// Over the connection itself (TCP across hosts, or a Unix socket).
    Tcp,
    /// Through a ring in the memory of the one process both sides run in.
    InProcess,
    /// GPU to GPU on one host: the receiver maps the sender's device memory once (CUDA IPC)
    /// and pulls, on the same GPU or over NVLink.
    CudaIpc,
    /// GPU to GPU on any host: buckets packed on the trainer's GPU, moved by NCCL into the
    /// receiver's GPU, scattered and digested there; the connection carries control only.
    Nccl,
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shm" => Ok(TransportKind::Shm),
            "tcp" | "socket" => Ok(TransportKind::Tcp),
            "inproc" | "in-process" => Ok(TransportKind::InProcess),
            "cuda-ipc" | "ipc" => Ok(TransportKind::CudaIpc),
            "nccl" => Ok(TransportKind::Nccl),
            _ => Err(format!("unknown transport `{s}` (expected shm, tcp, inproc, cuda-ipc or nccl)")),
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::InProcess => "inproc",
            TransportKind::CudaIpc => "cuda-ipc",
            TransportKind::Nccl => "nccl",
        })
    }
}

/// The shared-memory ring a receiver created for one sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingInfo {
    pub path: String,
    pub slots: u32,
    pub slot_bytes: u64,
}

/// Buffers of a GPU receiver's device memory that a sender on its host copies buckets into
/// (host to device, with the copy engines): `count` descriptors of shareable allocations of
/// `mapped_bytes` each follow the welcome, and each holds one bucket of up to `slot_bytes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSlots {
    /// UUID (hex) of the receiver's GPU.
    pub device: String,
    pub count: u32,
    pub slot_bytes: u64,
    pub mapped_bytes: u64,
}

/// One allocation of a sender's GPU memory, as a receiver opens it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum IpcSegment {
    /// cudaMalloc memory: a legacy IPC handle (hex) and the allocation's driver id, which
    /// changes when the memory is freed and allocated again. `base` is its address in the
    /// sender's process (used as is by a receiver in the same process).
    Legacy { handle: String, buffer_id: u64, bytes: u64, base: u64 },
    /// Memory weightlift allocated through CUDA VMM, shared as a file descriptor: `id` is unique
    /// per allocation of the sender; `fd` is its index among the descriptors that follow the
    /// message when this connection has not seen the segment before.
    Shareable { id: u64, mapped_bytes: u64, fd: Option<u32>, base: u64 },
    /// CUDA VMM mappings side by side that another allocator made (torch's expandable
    /// segments, 20 MiB each): `bytes` at `base` in the sender, one physical allocation per
    /// piece, mapped the same way by the receiver.
    Pieces { base: u64, bytes: u64, pieces: Vec<IpcPiece> },
}

/// One mapping of an [`IpcSegment::Pieces`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct IpcPiece {
    /// From the segment's base.
    pub offset: u64,
    pub bytes: u64,
    /// The sender's driver id of the physical allocation (never reused in that process).
    pub block_id: u64,
    /// Its index among the descriptors that follow the message, when this connection has not
    /// been sent `block_id` before.
    pub fd: Option<u32>,
}

/// One rank of a sharded trainer, as its hello says: `rank` of `world` senders that push
/// every version together, each its own pieces, with each piece's place in its whole (one
/// per tensor of its manifest; None for a tensor it holds whole).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub rank: u32,
    pub world: u32,
    pub placements: Vec<Option<Placement>>,
}

/// What one rank of a sharded trainer holds, as a welcome tells every rank the others'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSource {
    pub source: Manifest,
    pub placements: Vec<Option<Placement>>,
}

/// One problem a receiver's planning found, as it travels in a [`Message::Reject`]: its kind
/// (`weightlift_core::Problem::kind`), the tensors it names, and its message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProblemNote {
    pub kind: String,
    pub tensors: Vec<String>,
    pub message: String,
}

impl ProblemNote {
    /// Every problem of a failed plan.
    pub fn all(error: &weightlift_core::PlanError) -> Vec<ProblemNote> {
        error
            .problems
            .iter()
            .map(|p| ProblemNote {
                kind: p.kind().to_string(),
                tensors: p.names().into_iter().map(str::to_string).collect(),
                message: p.to_string(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The receiver's fresh nonce (hex), and whether it holds a token the sender must prove.
    Challenge {
        nonce: String,
        token: bool,
    },
    /// The sender's answer: its own fresh nonce, and (when either side holds a token) the MAC of
    /// both nonces under the token.
    Proof {
        nonce: String,
        mac: Option<String>,
    },
    /// The receiver accepted the proof; with a token, it proves it holds the token too.
    Authenticated {
        mac: Option<String>,
    },
    Hello {
        source: Manifest,
        rules: RuleSet,
        bucket_bytes: u64,
        transport: TransportKind,
        /// The sender can copy buckets into a GPU receiver's device memory itself (it has the
        /// CUDA driver): a receiver on a GPU then offers [`DeviceSlots`] beside the ring.
        device_writes: bool,
        /// One rank of a sharded trainer: the receiver plans once every rank's hello came.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shard: Option<Shard>,
    },
    Welcome {
        destination: Manifest,
        tp: TpRank,
        plan_hash: String,
        committed: Version,
        /// Tensors whose bytes may not match `committed` (after a failed update).
        dirty: Vec<String>,
        /// Digest of each destination tensor at the committed version; None where unknown
        /// or dirty (so delta mode never skips a tensor whose bytes may be wrong).
        digests: Vec<Option<u64>>,
        ring: Option<RingInfo>,
        /// Device memory the sender may copy buckets into; its descriptors follow (SCM_RIGHTS).
        slots: Option<DeviceSlots>,
        /// A streaming receiver's bucket size: the sender cuts whole-tensor buckets of this
        /// size (not its own) and sends each bucket's digests with it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stream_bucket_bytes: Option<u64>,
        /// To each rank of a sharded trainer: what every rank holds, in rank order, so that
        /// each plans the same (and checks `plan_hash`) and moves its own share of it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        shards: Option<Vec<ShardSource>>,
    },
    /// The sender mapped the ring; the receiver may unlink its name.
    RingMapped,
    /// The sender mapped the ring and the device slots, and sends buckets through the slots:
    /// `BucketReady` then names a device slot.
    SlotsMapped,
    Reject {
        reason: String,
        /// What planning found wrong, when that is why (each problem, typed).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        problems: Vec<ProblemNote>,
    },
    /// Start an update; `skip` lists destination indices the sender leaves unchanged.
    Begin {
        version: Version,
        skip: Vec<u32>,
    },
    /// `stale`: destinations of the skip list the receiver no longer holds at its committed
    /// version (released without a backup, reset, or left by a failed update); they are sent
    /// anyway, and both sides schedule the update without them in the skip list.
    Accepted {
        version: Version,
        stale: Vec<u32>,
    },
    Refused {
        reason: String,
    },
    /// Shared-memory transport: bucket `index` is in ring slot `slot`.
    BucketReady {
        index: u32,
        slot: u32,
        bytes: u64,
        /// To a streaming receiver: the digest of each destination this bucket completes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        digests: Vec<(u32, u64)>,
    },
    SlotFree {
        slot: u32,
    },
    /// Socket transport: a data frame of `bytes` bytes for bucket `index` follows.
    Data {
        index: u32,
        bytes: u64,
        /// As [`Message::BucketReady`]'s.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        digests: Vec<(u32, u64)>,
    },
    /// CUDA IPC: where the source tensors of the update just accepted live. `fds` descriptors
    /// (of the shareable segments new to this connection) follow on the socket (SCM_RIGHTS).
    IpcSources {
        /// The sender's process (CUDA IPC cannot map a process's own memory).
        pid: u32,
        /// UUID of the GPU the sources live on.
        device: String,
        /// None when the same as the last update's on this connection (then no descriptors
        /// follow): torch's expandable segments make ~3,000 pieces for a 60 GB model.
        segments: Option<Vec<IpcSegment>>,
        /// Per source tensor: (segment index, offset from the segment's start); None when
        /// the same as the last update's on this connection (18,867 entries for a MoE model).
        tensors: Option<Vec<(u32, u64)>>,
        fds: u32,
        /// Whether `End` carries the sender's digests of its own memory to compare with; if
        /// not, the receiver's digests of what it wrote are what it records.
        sender_digests: bool,
    },
    /// NCCL: the communicator the update's buckets move on. `id` (an NCCL unique id, hex) asks
    /// the receiver to join a new one as `rank` of `world` (the sender is rank 0, the root of
    /// every broadcast): at a connection's first update, and after one that failed. None
    /// reuses the last one.
    NcclSession {
        id: Option<String>,
        rank: u32,
        world: u32,
    },
    /// CUDA IPC to a streaming receiver: the sender's digests of some destinations, sent as
    /// they are computed (in the order the receiver hands tensors over), so it can hand over
    /// the first bucket before the sender digested the whole model; `End` carries the rest.
    Digests {
        version: Version,
        digests: Vec<(u32, u64)>,
    },
    /// All buckets sent; the sender's digest of every destination tensor it wrote (but those
    /// sent in `Digests` before it). With
    /// `two_phase` (an update of several receivers) the receiver answers `Verified` and waits
    /// for `Commit` or `Abort`; without, it commits as soon as every digest matched.
    End {
        version: Version,
        digests: Vec<(u32, u64)>,
        two_phase: bool,
    },
    /// Two-phase: every tensor of `version` matched; the receiver waits for the sender's decision.
    Verified {
        version: Version,
    },
    /// Two-phase: every receiver verified `version`; commit it.
    Commit {
        version: Version,
    },
    /// The sender gives up on the update in flight (before any byte moved, or, two-phase, after
    /// another receiver refused or failed it).
    Abort {
        reason: String,
    },
    Report {
        report: UpdateReport,
    },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Challenge { .. } => "challenge",
            Message::Proof { .. } => "proof",
            Message::Authenticated { .. } => "authenticated",
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::RingMapped => "ring_mapped",
            Message::SlotsMapped => "slots_mapped",
            Message::Reject { .. } => "reject",
            Message::Begin { .. } => "begin",
            Message::Accepted { .. } => "accepted",
            Message::Refused { .. } => "refused",
            Message::BucketReady { .. } => "bucket_ready",
            Message::SlotFree { .. } => "slot_free",
            Message::Data { .. } => "data",
            Message::NcclSession { .. } => "nccl_session",
            Message::IpcSources { .. } => "ipc_sources",
            Message::Digests { .. } => "digests",
            Message::End { .. } => "end",
            Message::Verified { .. } => "verified",
            Message::Commit { .. } => "commit",
            Message::Abort { .. } => "abort",
            Message::Report { .. } => "report",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed by the peer")]
    Closed,
    #[error("no message from the peer within {0:.1?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a weightlift peer: bad preamble {0:?}")]
    BadPreamble([u8; 8]),
    #[error("peer speaks protocol version {0}, this side speaks {PROTOCOL_VERSION}")]
    VersionSkew(u32),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
}

/// A framed connection.
pub struct Conn {
    stream: Stream,
    peer: String,
}

impl Conn {
    /// Client side: writes the preamble.
    pub fn client(mut stream: Stream) -> Result<Conn, ProtocolError> {
        let mut preamble = [0u8; 8];
        preamble[..4].copy_from_slice(MAGIC);
        preamble[4..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        match stream.write_all(&preamble) {
            // A peer that refused us before reading (at its connection limit) said why first:
            // the next read finds its reason.
            Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {}
            other => other?,
        }
        let peer = stream.peer();
        Ok(Conn { stream, peer })
    }

    /// Server side: checks the preamble, which must arrive before `deadline`.
    pub fn server(mut stream: Stream, deadline: Instant) -> Result<Conn, ProtocolError> {
        let started = Instant::now();
        let mut preamble = [0u8; 8];
        read_exact(&mut stream, &mut preamble, deadline).map_err(|e| waited(e, started))?;
        if &preamble[..4] != MAGIC {
            return Err(ProtocolError::BadPreamble(preamble));
        }
        let version = u32::from_le_bytes(preamble[4..].try_into().expect("4 bytes"));
        if version != PROTOCOL_VERSION {
            return Err(ProtocolError::VersionSkew(version));
        }
        let peer = stream.peer();
        Ok(Conn { stream, peer })
    }

    /// Tells a peer why it is not served (before reading anything from it) and closes.
    pub fn refuse(stream: Stream, reason: String) -> Result<(), ProtocolError> {
        let mut conn = Conn { peer: stream.peer(), stream };
        conn.send(&Message::Reject { reason, problems: Vec::new() })?;
        conn.shutdown();
        Ok(())
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    pub fn send(&mut self, message: &Message) -> Result<(), ProtocolError> {
        let body = serde_json::to_vec(message).expect("messages always serialise");
        self.write_frame(KIND_MESSAGE, &body)
    }

    /// Receives one message within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Result<Message, ProtocolError> {
        self.recv_before(Instant::now() + timeout, MAX_MESSAGE_BYTES)
    }

    /// Receives one message of at most `max` bytes, all of it before `deadline` (a peer that
    /// trickles bytes cannot stretch it). Memory grows with the bytes that arrive, not with the
    /// length the peer announced.
    pub fn recv_before(&mut self, deadline: Instant, max: u32) -> Result<Message, ProtocolError> {
        let started = Instant::now();
        self.recv_body(deadline, max).map_err(|e| waited(e, started))
    }

    fn recv_body(&mut self, deadline: Instant, max: u32) -> Result<Message, ProtocolError> {
        let (kind, len) = self.read_header(deadline, u64::from(max))?;
        if kind != KIND_MESSAGE {
            return Err(ProtocolError::UnknownKind(kind));
        }
        let len = len as usize;
        let mut body = Vec::new();
        while body.len() < len {
            let filled = body.len();
            body.resize(len.min(filled + BODY_STEP_BYTES), 0);
            read_exact(&mut self.stream, &mut body[filled..], deadline)?;
        }
        serde_json::from_slice(&body).map_err(|e| ProtocolError::Malformed(e.to_string()))
    }

    /// Sends raw bucket bytes as one data frame.
    pub fn send_data(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        self.write_frame(KIND_DATA, bytes)
    }

    /// Receives one data frame of exactly `into.len()` bytes into `into`.
    pub fn recv_data(&mut self, into: &mut [u8], timeout: Duration) -> Result<(), ProtocolError> {
        let started = Instant::now();
        let deadline = started + timeout;
        let (kind, len) = self.read_header(deadline, into.len() as u64).map_err(|e| waited(e, started))?;
        if kind != KIND_DATA {
            return Err(ProtocolError::UnknownKind(kind));
        }
        if len != into.len() as u64 {
            return Err(ProtocolError::Malformed(format!("data frame of {len} bytes, expected {}", into.len())));
        }
        read_exact(&mut self.stream, into, deadline).map_err(|e| waited(e, started))
    }

    /// Sends file descriptors right after the last frame (Unix sockets only).
    pub fn send_fds(&mut self, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<(), ProtocolError> {
        match &self.stream {
            Stream::Unix(socket) => Ok(crate::fd_pass::send_fds(socket, fds)?),
            Stream::Tcp(_) if fds.is_empty() => Ok(()),
            Stream::Tcp(_) => Err(ProtocolError::Malformed("file descriptors cannot travel over TCP".into())),
        }
    }

    /// Receives `count` file descriptors sent with [`Conn::send_fds`].
    pub fn recv_fds(&mut self, count: usize, timeout: Duration) -> Result<Vec<std::os::fd::OwnedFd>, ProtocolError> {
        match &self.stream {
            _ if count == 0 => Ok(Vec::new()),
            Stream::Unix(socket) => {
                crate::fd_pass::make_room_for_descriptors(count)?;
                socket.set_read_timeout(Some(timeout))?;
                Ok(crate::fd_pass::recv_fds(socket, count)?)
            }
            Stream::Tcp(_) => Err(ProtocolError::Malformed("file descriptors cannot travel over TCP".into())),
        }
    }

    /// A second handle on this connection's socket, for another thread to stop a reader of
    /// this one ([`Stream::stop_reading`]).
    pub fn try_clone_stream(&self) -> io::Result<Stream> {
        self.stream.try_clone()
    }

    /// Closes both directions, so a peer blocked on this connection wakes at once.
    pub fn shutdown(&self) {
        self.stream.shutdown();
    }

    fn write_frame(&mut self, kind: u8, body: &[u8]) -> Result<(), ProtocolError> {
        let len = u32::try_from(body.len())
            .map_err(|_| ProtocolError::TooLarge { len: body.len() as u64, max: u64::from(u32::MAX) })?;
        let mut header = [0u8; 5];
        header[..4].copy_from_slice(&len.to_le_bytes());
        header[4] = kind;
        write_all_vectored(&mut self.stream, &header, body)?;
        Ok(())
    }

    fn read_header(&mut self, deadline: Instant, max: u64) -> Result<(u8, u64), ProtocolError> {
        let mut header = [0u8; 5];
        read_exact(&mut self.stream, &mut header, deadline)?;
        let len = u64::from(u32::from_le_bytes(header[..4].try_into().expect("4 bytes")));
        if len > max {
            return Err(ProtocolError::TooLarge { len, max });
        }
        Ok((header[4], len))
    }
}

/// Writes a small header and a large body with as few syscalls as possible.
fn write_all_vectored(stream: &mut Stream, header: &[u8], body: &[u8]) -> io::Result<()> {
    let mut written = 0usize;
    let total = header.len() + body.len();
    while written < total {
        let n = if written < header.len() {
            stream.write_vectored(&[io::IoSlice::new(&header[written..]), io::IoSlice::new(body)])?
        } else {
            stream.write(&body[written - header.len()..])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        written += n;
    }
    Ok(())
}

/// A timeout says how long the caller waited in all.
fn waited(error: ProtocolError, started: Instant) -> ProtocolError {
    match error {
        ProtocolError::Timeout(_) => ProtocolError::Timeout(started.elapsed()),
        other => other,
    }
}

/// Fills `buf`, all of it before `deadline`: each read waits only for the time left.
fn read_exact(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> Result<(), ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProtocolError::Timeout(Duration::ZERO));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(ProtocolError::Closed),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Err(ProtocolError::Closed),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Conn, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Conn { stream: Stream::Unix(a), peer: "test".into() }, Stream::Unix(b))
    }

    const T: Duration = Duration::from_secs(2);

    #[test]
    fn messages_and_data_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut client = Conn::client(Stream::Unix(a)).unwrap();
        let server_thread = std::thread::spawn(move || {
            let mut server = Conn::server(Stream::Unix(b), Instant::now() + T).unwrap();
            let m = server.recv(T).unwrap();
            let mut data = vec![0u8; 5];
            server.recv_data(&mut data, T).unwrap();
            (m, data)
        });
        let msg = Message::Begin { version: Version(3), skip: vec![1, 2] };
        client.send(&msg).unwrap();
        client.send_data(b"hello").unwrap();
        let (got, data) = server_thread.join().unwrap();
        assert_eq!(got, msg);
        assert_eq!(data, b"hello");
    }

    #[test]
    fn ipc_sources_with_pieces_and_omitted_segments_round_trip() {
        let piece = |offset, fd| IpcPiece { offset, bytes: 20 << 20, block_id: 7 + offset, fd };
        let pieces = vec![piece(0, Some(0)), piece(20 << 20, None)];
        for segments in [Some(vec![IpcSegment::Pieces { base: 1 << 34, bytes: 40 << 20, pieces }]), None] {
            let msg = Message::IpcSources {
                pid: 1,
                device: "00".into(),
                segments,
                tensors: None,
                fds: 1,
                sender_digests: false,
            };
            let (a, b) = UnixStream::pair().unwrap();
            let mut client = Conn::client(Stream::Unix(a)).unwrap();
            let server =
                std::thread::spawn(move || Conn::server(Stream::Unix(b), Instant::now() + T).unwrap().recv(T).unwrap());
            client.send(&msg).unwrap();
            assert_eq!(server.join().unwrap(), msg);
        }
    }

    #[test]
    fn garbage_preambles_and_versions_are_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = Stream::Unix(a);
        raw.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        assert!(matches!(Conn::server(Stream::Unix(b), Instant::now() + T), Err(ProtocolError::BadPreamble(_))));
        let (a, b) = UnixStream::pair().unwrap();
        let mut raw = Stream::Unix(a);
        let next = PROTOCOL_VERSION + 1;
        raw.write_all(&[b"WLFT".as_slice(), &next.to_le_bytes()].concat()).unwrap();
        let skew = Conn::server(Stream::Unix(b), Instant::now() + T);
        assert!(matches!(skew, Err(ProtocolError::VersionSkew(v)) if v == next), "{:?}", skew.err());
    }

    #[test]
    fn oversized_and_malformed_frames_are_errors_without_allocation() {
        let (mut conn, mut raw) = pair();
        raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).unwrap();
        assert!(matches!(conn.recv(T), Err(ProtocolError::TooLarge { .. })));

        let (mut conn, mut raw) = pair();
        let body = b"{\"type\": \"nonsense\"}";
        raw.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
        raw.write_all(&[1]).unwrap();
        raw.write_all(body).unwrap();
        assert!(matches!(conn.recv(T), Err(ProtocolError::Malformed(_))));

        let (mut conn, mut raw) = pair();
        raw.write_all(&[3, 0, 0, 0, 7, 1, 2, 3]).unwrap();
        assert!(matches!(conn.recv(T), Err(ProtocolError::UnknownKind(7))));

        // A data frame longer than the buffer the receiver expects is refused before reading it.
        let (mut conn, mut raw) = pair();
        raw.write_all(&[9, 0, 0, 0, 2]).unwrap();
        let mut small = [0u8; 4];
        assert!(matches!(conn.recv_data(&mut small, T), Err(ProtocolError::TooLarge { len: 9, max: 4 })));
    }

    #[test]
    fn a_trickling_peer_cannot_stretch_the_deadline() {
        let (mut conn, mut raw) = pair();
        let writer = std::thread::spawn(move || {
            let _ = raw.write_all(&[100, 0, 0, 0, 1]);
            // One byte every 50 ms: each read sees data well within any per-read timeout.
            for _ in 0..40 {
                if raw.write_all(b" ").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let started = Instant::now();
        let err = conn.recv_before(started + Duration::from_millis(300), MAX_MESSAGE_BYTES).unwrap_err();
        assert!(matches!(err, ProtocolError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_millis(600), "{:?}", started.elapsed());
        drop(conn);
        writer.join().unwrap();
    }

    #[test]
    fn silence_times_out_and_hangups_are_closed() {
        let (mut conn, raw) = pair();
        let t = Duration::from_millis(50);
        assert!(matches!(conn.recv(t), Err(ProtocolError::Timeout(_))));
        drop(raw);
        assert!(matches!(conn.recv(t), Err(ProtocolError::Closed)));
    }
}
