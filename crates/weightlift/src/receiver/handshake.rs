//! A connection's setup, up to the receiver's welcome: authenticates the sender, checks its
//! hello (bucket size, transport, rules) and plans its source onto the destination, opens the
//! receive path (socket, shared-memory ring, or none for CUDA IPC) and, for tensors on a GPU,
//! the device staging with any device slots it offers, then waits for the sender to map them.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use weightlift_core::{plan, Plan, RuleSet, SourceSet};

use crate::net::Stream;
use crate::protocol::{
    Conn, Message, ProblemNote, ProtocolError, Shard, ShardSource, TransportKind, MAX_HANDSHAKE_BYTES,
    MAX_MESSAGE_BYTES,
};
use crate::session;
use crate::staged::{Buffers, Staging};
use crate::transport::{LocalRing, RecvPath};
use crate::update::Schedule;

use super::connection::ConnectionError;
use super::nccl::{check_available, NcclBuckets, NcclRefusal};
use super::transfer::{HostBuckets, IpcPull, Transfer};
use super::{Expect, Receiver, Store};

/// A connection past its handshake: what its updates need.
pub(super) struct Established {
    pub(super) conn: Conn,
    pub(super) plan: Plan,
    /// How this connection's updates move their bytes, chosen by its transport.
    pub(super) transfer: Box<dyn Transfer>,
}

/// A sender's hello, as the handshake read it.
pub(super) struct Hello {
    pub(super) source: weightlift_core::Manifest,
    pub(super) rules: RuleSet,
    pub(super) bucket_bytes: u64,
    pub(super) transport: TransportKind,
    pub(super) device_writes: bool,
    pub(super) shard: Option<Shard>,
}

/// A connection past its hello, with the deadline of its handshake.
pub(super) struct Greeted {
    pub(super) conn: Conn,
    pub(super) hello: Hello,
    pub(super) deadline: Instant,
}

/// What a sender is told at welcome beyond what the receiver says of itself: the hash of the
/// plan both sides must agree on and, for a rank of a sharded trainer, every rank's pieces.
pub(super) struct Agreed {
    pub(super) plan_hash: String,
    pub(super) shards: Option<Vec<ShardSource>>,
}

/// Refuses a sender with `reason` (and what planning found), which the sender is told.
pub(super) fn refuse_with(conn: &mut Conn, reason: String, problems: Vec<ProblemNote>) -> ConnectionError {
    let _ = conn.send(&Message::Reject { reason: reason.clone(), problems });
    ConnectionError::Refused(reason)
}

pub(super) fn refuse(conn: &mut Conn, reason: String) -> ConnectionError {
    refuse_with(conn, reason, Vec::new())
}

impl Receiver {
    /// The rest of the handshake of a connection that greeted as one sender (not a rank of
    /// a sharded trainer): plans its source onto this receiver's tensors and establishes it,
    /// within the deadline its greeting started; refuses the sender, with the reason, when
    /// this receiver cannot take its updates.
    pub(super) fn handshake(
        &self,
        greeted: Greeted,
        local_ring: Option<Arc<LocalRing>>,
    ) -> Result<Established, ConnectionError> {
        let Greeted { mut conn, hello, deadline } = greeted;
        let options = &self.shared.options;
        let plan = match plan(&SourceSet::single(hello.source.clone()), &self.shared.manifest, &hello.rules, options.tp)
        {
            Ok(plan) => plan,
            Err(e) => return Err(refuse_with(&mut conn, e.to_string(), ProblemNote::all(&e))),
        };
        if let Err(e) = self.quantizes(&plan) {
            return Err(refuse(&mut conn, e.to_string()));
        }
        let agreed = Agreed { plan_hash: plan.hash_hex(), shards: None };
        self.establish(conn, &hello, plan, agreed, local_ring, deadline)
    }

