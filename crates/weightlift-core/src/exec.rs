//! Executing plans on host buffers: direct copies, and packing into / unpacking from a
//! bucket's payload. The reference semantics every other executor (GPU kernels) must match.

use crate::dtype::{convert, Cast};
use crate::plan::{CopyOp, Plan};
use crate::region::{strided_copies, Strided};

/// A buffer whose size does not match the tensor it stands for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("buffer for `{tensor}` holds {actual} bytes but {expected} are needed")]
pub struct SizeError {
    pub tensor: String,
    pub expected: u64,
    pub actual: u64,
}

fn check(tensor: &str, expected: u64, actual: usize) -> Result<(), SizeError> {
    if expected == actual as u64 {
        Ok(())
    } else {
        Err(SizeError { tensor: tensor.to_string(), expected, actual: actual as u64 })
    }
}

fn run(copies: &[Strided], cast: Cast, src: &[u8], dst: &mut [u8]) {
    let (es, ed) = (cast.from.size(), cast.to.size());
    for c in copies {
        for r in 0..c.rows {
            let s = ((c.src_offset + r * c.src_stride) * es) as usize;
            let d = ((c.dst_offset + r * c.dst_stride) * ed) as usize;
            convert(cast, &src[s..], &mut dst[d..], c.row_elems as usize);
        }
    }
}

fn identity_cast(plan: &Plan, op: &CopyOp) -> Cast {
    let d = plan.destinations[op.dst as usize].dtype;
    plan.cast(op).unwrap_or(Cast { from: d, to: d })
}

/// Copies `op` from its source piece's bytes straight into its destination's bytes.
pub fn copy(plan: &Plan, op: &CopyOp, src: &[u8], dst: &mut [u8]) -> Result<(), SizeError> {
    let (s, d) = (&plan.sources[op.src as usize].spec, &plan.destinations[op.dst as usize]);
    check(&s.name, s.byte_len(), src.len())?;
    check(&d.name, d.byte_len(), dst.len())?;
    run(&plan.strided(op), identity_cast(plan, op), src, dst);
    Ok(())
}

/// Writes `op`'s block, cast to the destination dtype, row-major into `payload`.
pub fn pack(plan: &Plan, op: &CopyOp, src: &[u8], payload: &mut [u8]) -> Result<(), SizeError> {
    let s = &plan.sources[op.src as usize].spec;
    check(&s.name, s.byte_len(), src.len())?;
    check(&format!("payload of {}", s.name), plan.op_bytes(op), payload.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&s.shape, &op.src_start, &op.extent, &zeros, &op.extent);
    run(&copies, identity_cast(plan, op), src, payload);
    Ok(())
}

/// The bytes of its source that [`pack`] writes unchanged for `op`, when they are one
/// contiguous range (no cast, a block contiguous in the source): a copy engine can then move
/// them to the payload's place straight from the source, with no packing on the host.
pub fn verbatim_source(plan: &Plan, op: &CopyOp) -> Option<std::ops::Range<usize>> {
    if plan.cast(op).is_some() {
        return None;
    }
    let s = &plan.sources[op.src as usize].spec;
    let zeros = vec![0; op.extent.len()];
    match strided_copies(&s.shape, &op.src_start, &op.extent, &zeros, &op.extent).as_slice() {
        [one] if one.is_contiguous() => {
            let elt = s.dtype.size();
            let start = (one.src_offset * elt) as usize;
            Some(start..start + (one.numel() * elt) as usize)
        }
        _ => None,
    }
}

/// Writes a packed block from `payload` into `op`'s place in the destination's bytes.
pub fn unpack(plan: &Plan, op: &CopyOp, payload: &[u8], dst: &mut [u8]) -> Result<(), SizeError> {
    let d = &plan.destinations[op.dst as usize];
    check(&format!("payload of {}", d.name), plan.op_bytes(op), payload.len())?;
    check(&d.name, d.byte_len(), dst.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&op.extent, &zeros, &d.shape, &op.dst_start, &op.extent);
    run(&copies, Cast { from: d.dtype, to: d.dtype }, payload, dst);
    Ok(())
}

/// Reads `op`'s block back from its destination `dst` into `out` (packed, in the destination
/// dtype): what [`unpack`] wrote, for digesting a sender's part of a destination where it
/// lies.
pub fn gather(plan: &Plan, op: &CopyOp, dst: &[u8], out: &mut [u8]) -> Result<(), SizeError> {
    let d = &plan.destinations[op.dst as usize];
    check(&d.name, d.byte_len(), dst.len())?;
    check(&format!("block of {}", d.name), plan.op_bytes(op), out.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&d.shape, &op.dst_start, &op.extent, &zeros, &op.extent);
    run(&copies, Cast { from: d.dtype, to: d.dtype }, dst, out);
    Ok(())
}

/// Runs every op of `plan`: `sources[i]` are the bytes of `plan.sources[i]`,
/// `destinations[j]` those of `plan.destinations[j]`.
pub fn execute(plan: &Plan, sources: &[&[u8]], destinations: &mut [Vec<u8>]) -> Result<(), SizeError> {
    for op in &plan.ops {
        copy(plan, op, sources[op.src as usize], &mut destinations[op.dst as usize])?;
    }
    Ok(())
}
