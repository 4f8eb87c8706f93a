//! A connection's setup, up to the receiver's welcome: authenticates the sender, checks its
//! hello (bucket size, transport, rules) and plans its source onto the destination, opens the
//! receive path (socket, shared-memory ring, or none for CUDA IPC) and, for tensors on a GPU,
//! the device staging with any device slots it offers, then waits for the sender to map them.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use weightlift_core::{plan, Plan, SourceSet};

use crate::net::Stream;
use crate::protocol::{
    Conn, Message, ProblemNote, ProtocolError, TransportKind, MAX_HANDSHAKE_BYTES, MAX_MESSAGE_BYTES,
};
use crate::session;
use crate::staged::Staging;
use crate::transport::{LocalRing, RecvPath};
use crate::update::Schedule;

use super::connection::ConnectionError;
use super::transfer::{HostBuckets, IpcPull, Transfer};
use super::{Expect, Receiver, Store};

/// A connection past its handshake: what its updates need.
pub(super) struct Established {
    pub(super) conn: Conn,
    pub(super) plan: Plan,
    /// How this connection's updates move their bytes, chosen by its transport.
    pub(super) transfer: Box<dyn Transfer>,
}

impl Receiver {
    /// Runs the handshake of a new connection, authentication to welcome (and the sender's
    /// mapping of the ring or device slots), under one deadline; refuses the sender, with the
    /// reason, when this receiver cannot take its updates.
    pub(super) fn handshake(
        &self,
        stream: Stream,
        local_ring: Option<Arc<LocalRing>>,
        expect: Option<Expect>,
    ) -> Result<Established, ConnectionError> {
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
        let refuse_with = |conn: &mut Conn, reason: String, problems: Vec<ProblemNote>| {
            let _ = conn.send(&Message::Reject { reason: reason.clone(), problems });
            ConnectionError::Refused(reason)
        };
        let refuse = |conn: &mut Conn, reason: String| refuse_with(conn, reason, Vec::new());
        let stream = self.shared.stream.as_ref().map(|s| &s.plan);
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
            Err(e) => return Err(refuse_with(&mut conn, e.to_string(), ProblemNote::all(&e))),
        };
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
            TransportKind::CudaIpc => match IpcPull::new(self, source) {
                Ok(ipc) => Some(ipc),
                Err(e) => return Err(refuse(&mut conn, e.to_string())),
            },
            _ => None,
        };
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
                // Not to a streaming receiver, which verifies each bucket as it lands and so
                // takes each bucket's digests with it.
                let slots = device_writes
                    && stream.is_none()
                    && matches!(transport, TransportKind::Shm | TransportKind::InProcess);
                let staged = Staging::new(gpu.clone(), &plan, &full, tensors.device_ptrs(), bucket_bytes, slots)
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
            plan_hash: plan.hash_hex(),
            committed,
            dirty,
            digests,
            ring,
            slots: slots.clone(),
            stream_bucket_bytes: stream.map(|s| s.layout.bucket_bytes),
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
        let transfer: Box<dyn Transfer> = match ipc {
            Some(ipc) => Box::new(ipc),
            None => Box::new(HostBuckets { staging, path, full, bucket_bytes }),
        };
        Ok(Established { conn, plan, transfer })
    }
}
