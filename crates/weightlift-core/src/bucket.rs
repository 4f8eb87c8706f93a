//! Buckets: a plan's operations grouped into bounded transfers. A bucket's payload is the
//! concatenation of its entries' blocks, each in the payload dtype ([`Plan::payload_dtype`])
//! and row-major order; an operation larger than the room left is split, so large tensors
//! span buckets. A quantized op is split only between its quantization blocks, so each piece
//! is quantized on its own with the same scales as the whole.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::digest::CHUNK_BYTES;
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
    #[error("bucket size of {max} bytes cannot hold one quantization block of `{tensor}` ({bytes} bytes)")]
    BlockTooLarge { tensor: String, bytes: u64, max: u64 },
}

/// The split rules of an op: bytes per element as it travels, and for a quantized op its
/// block (pieces hold whole blocks).
#[derive(Clone, Copy)]
struct Grain {
    elt: u64,
    lead: usize,
    block: Option<[u64; 2]>,
}

impl Grain {
    fn of(plan: &Plan, op: &CopyOp) -> Grain {
        Grain {
            elt: plan.payload_dtype(op).size(),
            lead: op.extent.len() - op.src_start.len(),
            block: plan.scaled_of(op.dst).map(|s| s.block),
        }
    }

    /// Indices along dim `d` of an `n`-dim op that a cut keeps together.
    fn granule(&self, d: usize, n: usize) -> u64 {
        match self.block {
            Some(b) if d + 2 == n => b[0],
            Some(b) if d + 1 == n => b[1],
            _ => 1,
        }
    }

    /// Bytes of the smallest piece of `op`: one element, or one block of a quantized op.
    fn least(&self, op: &CopyOp) -> u64 {
        let n = op.extent.len();
        match self.block {
            Some(b) => b[0].min(op.extent[n - 2]) * b[1].min(op.extent[n - 1]) * self.elt,
            None => self.elt,
        }
    }
}

/// Groups `plan`'s operations, in order, into buckets of at most `max_bytes` payload bytes.
/// Buckets are filled as far as whole elements allow before the next one starts.
pub fn buckets(plan: &Plan, max_bytes: u64) -> Result<Vec<Bucket>, BucketError> {
    let mut filler = Filler::new(plan, max_bytes)?;
    for op in &plan.ops {
        filler.push(op)?;
    }
    Ok(filler.finish())
}

/// Groups `plan`'s operations into buckets of at most `max_bytes` payload bytes so that every
/// destination tensor arrives whole in one bucket, or, when larger than a bucket, alone in a
/// run of consecutive buckets that hold nothing else: a receiver that hands each tensor over
/// as soon as its bucket is in (the streaming receiver) never waits on a later bucket for part
/// of a tensor that fits one. Destinations come in their own order (the engine's), each one's
/// operations in plan order, side by side: which bucket holds which tensor depends only on the
/// destinations, never on how the sources are named, ordered or cut.
pub fn whole_tensor_buckets(plan: &Plan, max_bytes: u64) -> Result<Vec<Bucket>, BucketError> {
    let mut filler = Filler::new(plan, max_bytes)?;
    let mut ops_of: Vec<Vec<&CopyOp>> = vec![Vec::new(); plan.destinations.len()];
    for op in &plan.ops {
        ops_of[op.dst as usize].push(op);
    }
    for d in (0..ops_of.len()).filter(|&d| !ops_of[d].is_empty()) {
        let bytes: u64 = ops_of[d].iter().map(|op| plan.op_bytes(op)).sum();
        let oversized = bytes > max_bytes;
        if oversized || filler.current.bytes + bytes > max_bytes {
            filler.close();
        }
        for op in &ops_of[d] {
            filler.push(op)?;
        }
        if oversized {
            filler.close();
        }
    }
    Ok(filler.finish())
}

