//! The NCCL transfer: a receiver's buckets arrive from the trainer's GPU by NCCL broadcast into
//! two device buffers and are scattered into its tensors there (see `nccl_buckets`); the
//! connection carries the session (`NcclSession`), the begin, the end and the vote. The
//! communicator is made at the connection's first update and kept while updates succeed; one
//! that failed (a peer died, a deadline passed) is aborted, and the sender names a new one at
//! the next update.

use std::sync::Arc;
use std::time::Instant;

use weightlift_core::{Plan, Version};
use weightlift_cuda::{nccl_available, Comm, Gpu, NcclError, UniqueId};

use crate::nccl_buckets::receiver_steps;
use crate::protocol::{Conn, Message};
use crate::report::UpdateReport;
use crate::staged::Staging;
use crate::update::Schedule;

use super::settle::Outcome;
use super::transfer::{end_of_update, Transfer};
use super::Receiver;

/// Why a receiver cannot take updates over NCCL; said in its refusal at hello.
#[derive(Debug, thiserror::Error)]
pub(super) enum NcclRefusal {
    #[error("this receiver's tensors are in host memory: nccl moves GPU tensors")]
    HostTensors,
    #[error("a streaming receiver takes its buckets over CUDA IPC or a host transport, not nccl (yet)")]
    Streaming,
    #[error("transport nccl: {0}")]
    Unavailable(#[from] NcclError),
}

/// Checks that this process can take NCCL updates at all.
pub(super) fn check_available() -> Result<(), NcclRefusal> {
    nccl_available()?;
    Ok(())
}

/// One connection's NCCL path: the staging (two device buffers) and the communicator.
pub(super) struct NcclBuckets {
    pub(super) gpu: Arc<Gpu>,
    pub(super) staging: Staging,
    pub(super) full: Schedule,
    pub(super) comm: Option<Comm>,
}

/// What the sender's `NcclSession` (or whatever came instead) asks of a receiver holding
/// `comm`: join a new communicator (`join`: the id, rank and world), keep the one it has, or
/// stop. None to go on with the update in `comm`; an outcome to end it with; an error to break
/// it off with (the sender is out of step).
fn session<C>(
    comm: &mut Option<C>,
    message: Message,
    join: impl FnOnce(&UniqueId, u32, u32) -> Result<C, String>,
) -> Result<Option<Outcome>, String> {
    match message {
        Message::NcclSession { id: Some(id), rank, world } => {
            // A new communicator replaces the last, which is aborted first.
            *comm = None;
            let id = UniqueId::from_hex(&id).ok_or("the sender's NCCL unique id is not 128 bytes of hex")?;
            if rank == 0 || rank >= world {
                return Err(format!("the sender asks this receiver to be NCCL rank {rank} of {world}"));
            }
            *comm = Some(join(&id, rank, world)?);
            Ok(None)
        }
        Message::NcclSession { id: None, .. } if comm.is_some() => Ok(None),
        Message::NcclSession { id: None, .. } => {
            Err("the sender reuses an NCCL communicator this receiver does not hold".into())
        }
        Message::Abort { reason } => Ok(Some(Outcome::called_off(reason))),
        other => Err(format!("expected nccl_session, got {}", other.name())),
    }
}

impl Transfer for NcclBuckets {
    /// Takes one update over NCCL: joins (or keeps) the communicator, receives every bucket into
    /// the staging buffers and scatters it, digests the tensors where they live and compares
    /// with the sender's digests.
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
        let store = receiver.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        let mut report = UpdateReport {
            bytes: self.full.bytes,
            tensors: plan.destinations.len(),
            buckets: self.full.buckets.len(),
            sender_digests: true,
            device_extra_bytes: self.staging.device_bytes(),
            ..UpdateReport::default()
        };
        let outcome = (|| -> Result<Outcome, String> {
            let message = conn.recv(timeout).map_err(|e| format!("waiting for the NCCL session: {e}"))?;
            let gpu = &self.gpu;
            let join = |id: &UniqueId, rank, world| {
                Comm::init(gpu, id, rank, world, timeout)
                    .map_err(|e| format!("joining the sender's NCCL communicator as rank {rank} of {world}: {e}"))
            };
            if let Some(outcome) = session(&mut self.comm, message, join)? {
                return Ok(outcome);
            }
            let update =
                self.staging.update(plan, &self.full, false).map_err(|e| format!("preparing the update: {e}"))?;
            let steps = receiver_steps(&update, &self.full, 0).map_err(|e| format!("preparing the update: {e}"))?;
            touched.fill(true);
            let started = Instant::now();
            let comm = self.comm.as_mut().expect("joined above");
            report.nccl_ranks = comm.world();
            if let Err(e) = comm.run_buckets(&self.gpu, &steps, started + timeout) {
                // Aborted: a communicator that failed is not used again.
                self.comm = None;
                return Err(format!("receiving buckets over NCCL: {e}"));
            }
            let ours = update.digests().map_err(|e| format!("digesting the update: {e}"))?;
            report.unpack_seconds = started.elapsed().as_secs_f64();
            let _ = receiver.state().versions.verify(version);
            end_of_update(conn, timeout, plan, version, touched, ours, true)
        })()
        .unwrap_or_else(Outcome::Broken);
        drop(store);
        (outcome, report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> String {
        "ab".repeat(128)
    }

    fn ask(id: Option<String>, rank: u32, world: u32) -> Message {
        Message::NcclSession { id, rank, world }
    }

    /// The session messages of the control plane, with no NCCL: a new id replaces the
    /// communicator, none keeps it, and anything out of step is an error that says what was
    /// wrong (the update then breaks off, and the sender names a new one next time).
    #[test]
    fn a_receiver_joins_keeps_or_refuses_a_communicator_as_the_sender_asks() {
        let mut comm: Option<u32> = None;
        let joined = |_: &UniqueId, rank: u32, world: u32| Ok(rank * 100 + world);
        assert!(session(&mut comm, ask(Some(id()), 1, 2), joined).unwrap().is_none());
        assert_eq!(comm, Some(102));
        assert!(session(&mut comm, ask(None, 1, 2), joined).unwrap().is_none());
        assert_eq!(comm, Some(102), "kept");

        let failed = |_: &UniqueId, _: u32, _: u32| Err::<u32, _>("init timed out".to_string());
        assert_eq!(session(&mut comm, ask(Some(id()), 1, 2), failed).unwrap_err(), "init timed out");
        assert_eq!(comm, None, "the old communicator is gone once a new one was asked for");
        let err = session(&mut comm, ask(None, 1, 2), joined).unwrap_err();
        assert!(err.contains("does not hold"), "{err}");

        let err = session(&mut comm, ask(Some("00".into()), 1, 2), joined).unwrap_err();
        assert!(err.contains("hex"), "{err}");
        for (rank, world) in [(0, 2), (2, 2)] {
            let err = session(&mut comm, ask(Some(id()), rank, world), joined).unwrap_err();
            assert!(err.contains(&format!("rank {rank} of {world}")), "{err}");
        }
        let called_off = session(&mut comm, Message::Abort { reason: "trainer gone".into() }, joined).unwrap();
        assert!(matches!(called_off, Some(Outcome::Aborted(ref r)) if r.contains("trainer gone")), "{called_off:?}");
        let err = session(&mut comm, Message::SlotFree { slot: 0 }, joined).unwrap_err();
        assert!(err.contains("expected nccl_session, got slot_free"), "{err}");
    }
}
