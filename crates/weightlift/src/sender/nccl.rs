//! GPU tensors over NCCL, to one receiver or to a fan-out class of receivers that take the
//! same bytes (engine replicas, the same rank of replicas at one TP size; see
//! `nccl_buckets::fan_out_classes`): one communicator with this trainer at rank 0 and the
//! class's receivers at ranks 1..=k, every bucket packed once on the trainer's GPU and
//! broadcast once, the digests taken once there and sent to each receiver to compare with.
//! The communicator is held by the class's first sender and kept through updates that went
//! through on every receiver of the class; after any other, the next update names a new one.

use std::sync::Arc;
use std::time::Instant;

use weightlift_core::Version;
use weightlift_cuda::{Comm, Gpu, UniqueId};

use crate::cuda_ipc::DeviceTensors;
use crate::nccl_buckets::SenderBuckets;
use crate::protocol::Message;
use crate::report::UpdateOutcome;

use super::{Fault, SendError, Sender, Vote};

/// A class's side of the NCCL path: the communicator (of `world` ranks) and the packing bound
/// to the tensors, kept from update to update.
pub(super) struct NcclSend {
    comm: Comm,
    world: u32,
    buckets: Option<SenderBuckets>,
}

impl NcclSend {
    pub(super) fn device_bytes(&self) -> u64 {
        self.buckets.as_ref().map_or(0, SenderBuckets::device_bytes)
    }
}

impl Sender {
    /// Transfers `version` of the GPU tensors to every receiver of `class` (they take the same
    /// bytes: one broadcast per bucket feeds them all) and returns each one's vote, in order.
    pub(crate) fn transfer_nccl(
        class: &mut [&mut Sender],
        version: Version,
        gpu: &Gpu,
        tensors: &dyn DeviceTensors,
        two_phase: bool,
    ) -> Vec<Result<Vote, SendError>> {
        let votes: Vec<Result<Vote, SendError>> = match send_class(class, gpu, tensors) {
            Ok(digests) => class.iter_mut().map(|s| s.finish(version, Ok(digests.clone()), two_phase)).collect(),
            Err(errors) => class.iter_mut().zip(errors).map(|(s, e)| s.finish(version, Err(e), two_phase)).collect(),
        };
        let through = votes.iter().all(|vote| match vote {
            Ok(Vote::Verified) => true,
            Ok(Vote::Settled(report)) => report.outcome == UpdateOutcome::Committed,
            Err(_) => false,
        });
        if !through {
            class[0].nccl = None;
        }
        votes
    }
}

/// Names the communicator to every receiver of `class` (a new one at the first update and
/// after one that did not go through), packs and broadcasts every bucket, and digests the
/// tensors for the receivers to compare with. A failure calls the update off with every
/// receiver; the error, one per receiver.
fn send_class(
    class: &mut [&mut Sender],
    gpu: &Gpu,
    tensors: &dyn DeviceTensors,
) -> Result<Vec<(u32, u64)>, Vec<SendError>> {
    let world = class.len() as u32 + 1;
    let call_off = |class: &mut [&mut Sender], error: SendError| -> Vec<SendError> {
        let error = Arc::new(error);
        class.iter_mut().map(|s| s.call_off(SendError::Class(error.clone()))).collect()
    };
    let timeout = class[0].options.timeout;
    let ptrs = tensors.device_ptrs();
    if class[0].nccl.as_ref().is_some_and(|n| n.world != world) {
        class[0].nccl = None;
    }
    let join = match &class[0].nccl {
        Some(_) => None,
        None => match UniqueId::new() {
            Ok(id) => Some(id),
            Err(source) => {
                return Err(call_off(class, SendError::Nccl { doing: "naming a communicator".into(), source }))
            }
        },
    };
    let id = join.as_ref().map(UniqueId::to_hex);
    for (rank, s) in (1..).zip(class.iter_mut()) {
        if let Err(e) = s.conn.send(&Message::NcclSession { id: id.clone(), rank, world }) {
            return Err(call_off(class, e.into()));
        }
    }
    if let Some(id) = join {
        match Comm::init(gpu, &id, 0, world, timeout) {
            Ok(comm) => class[0].nccl = Some(NcclSend { comm, world, buckets: None }),
            Err(source) => {
                return Err(call_off(class, SendError::Nccl { doing: "making the communicator".into(), source }))
            }
        }
    }
    let leader = &mut *class[0];
    let (plan, schedule, bucket_bytes) = (&leader.plan, &leader.schedule, leader.options.bucket_bytes);
    let side = leader.nccl.as_mut().expect("joined above");
    let bound = match side.buckets.take() {
        Some(buckets) if buckets.reads(&ptrs) => Ok(buckets),
        _ => SenderBuckets::new(gpu, plan, schedule, &ptrs, bucket_bytes),
    };
    let fault = leader.options.fault;
    let conn = &leader.conn;
    let sent = bound.map_err(|source| SendError::Cuda { doing: "packing buckets".into(), source }).and_then(|b| {
        let steps = b.steps(0);
        // A fault strikes once the buckets before it went (run to the end on the GPU).
        // Without one, the buckets run in one pass (no wait on the GPU in between).
        let cut = match fault {
            Some(Fault::HangUpAfterBuckets(n) | Fault::AbortAfterBuckets(n) | Fault::StallAfterBuckets(n)) => {
                Some((n as usize).min(steps.len()))
            }
            _ => None,
        };
        let deadline = Instant::now() + timeout;
        let mut run = |steps: &[_]| {
            let ran = side.comm.run_buckets(gpu, steps, deadline);
            ran.map_err(|source| SendError::Nccl { doing: "sending buckets".into(), source })
        };
        let moved = match cut {
            None => run(&steps),
            Some(cut) => run(&steps[..cut])
                .and_then(|()| super::inject(fault, cut as u32, conn))
                .and_then(|()| run(&steps[cut..])),
        };
        drop(steps);
        side.buckets = Some(b);
        moved
    });
    if let Err(e) = sent {
        leader.nccl = None;
        return Err(call_off(class, e));
    }
    let digests = match leader.exporter.expected_digests(gpu, &leader.plan, &ptrs) {
        Ok(digests) => digests,
        Err(source) => return Err(call_off(class, SendError::Cuda { doing: "digesting its tensors".into(), source })),
    };
    let flipped = match leader.options.fault {
        Some(Fault::FlipByteInBucket(k)) => leader.schedule.completes.iter().skip(k as usize).flatten().next().copied(),
        _ => None,
    };
    Ok((0..digests.len() as u32)
        .zip(digests)
        .map(|(d, value)| (d, if Some(d) == flipped { value ^ 1 } else { value }))
        .collect())
}
