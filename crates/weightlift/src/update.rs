//! The work of one update that both sides do the same way: which buckets, in which order,
//! and moving bytes in cache-sized pieces while digesting them.

use weightlift_core::digest::{self, Digester};
use weightlift_core::{buckets, exec, pieces, Bucket, BucketError, CopyOp, Plan};

use crate::tensors::{DestinationTensors, SourceTensors};

/// Bytes moved per step: small enough that a piece is still in cache when it is digested.
const PIECE_BYTES: u64 = 1 << 20;

/// The buckets of one update (the plan less the skipped destinations) and what they write.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub buckets: Vec<Bucket>,
    /// Destinations this update writes.
    pub written: Vec<bool>,
    /// Destinations written front to back, whose digest streams with the bytes.
    pub sequential: Vec<bool>,
    pub bytes: u64,
}

impl Schedule {
    pub fn new(plan: &Plan, skip: &[u32], bucket_bytes: u64) -> Result<Schedule, BucketError> {
        let mut written = vec![true; plan.destinations.len()];
        for &d in skip {
            written[d as usize] = false;
        }
        let mut kept = plan.clone();
        kept.ops.retain(|op| written[op.dst as usize]);
        let buckets = buckets(&kept, bucket_bytes)?;
        let bytes = buckets.iter().map(|b| b.bytes).sum();
        Ok(Schedule { buckets, written, sequential: plan.sequential_destinations(), bytes })
    }

    pub fn digesters(&self) -> Vec<Digester> {
        vec![Digester::new(); self.written.len()]
    }
}

/// The pieces of a bucket with their payload ranges, in payload order.
fn bucket_pieces<'a>(
    plan: &'a Plan,
    bucket: &'a Bucket,
) -> impl Iterator<Item = (CopyOp, std::ops::Range<usize>)> + 'a {
    bucket.entries.iter().flat_map(move |entry| {
        let mut at = entry.payload_offset;
        pieces(plan, &entry.op, PIECE_BYTES).into_iter().map(move |piece| {
            let len = plan.op_bytes(&piece);
            let range = at as usize..(at + len) as usize;
            at += len;
            (piece, range)
        })
    })
}

/// Sender: packs `bucket` into `payload` (cast to the destination dtypes), digesting what it
/// means the receiver to hold.
pub fn pack(
    plan: &Plan,
    schedule: &Schedule,
    bucket: &Bucket,
    sources: &dyn SourceTensors,
    payload: &mut [u8],
    digesters: &mut [Digester],
) {
    for (piece, range) in bucket_pieces(plan, bucket) {
        let out = &mut payload[range];
        exec::pack(plan, &piece, sources.bytes(piece.src as usize), out).expect("plans match their sources' sizes");
        if schedule.sequential[piece.dst as usize] {
            digesters[piece.dst as usize].update(out);
        }
    }
}

/// Receiver: writes `bucket` from `payload` into the destinations in place, digesting the
/// bytes it now holds (read back from the destination, not taken from the payload).
pub fn unpack(
    plan: &Plan,
    schedule: &Schedule,
    bucket: &Bucket,
    payload: &[u8],
    destinations: &mut dyn DestinationTensors,
    digesters: &mut [Digester],
) {
    for (piece, range) in bucket_pieces(plan, bucket) {
        let d = piece.dst as usize;
        let dst = destinations.bytes_mut(d);
        exec::unpack(plan, &piece, &payload[range], dst).expect("plans match their destinations' sizes");
        if schedule.sequential[d] {
            let elt = plan.destinations[d].dtype.size() as usize;
            let run = plan.strided(&piece)[0];
            let start = run.dst_offset as usize * elt;
            digesters[d].update(&dst[start..start + run.numel() as usize * elt]);
        }
    }
}

/// The digest each written destination should have, as the sender computes it: streamed
/// while packing where possible, otherwise by assembling the tensor once.
pub fn sender_digests(
    plan: &Plan,
    schedule: &Schedule,
    sources: &dyn SourceTensors,
    digesters: &[Digester],
) -> Vec<(u32, u64)> {
    (0..plan.destinations.len())
        .filter(|&d| schedule.written[d])
        .map(|d| {
            let value =
                if schedule.sequential[d] { digesters[d].finish() } else { assemble_digest(plan, sources, d as u32) };
            (d as u32, value)
        })
        .collect()
}

/// Every destination's digest as the sources would make it, without sending anything
/// (delta mode compares these with the receiver's).
pub fn expected_digests(plan: &Plan, sources: &dyn SourceTensors) -> Vec<u64> {
    let sequential = plan.sequential_destinations();
    let mut digesters = vec![Digester::new(); plan.destinations.len()];
    let mut scratch = Vec::new();
    for op in &plan.ops {
        if !sequential[op.dst as usize] {
            continue;
        }
        for piece in pieces(plan, op, PIECE_BYTES) {
            scratch.resize(plan.op_bytes(&piece) as usize, 0);
            exec::pack(plan, &piece, sources.bytes(piece.src as usize), &mut scratch).expect("sizes match");
            digesters[piece.dst as usize].update(&scratch);
        }
    }
    (0..plan.destinations.len())
        .map(|d| if sequential[d] { digesters[d].finish() } else { assemble_digest(plan, sources, d as u32) })
        .collect()
}

fn assemble_digest(plan: &Plan, sources: &dyn SourceTensors, dst: u32) -> u64 {
    let mut tensor = vec![0u8; plan.destinations[dst as usize].byte_len() as usize];
    for op in plan.ops.iter().filter(|op| op.dst == dst) {
        exec::copy(plan, op, sources.bytes(op.src as usize), &mut tensor).expect("sizes match");
    }
    digest::digest(&tensor)
}

/// The receiver's digest of each written destination after the last bucket.
pub fn receiver_digests(
    schedule: &Schedule,
    destinations: &dyn DestinationTensors,
    digesters: &[Digester],
) -> Vec<Option<u64>> {
    (0..schedule.written.len())
        .map(|d| {
            schedule.written[d].then(|| {
                if schedule.sequential[d] {
                    digesters[d].finish()
                } else {
                    digest::digest(destinations.bytes(d))
                }
            })
        })
        .collect()
}
