//! GPU tensors sent over a host transport (a socket to another host, or the ring): each
//! bucket is filled by copying the tensors' bytes down from the GPU into the (page-locked)
//! payload, straight where packing would copy them unchanged, through a host copy of the
//! tensor where it would not (a cast, a block strided in its source). The sender's digests
//! are taken on the GPU, where the tensors live.

use weightlift_core::{exec, Plan};
use weightlift_cuda::{CudaError, Gpu};

use crate::update::{bucket_pieces_of, Schedule};

/// The last source tensor copied to the host whole (consecutive buckets mostly continue one).
#[derive(Default)]
pub struct Downloads {
    tensor: Option<(u32, Vec<u8>)>,
}

/// Fills bucket `k`'s payload from GPU tensors at `ptrs` (device addresses, in source order,
/// each holding its source's bytes).
pub fn fill_from_device(
    plan: &Plan,
    schedule: &Schedule,
    k: usize,
    gpu: &Gpu,
    ptrs: &[u64],
    payload: &mut [u8],
    downloads: &mut Downloads,
) -> Result<(), CudaError> {
    // The pieces' places in the payload (side by side, in order), those copied straight from
    // one source merged where they continue each other on both sides.
    enum Place {
        Straight(u64),
        Packed(weightlift_core::CopyOp),
    }
    let mut places: Vec<(std::ops::Range<usize>, Place)> = Vec::new();
    for (op, range, verbatim) in bucket_pieces_of(schedule, k) {
        match verbatim {
            Some(src) => {
                let ptr = ptrs[op.src as usize] + src.start as u64;
                if let Some((last, Place::Straight(start))) = places.last_mut() {
                    if last.end == range.start && *start + last.len() as u64 == ptr {
                        last.end = range.end;
                        continue;
                    }
                }
                places.push((range, Place::Straight(ptr)));
            }
            None => places.push((range, Place::Packed(op.clone()))),
        }
    }
    let mut straight: Vec<(u64, &mut [u8])> = Vec::new();
    let mut packed = Vec::new();
    let mut rest: &mut [u8] = &mut *payload;
    let mut at = 0;
    for (range, place) in places {
        let (_, from_start) = std::mem::take(&mut rest).split_at_mut(range.start - at);
        let (mine, tail) = from_start.split_at_mut(range.len());
        rest = tail;
        at = range.end;
        match place {
            Place::Straight(ptr) => straight.push((ptr, mine)),
            Place::Packed(op) => packed.push((op, mine)),
        }
    }
    gpu.download_regions(&mut straight)?;
    for (op, out) in packed {
        let whole = match &downloads.tensor {
            Some((src, bytes)) if *src == op.src => bytes,
            _ => {
                let len = plan.sources[op.src as usize].spec.byte_len() as usize;
                let mut bytes = vec![0u8; len];
                gpu.download_regions(&mut [(ptrs[op.src as usize], &mut bytes[..])])?;
                &downloads.tensor.insert((op.src, bytes)).1
            }
        };
        exec::pack(plan, &op, whole, out).map_err(|e| CudaError::Invalid(e.to_string()))?;
    }
    Ok(())
}
