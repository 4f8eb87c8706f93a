//! Executing plans on host buffers: direct copies, and packing into / unpacking from a
//! bucket's payload. The reference semantics every other executor (GPU kernels) must match.
//!
//! A quantized op (into an FP8 weight of [`Plan::scaled`]) travels in its source's dtype and
//! is quantized where it is written: [`copy_quantized`] and [`unpack_quantized`] write its
//! e4m3 bytes and the scales of its blocks, with [`quant::quantize`].

use crate::dtype::{convert, Cast, DType};
use crate::plan::{CopyOp, Plan};
use crate::quant;
use crate::region::{strided_copies, Strided};

/// Why an op cannot be executed on the buffers given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecError {
    #[error("buffer for `{tensor}` holds {actual} bytes but {expected} are needed")]
    Size { tensor: String, expected: u64, actual: u64 },
    /// A copy into a quantized weight needs its scale tensor too ([`copy_quantized`],
    /// [`unpack_quantized`]); the plain copy would leave its scales stale.
    #[error("`{weight}` is quantized to FP8: its ops write its scales `{scale}` too")]
    Quantized { weight: String, scale: String },
    /// [`copy_quantized`] or [`unpack_quantized`] of an op into a weight that is not quantized.
    #[error("`{tensor}` is not a quantized weight of the plan")]
    NotQuantized { tensor: String },
}

fn check(tensor: &str, expected: u64, actual: usize) -> Result<(), ExecError> {
    if expected == actual as u64 {
        Ok(())
    } else {
        Err(ExecError::Size { tensor: tensor.to_string(), expected, actual: actual as u64 })
    }
}

fn refuse_quantized(plan: &Plan, op: &CopyOp) -> Result<(), ExecError> {
    match plan.scaled_of(op.dst) {
        Some(s) => Err(ExecError::Quantized {
            weight: plan.destinations[s.weight as usize].name.clone(),
            scale: plan.destinations[s.scale as usize].name.clone(),
        }),
        None => Ok(()),
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

/// From the source's dtype to the op's payload dtype (the destination's, or for a quantized
/// op the source's own).
fn payload_cast(plan: &Plan, op: &CopyOp) -> Cast {
    Cast { from: plan.sources[op.src as usize].spec.dtype, to: plan.payload_dtype(op) }
}

/// Copies `op` from its source piece's bytes straight into its destination's bytes.
pub fn copy(plan: &Plan, op: &CopyOp, src: &[u8], dst: &mut [u8]) -> Result<(), ExecError> {
    refuse_quantized(plan, op)?;
    let (s, d) = (&plan.sources[op.src as usize].spec, &plan.destinations[op.dst as usize]);
    check(&s.name, s.byte_len(), src.len())?;
    check(&d.name, d.byte_len(), dst.len())?;
    run(&plan.strided(op), payload_cast(plan, op), src, dst);
    Ok(())
}

/// Copies a quantized op from its source piece's bytes: its block's e4m3 bytes into `weight`
/// and its blocks' scales into `scale` (the weight's scale tensor).
pub fn copy_quantized(
    plan: &Plan,
    op: &CopyOp,
    src: &[u8],
    weight: &mut [u8],
    scale: &mut [u8],
) -> Result<(), ExecError> {
    let mut block = vec![0u8; plan.op_bytes(op) as usize];
    pack(plan, op, src, &mut block)?;
    unpack_quantized(plan, op, &block, weight, scale)
}

/// Writes `op`'s block, cast to the destination dtype (a quantized op's in its source's
/// dtype), row-major into `payload`.
pub fn pack(plan: &Plan, op: &CopyOp, src: &[u8], payload: &mut [u8]) -> Result<(), ExecError> {
    let s = &plan.sources[op.src as usize].spec;
    check(&s.name, s.byte_len(), src.len())?;
    check(&format!("payload of {}", s.name), plan.op_bytes(op), payload.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&s.shape, &op.src_start, &op.extent, &zeros, &op.extent);
    run(&copies, payload_cast(plan, op), src, payload);
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
pub fn unpack(plan: &Plan, op: &CopyOp, payload: &[u8], dst: &mut [u8]) -> Result<(), ExecError> {
    refuse_quantized(plan, op)?;
    let d = &plan.destinations[op.dst as usize];
    check(&format!("payload of {}", d.name), plan.op_bytes(op), payload.len())?;
    check(&d.name, d.byte_len(), dst.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&op.extent, &zeros, &d.shape, &op.dst_start, &op.extent);
    run(&copies, Cast { from: d.dtype, to: d.dtype }, payload, dst);
    Ok(())
}

/// Quantizes a packed block of a quantized op (from `payload`, in its source's dtype) into
/// `op`'s place in `weight` (e4m3), and its blocks' scales into theirs in `scale`. The plan
/// proved the op writes whole blocks, so the scales are of its bytes alone.
pub fn unpack_quantized(
    plan: &Plan,
    op: &CopyOp,
    payload: &[u8],
    weight: &mut [u8],
    scale: &mut [u8],
) -> Result<(), ExecError> {
    let block = quantize_block(plan, op, payload)?;
    place_quantized(plan, op, &block, weight, scale)
}

/// A quantized op's block as the engine will hold it: e4m3 bytes (row-major over the op's
/// extent) and the scales of its blocks (row-major over their grid). Made apart from the
/// tensors, so blocks can be quantized on several threads and placed after.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedBlock {
    pub e4m3: Vec<u8>,
    pub scales: Vec<f32>,
}

/// Quantizes a packed block of a quantized op (from `payload`, in its source's dtype).
pub fn quantize_block(plan: &Plan, op: &CopyOp, payload: &[u8]) -> Result<QuantizedBlock, ExecError> {
    let d = &plan.destinations[op.dst as usize];
    let s = *plan.scaled_of(op.dst).ok_or_else(|| ExecError::NotQuantized { tensor: d.name.clone() })?;
    check(&format!("payload of {}", d.name), plan.op_bytes(op), payload.len())?;
    let numel = op.numel() as usize;
    let x = floats(plan.payload_dtype(op), payload);
    let grid = quant::scale_shape(&op.extent, s.block);
    let mut block =
        QuantizedBlock { e4m3: vec![0u8; numel], scales: vec![0f32; grid.iter().product::<u64>() as usize] };
    quant::quantize(&x, &op.extent, s.block, &mut block.e4m3, &mut block.scales);
    Ok(block)
}

/// Little-endian floats of `dtype` (F32, BF16 or F16, as plans quantize) widened to f32,
/// exactly (every bf16 and f16 is an f32), in one monomorphic loop per dtype.
fn floats(dtype: DType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; bytes.len() / dtype.size() as usize];
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        other => unreachable!("plans quantize only from F32, BF16 or F16, not {other}"),
    }
    out
}