/// Fills buckets in order, splitting an operation where the room left ends.
struct Filler<'a> {
    plan: &'a Plan,
    max_bytes: u64,
    done: Vec<Bucket>,
    current: Bucket,
}

impl<'a> Filler<'a> {
    fn new(plan: &'a Plan, max_bytes: u64) -> Result<Filler<'a>, BucketError> {
        if max_bytes < 8 {
            return Err(BucketError::TooSmall(max_bytes));
        }
        Ok(Filler { plan, max_bytes, done: Vec::new(), current: Bucket::default() })
    }

    /// Adds `op` to the current bucket, the rest of it to the next ones when it does not fit.
    fn push(&mut self, op: &CopyOp) -> Result<(), BucketError> {
        let grain = Grain::of(self.plan, op);
        let mut queue = VecDeque::from([op.clone()]);
        while let Some(piece) = queue.pop_front() {
            match split_front(&piece, self.max_bytes - self.current.bytes, grain, 0) {
                (Some(head), rest) => {
                    let bytes = head.numel() * grain.elt;
                    self.current.entries.push(BucketEntry { op: head, payload_offset: self.current.bytes });
                    self.current.bytes += bytes;
                    for r in rest.into_iter().rev() {
                        queue.push_front(r);
                    }
                }
                // Not one more element fits: the bucket is full, start the next.
                (None, _) if !self.current.entries.is_empty() => {
                    self.close();
                    queue.push_front(piece);
                }
                (None, _) if grain.block.is_some() => {
                    return Err(BucketError::BlockTooLarge {
                        tensor: self.plan.destinations[op.dst as usize].name.clone(),
                        bytes: grain.least(&piece),
                        max: self.max_bytes,
                    })
                }
                (None, _) => return Err(BucketError::TooSmall(self.max_bytes)),
            }
        }
        Ok(())
    }

    /// Ends the current bucket (if it holds anything).
    fn close(&mut self) {
        if !self.current.entries.is_empty() {
            self.done.push(std::mem::take(&mut self.current));
        }
    }

    fn finish(mut self) -> Vec<Bucket> {
        self.close();
        self.done
    }
}

/// `op` cut, in row-major order, into pieces of at most `max_bytes` destination bytes (or one
/// element, if larger): executors move a piece while its bytes are hot in cache.
pub fn pieces(plan: &Plan, op: &CopyOp, max_bytes: u64) -> Vec<CopyOp> {
    let grain = Grain::of(plan, op);
    let mut out = Vec::new();
    let mut rest = vec![op.clone()];
    while let Some(piece) = rest.pop() {
        match split_front(&piece, max_bytes.max(grain.least(&piece)), grain, 0) {
            (Some(head), tail) => {
                out.push(head);
                rest.extend(tail.into_iter().rev());
            }
            (None, _) => unreachable!("a budget of at least one element (or block) always fits one"),
        }
    }
    out
}

/// Splits off the front of `op` that fits in `budget` bytes (None if not one element, or one
/// block of a quantized op, does), cutting along dims `from..` only, returning it and the
/// rest as ops in row-major order.
fn split_front(op: &CopyOp, budget: u64, grain: Grain, from: usize) -> (Option<CopyOp>, Vec<CopyOp>) {
    let elt = grain.elt;
    if op.numel() * elt <= budget {
        return (Some(op.clone()), Vec::new());
    }
    let n = op.extent.len();
    let Some(d) = (from..n).find(|&d| op.extent[d] > 1) else {
        return (None, vec![op.clone()]);
    };
    let granule = grain.granule(d, n);
    // A cut along `d` keeps every index of the other dims (those before `d` are 1, but for
    // a quantized op's row blocks).
    let slice_bytes = op.numel() / op.extent[d] * elt;
    let take = budget / (slice_bytes * granule) * granule;
    let take = if granule == 1 {
        // Whole digest chunks where the budget allows (a multiple of `align` slices ends on a
        // chunk boundary): a piece that ends mid-chunk leaves a fragment for the digest to
        // reassemble, and a MoE model's down projections (1536-byte rows) had one at every
        // piece.
        let align = CHUNK_BYTES as u64 / gcd(slice_bytes, CHUNK_BYTES as u64);
        if take >= align {
            take - take % align
        } else {
            take
        }
    } else {
        take
    };
    if take >= 1 {
        let (head, tail) = cut(op, d, take, grain.lead);
        return (Some(head), vec![tail]);
    }
    if d + 1 == n {
        return (None, vec![op.clone()]);
    }
    // Not even one slice (or block row) along `d` fits: split it along the next dimensions.
    let (head, tail) = cut(op, d, granule.min(op.extent[d]), grain.lead);
    let (inner_head, mut inner_rest) = split_front(&head, budget, grain, d + 1);
    if op.extent[d] > granule {
        inner_rest.push(tail);
    }
    (inner_head, inner_rest)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::layout::{Split, TpRank};
    use crate::plan::{destination_manifest, plan, SourceSet};
    use crate::rules::{Rule, RuleSet};
    use crate::spec::{Manifest, TensorSpec};
    use crate::synthetic;
    use proptest::prelude::*;

    fn single_tensor_plan(shape: &[u64], split: Split, tp: TpRank) -> Plan {
        let source = SourceSet::single(Manifest::new(vec![TensorSpec::new("w", DType::F32, shape.to_vec())]).unwrap());
        let rules = RuleSet::new(vec![Rule::rename("w", "w", split).unwrap()]).unwrap();
        let dest = destination_manifest(&source, &rules, tp, Some(DType::BF16), false).unwrap();
        plan(&source, &dest, &rules, tp).unwrap()
    }

    /// The bucket entries, taken as a plan of their own, must cover every destination exactly
    /// once again: splitting neither loses nor duplicates a byte.
    fn assert_entries_tile_the_plan(plan: &Plan, max_bytes: u64) -> Vec<Bucket> {
        let buckets = buckets(plan, max_bytes).unwrap();
        assert_tiles(plan, &buckets, max_bytes);
        buckets
    }

    /// `buckets` cover every destination of `plan` exactly once, each within `max_bytes`, its
    /// entries side by side in its payload.
    fn assert_tiles(plan: &Plan, buckets: &[Bucket], max_bytes: u64) {
        let mut rebuilt = plan.clone();
        rebuilt.ops = buckets.iter().flat_map(|b| b.entries.iter().map(|e| e.op.clone())).collect();
        rebuilt.verify().unwrap();
        for b in buckets {
            assert!(b.bytes <= max_bytes && !b.entries.is_empty());
            let mut offset = 0;
            for e in &b.entries {
                assert_eq!(e.payload_offset, offset);
                offset += plan.op_bytes(&e.op);
            }
            assert_eq!(offset, b.bytes);
        }
        let total: u64 = buckets.iter().map(|b| b.bytes).sum();
        assert_eq!(total, plan.summary().bytes_to_send);
    }

    #[test]
    fn a_tensor_larger_than_a_bucket_spans_several_full_buckets() {
        // 10 x 6 f32 into bf16: 120 payload bytes; buckets of 50 bytes hold 25 elements.
        let plan = single_tensor_plan(&[10, 6], Split::Replicated, TpRank::SINGLE);
        let buckets = assert_entries_tile_the_plan(&plan, 50);
        let sizes: Vec<u64> = buckets.iter().map(|b| b.bytes).collect();
        assert_eq!(sizes, vec![50, 50, 20]);
        // The first bucket: 4 whole rows, then the first element of row 4.
        assert_eq!(buckets[0].entries[0].op.extent, vec![4, 6]);
        assert_eq!(buckets[0].entries[1].op.extent, vec![1, 1]);
    }

    #[test]
    fn strided_row_parallel_ops_split_by_rows() {
        let plan = single_tensor_plan(&[8, 16], Split::rows(), TpRank::new(1, 2).unwrap());
        let buckets = assert_entries_tile_the_plan(&plan, 32);
        assert_eq!(buckets.len(), 4);
        assert!(buckets.iter().all(|b| b.entries.len() == 1 && b.entries[0].op.extent == vec![2, 8]));
    }

    #[test]
    fn buckets_smaller_than_an_element_are_refused() {
        let plan = single_tensor_plan(&[4], Split::Replicated, TpRank::SINGLE);
        assert_eq!(buckets(&plan, 7), Err(BucketError::TooSmall(7)));
    }

    #[test]
    fn the_default_bucket_size_groups_a_real_model() {
        let config = synthetic("qwen3-8b").unwrap();
        let source = SourceSet::single(config.source_manifest());
        let rules = config.preset.rules(crate::PresetOptions { head_dim: Some(128), expert_parallel: false }).unwrap();
        let dest = destination_manifest(&source, &rules, TpRank::SINGLE, None, false).unwrap();
        let plan = plan(&source, &dest, &rules, TpRank::SINGLE).unwrap();
        let buckets = assert_entries_tile_the_plan(&plan, DEFAULT_BUCKET_BYTES);
        assert_eq!(buckets.len() as u64, plan.summary().bytes_to_send.div_ceil(DEFAULT_BUCKET_BYTES));
    }

    #[test]
    fn pieces_cover_an_op_in_order() {
        let plan = single_tensor_plan(&[10, 6], Split::rows(), TpRank::new(1, 2).unwrap());
        let op = &plan.ops[0];
        let parts = pieces(&plan, op, 10);
        // [10, 3] bf16 rows are 6 bytes: one row per piece, in order.
        assert_eq!(parts.len(), 10);
        assert!(parts.iter().enumerate().all(|(i, p)| p.dst_start == vec![i as u64, 0] && p.extent == vec![1, 3]));
        let mut rebuilt = plan.clone();
        rebuilt.ops = parts;
        rebuilt.verify().unwrap();
    }

    #[test]
    fn pieces_end_on_digest_chunks_where_the_budget_allows() {
        // A MoE down projection: rows of 768 bf16 (1536 bytes) cut into 1 MiB pieces. 682 rows
        // would fit, but 680 end on a 4096-byte chunk.
        let plan = single_tensor_plan(&[2048, 768], Split::Replicated, TpRank::SINGLE);
        let parts = pieces(&plan, &plan.ops[0], 1 << 20);
        assert_eq!(parts[0].extent, vec![680, 768]);
        for p in &parts {
            assert_eq!(p.dst_start[0] * 1536 % CHUNK_BYTES as u64, 0, "{p:?}");
        }
        let mut rebuilt = plan.clone();
        rebuilt.ops = parts;
        rebuilt.verify().unwrap();
    }

    /// Checks the whole-tensor buckets of `plan`: they tile it as buckets do, every
    /// destination that fits a bucket lies in exactly one, and a larger one alone in a run of
    /// consecutive buckets.
    fn assert_whole_tensors(plan: &Plan, max_bytes: u64) -> Vec<Bucket> {
        let buckets = whole_tensor_buckets(plan, max_bytes).unwrap();
        assert_tiles(plan, &buckets, max_bytes);
        for (d, spec) in plan.destinations.iter().enumerate() {
            let holding: Vec<usize> =
                (0..buckets.len()).filter(|&k| buckets[k].entries.iter().any(|e| e.op.dst as usize == d)).collect();
            if spec.byte_len() == 0 {
                continue;
            }
            if spec.byte_len() <= max_bytes {
                assert_eq!(holding.len(), 1, "`{}` ({} bytes) is in buckets {holding:?}", spec.name, spec.byte_len());
            } else {
                assert!(holding.windows(2).all(|w| w[1] == w[0] + 1), "`{}` in {holding:?}", spec.name);
                for &k in &holding {
                    assert!(
                        buckets[k].entries.iter().all(|e| e.op.dst as usize == d),
                        "`{}` shares bucket {k}",
                        spec.name
                    );
                }
            }
        }
        buckets
    }

    #[test]
    fn whole_tensor_buckets_keep_each_tensor_together() {
        // Qwen3-tiny at TP 2, fused qkv / gate_up (several ops per destination).
        let config = synthetic("qwen3-tiny").unwrap();
        let source = SourceSet::single(config.source_manifest());
        let tp = TpRank::new(1, 2).unwrap();
        let rules = config.preset.rules(crate::PresetOptions { head_dim: None, expert_parallel: false }).unwrap();
        let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
        let plan = plan(&source, &dest, &rules, tp).unwrap();
        let largest = plan.destinations.iter().map(TensorSpec::byte_len).max().unwrap();
        for max in [largest / 3, largest, largest * 2, 1 << 20] {
            let buckets = assert_whole_tensors(&plan, max.max(8));
            assert!(buckets.len() >= buckets_fitting(&plan, max.max(8)));
        }
    }

    /// Fewest buckets any split could use: bytes over the bucket size.
    fn buckets_fitting(plan: &Plan, max: u64) -> usize {
        plan.summary().bytes_to_send.div_ceil(max) as usize
    }

    #[test]
    fn a_tensor_larger_than_a_bucket_gets_buckets_of_its_own() {
        let source = SourceSet::single(
            Manifest::new(vec![
                TensorSpec::new("a", DType::BF16, vec![10]),
                TensorSpec::new("big", DType::BF16, vec![100]),
                TensorSpec::new("b", DType::BF16, vec![10]),
            ])
            .unwrap(),
        );
        let rules = RuleSet::new(vec![Rule::rename("{name*}", "{name*}", Split::Replicated).unwrap()]).unwrap();
        let dest = destination_manifest(&source, &rules, TpRank::SINGLE, None, false).unwrap();
        let plan = plan(&source, &dest, &rules, TpRank::SINGLE).unwrap();
        // 64-byte buckets: a (20 bytes) alone, big (200) over four buckets, b alone.
        let sizes: Vec<u64> = assert_whole_tensors(&plan, 64).iter().map(|b| b.bytes).collect();
        assert_eq!(sizes, vec![20, 64, 64, 64, 8, 20]);
    }

    proptest! {
        #[test]
        fn whole_tensor_bucketing_loses_nothing(
            shapes in proptest::collection::vec((1u64..30, 1u64..30), 1..8), tp in 1u32..3, max in 8u64..2000,
        ) {
            let specs = shapes.iter().enumerate()
                .map(|(i, &(r, c))| TensorSpec::new(format!("t{i}"), DType::F32, vec![r * u64::from(tp), c]))
                .collect();
            let source = SourceSet::single(Manifest::new(specs).unwrap());
            let rules = RuleSet::new(vec![Rule::rename("{name*}", "{name*}", Split::Dim { dim: 0, granule: 1 }).unwrap()]).unwrap();
            let tp = TpRank::new(tp - 1, tp).unwrap();
            let dest = destination_manifest(&source, &rules, tp, Some(DType::BF16), false).unwrap();
            let plan = plan(&source, &dest, &rules, tp).unwrap();
            assert_whole_tensors(&plan, max);
        }

        #[test]
        fn bucketing_loses_nothing(
            rows in 1u64..40, cols in 1u64..40, tp in 1u32..4, row_parallel in any::<bool>(), max in 8u64..400,
        ) {
            let split = if row_parallel { Split::Dim { dim: 1, granule: 1 } } else { Split::Dim { dim: 0, granule: 1 } };
            let (rows, cols) = (rows * u64::from(tp), cols * u64::from(tp));
            let plan = single_tensor_plan(&[rows, cols], split, TpRank::new(tp - 1, tp).unwrap());
            assert_entries_tile_the_plan(&plan, max);
        }
    }
}