    /// Authenticates a new connection and reads its hello, checking what needs no plan (bucket
    /// size, transport, rules), all under the handshake's one deadline: a peer that trickles
    /// bytes cannot hold a connection open longer.
    pub(super) fn greet(&self, stream: Stream, expect: Option<Expect>) -> Result<Greeted, ConnectionError> {
        let options = &self.shared.options;
        let deadline = Instant::now() + options.handshake_timeout;
        let mut conn = Conn::server(stream, deadline)?;
        session::authenticate_sender(&mut conn, options.token.as_ref(), deadline)?;
        let hello = match conn.recv_before(deadline, MAX_MESSAGE_BYTES)? {
            Message::Hello { source, rules, bucket_bytes, transport, device_writes, shard } => {
                Hello { source, rules, bucket_bytes, transport, device_writes, shard }
            }
            other => {
                return Err(ProtocolError::Unexpected { expected: "hello", got: other.name().into() }.into());
            }
        };
        let (bucket_bytes, transport) = (hello.bucket_bytes, hello.transport);
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
            if !expected.same_layout(&hello.rules) {
                return Err(refuse(
                    &mut conn,
                    format!("this receiver's layout follows {name}, and the sender offered other rules"),
                ));
            }
        }
        Ok(Greeted { conn, hello, deadline })
    }

    /// The rest of a handshake once the plan is made (`plan`: what this connection moves, all
    /// of it or one rank's share): opens the receive path, the device staging and any slots,
    /// welcomes the sender and waits for it to map them.
    pub(super) fn establish(
        &self,
        mut conn: Conn,
        hello: &Hello,
        plan: Plan,
        agreed: Agreed,
        local_ring: Option<Arc<LocalRing>>,
        deadline: Instant,
    ) -> Result<Established, ConnectionError> {
        let options = &self.shared.options;
        let (bucket_bytes, transport, device_writes) = (hello.bucket_bytes, hello.transport, hello.device_writes);
        let stream = self.shared.stream.as_ref().map(|s| &s.plan);
        // A streaming receiver's buckets are its own: the layout of its ring.
        if let Some(stream) = stream {
            if !stream.streams(&plan) {
                return Err(refuse(&mut conn, "the sender's tensors are not the ones this receiver streams".into()));
            }
        }
        let bucket_bytes = stream.map_or(bucket_bytes, |s| s.layout.bucket_bytes);
        // The schedule of an update that skips nothing: built once for this connection.
        let full = match stream {
            Some(_) => Schedule::whole(&plan, bucket_bytes),
            None => Schedule::new(&plan, &[], bucket_bytes),
        };
        let full = full.expect("bucket size was validated above");
        // Only tensors on a GPU can take cuda-ipc: the IPC transfer holds them.
        let ipc = match transport {
            TransportKind::CudaIpc => match IpcPull::new(self, hello.source.clone()) {
                Ok(ipc) => Some(ipc),
                Err(e) => return Err(refuse(&mut conn, e.to_string())),
            },
            _ => None,
        };
        if transport == TransportKind::Nccl {
            let refusal = match &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
                Store::Host(_) => Some(NcclRefusal::HostTensors),
                Store::Device { .. } if stream.is_some() => Some(NcclRefusal::Streaming),
                Store::Device { .. } => check_available().err(),
            };
            if let Some(refusal) = refusal {
                return Err(refuse(&mut conn, refusal.to_string()));
            }
        }
        let (mut path, ring) = match transport {
            // Nothing travels through the connection but control messages.
            TransportKind::CudaIpc | TransportKind::Nccl => (RecvPath::socket(0), None),
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
                // Not to a streaming receiver, which verifies each bucket as it lands and so
                // takes each bucket's digests with it.
                let slots = device_writes
                    && stream.is_none()
                    && matches!(transport, TransportKind::Shm | TransportKind::InProcess);
                let buffers = match (transport, slots) {
                    (TransportKind::Nccl, _) => Buffers::Pair,
                    (_, true) => Buffers::Slots,
                    (_, false) => Buffers::One,
                };
                let staged = Staging::new(gpu.clone(), &plan, &full, tensors.device_ptrs(), bucket_bytes, buffers)
                    .and_then(|mut staging| {
                        if let Some(stream) = stream {
                            staging.digest_per_bucket(&plan, &stream.layout.complete_after)?;
                        }
                        Ok(staging)
                    });
                match staged {
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
            plan_hash: agreed.plan_hash,
            committed,
            dirty,
            digests,
            ring,
            slots: slots.clone(),
            stream_bucket_bytes: stream.map(|s| s.layout.bucket_bytes),
            shards: agreed.shards,
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
        let gpu = match &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
            Store::Device { gpu, .. } => Some(gpu.clone()),
            Store::Host(_) => None,
        };
        let transfer: Box<dyn Transfer> = match (ipc, transport, staging, gpu) {
            (Some(ipc), _, _, _) => Box::new(ipc),
            (None, TransportKind::Nccl, Some(staging), Some(gpu)) => {
                Box::new(NcclBuckets { gpu, staging, full, comm: None })
            }
            (None, _, staging, _) => Box::new(HostBuckets { staging, path, full, bucket_bytes }),
        };
        Ok(Established { conn, plan, transfer })
    }
}