/// Writes a [`quantize_block`] result into `op`'s place in `weight` and its scales' places in
/// `scale`.
pub fn place_quantized(
    plan: &Plan,
    op: &CopyOp,
    block: &QuantizedBlock,
    weight: &mut [u8],
    scale: &mut [u8],
) -> Result<(), ExecError> {
    let d = &plan.destinations[op.dst as usize];
    let s = *plan.scaled_of(op.dst).ok_or_else(|| ExecError::NotQuantized { tensor: d.name.clone() })?;
    let scale_spec = &plan.destinations[s.scale as usize];
    let grid = quant::scale_shape(&op.extent, s.block);
    check(&format!("block of {}", d.name), op.numel(), block.e4m3.len())?;
    check(&format!("scales of {}", d.name), grid.iter().product::<u64>() * 4, block.scales.len() * 4)?;
    check(&d.name, d.byte_len(), weight.len())?;
    check(&scale_spec.name, scale_spec.byte_len(), scale.len())?;
    let n = op.extent.len();
    let zeros = vec![0; n];
    let e4m3 = Cast { from: DType::F8E4M3, to: DType::F8E4M3 };
    run(&strided_copies(&op.extent, &zeros, &d.shape, &op.dst_start, &op.extent), e4m3, &block.e4m3, weight);
    let mut at = op.dst_start[..n - 2].to_vec();
    at.extend([op.dst_start[n - 2] / s.block[0], op.dst_start[n - 1] / s.block[1]]);
    let bytes: Vec<u8> = block.scales.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f32s = Cast { from: DType::F32, to: DType::F32 };
    run(&strided_copies(&grid, &zeros, &scale_spec.shape, &at, &grid), f32s, &bytes, scale);
    Ok(())
}

/// Reads `op`'s block back from its destination `dst` into `out` (packed, in the destination
/// dtype): what [`unpack`] wrote, for digesting a sender's part of a destination where it
/// lies.
pub fn gather(plan: &Plan, op: &CopyOp, dst: &[u8], out: &mut [u8]) -> Result<(), ExecError> {
    let d = &plan.destinations[op.dst as usize];
    check(&d.name, d.byte_len(), dst.len())?;
    check(&format!("block of {}", d.name), op.numel() * d.dtype.size(), out.len())?;
    let zeros = vec![0; op.extent.len()];
    let copies = strided_copies(&d.shape, &op.dst_start, &op.extent, &zeros, &op.extent);
    run(&copies, Cast { from: d.dtype, to: d.dtype }, dst, out);
    Ok(())
}

/// Runs every op of `plan`: `sources[i]` are the bytes of `plan.sources[i]`,
/// `destinations[j]` those of `plan.destinations[j]` (a quantized weight's ops write its
/// scale tensor too).
pub fn execute(plan: &Plan, sources: &[&[u8]], destinations: &mut [Vec<u8>]) -> Result<(), ExecError> {
    for op in &plan.ops {
        let src = sources[op.src as usize];
        match plan.scaled_of(op.dst) {
            Some(s) => {
                let (weight, scale) = two_mut(destinations, s.weight as usize, s.scale as usize);
                copy_quantized(plan, op, src, weight, scale)?;
            }
            None => copy(plan, op, src, &mut destinations[op.dst as usize])?,
        }
    }
    Ok(())
}

/// Two distinct buffers of `all` at once.
pub fn two_mut<T: AsMut<[u8]>>(all: &mut [T], a: usize, b: usize) -> (&mut [u8], &mut [u8]) {
    assert_ne!(a, b, "a weight is never its own scale tensor (plans verify it)");
    if a < b {
        let (lo, hi) = all.split_at_mut(b);
        (lo[a].as_mut(), hi[0].as_mut())
    } else {
        let (lo, hi) = all.split_at_mut(a);
        (hi[0].as_mut(), lo[b].as_mut())
    }
}
