//! Buckets: a plan's operations grouped into bounded transfers. A bucket's payload is the
//! concatenation of its entries' blocks, each in the destination dtype and row-major order;
//! an operation larger than the room left is split, so large tensors span buckets.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::plan::{CopyOp, Plan};

pub const DEFAULT_BUCKET_BYTES: u64 = 256 << 20;

/// An operation (or a piece of one) and where its bytes sit in the bucket's payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketEntry {
    pub op: CopyOp,
    pub payload_offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    pub entries: Vec<BucketEntry>,
    /// Payload bytes; at most the bucket size.
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BucketError {
    #[error("bucket size of {0} bytes cannot hold one element of every dtype (needs at least 8)")]
    TooSmall(u64),
}

/// Groups `plan`'s operations, in order, into buckets of at most `max_bytes` payload bytes.
/// Buckets are filled as far as whole elements allow before the next one starts.
pub fn buckets(plan: &Plan, max_bytes: u64) -> Result<Vec<Bucket>, BucketError> {
    if max_bytes < 8 {
        return Err(BucketError::TooSmall(max_bytes));
    }
    let mut done = Vec::new();
    let mut current = Bucket::default();
    for op in &plan.ops {
        let elt = plan.destinations[op.dst as usize].dtype.size();
        let lead = op.extent.len() - op.src_start.len();
        let mut queue = VecDeque::from([op.clone()]);
        while let Some(piece) = queue.pop_front() {
            match split_front(&piece, max_bytes - current.bytes, elt, lead) {
                (Some(head), rest) => {
                    let bytes = head.numel() * elt;
                    current.entries.push(BucketEntry { op: head, payload_offset: current.bytes });
                    current.bytes += bytes;
                    for r in rest.into_iter().rev() {
                        queue.push_front(r);
                    }
                }
                // Not one more element fits: the bucket is full, start the next.
                (None, _) if !current.entries.is_empty() => {
                    done.push(std::mem::take(&mut current));
                    queue.push_front(piece);
                }
                (None, _) => return Err(BucketError::TooSmall(max_bytes)),
            }
        }
    }
    if !current.entries.is_empty() {
        done.push(current);
    }
    Ok(done)
}

/// Splits off the front of `op` that fits in `budget` bytes (None if not one element does),
/// returning it and the rest as ops in row-major order.
fn split_front(op: &CopyOp, budget: u64, elt: u64, lead: usize) -> (Option<CopyOp>, Vec<CopyOp>) {
    if op.numel() * elt <= budget {
        return (Some(op.clone()), Vec::new());
    }
    let Some(d) = op.extent.iter().position(|&e| e > 1) else {
        return (None, vec![op.clone()]);
    };
    let slice_bytes = op.extent[d + 1..].iter().product::<u64>() * elt;
    let take = budget / slice_bytes;
    let (head, tail) = cut(op, d, take.max(1), lead);
    if take >= 1 {
        return (Some(head), vec![tail]);
    }
    // Not even one slice along `d` fits: split that slice along the next dimension.
    let (inner_head, mut inner_rest) = split_front(&head, budget, elt, lead);
    inner_rest.push(tail);
    (inner_head, inner_rest)
}

/// The first `n` indices of `op` along dim `d`, and the rest.
fn cut(op: &CopyOp, d: usize, n: u64, lead: usize) -> (CopyOp, CopyOp) {
    let mut head = op.clone();
    head.extent[d] = n;
    let mut tail = op.clone();
    tail.extent[d] -= n;
    tail.dst_start[d] += n;
    if d >= lead {
        tail.src_start[d - lead] += n;
    }
    (head, tail)
}
