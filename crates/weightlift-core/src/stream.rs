//! Where a streaming receiver keeps each tensor of an update, and when it may write there.
//!
//! A streaming receiver holds no copy of the model: it hands each tensor to the engine's own
//! loader as soon as the tensor's bucket is in and verified, from a ring of `depth` buffers of
//! one bucket each, reused bucket after bucket ([`whole_tensor_buckets`] puts every tensor that
//! fits a bucket in exactly one). A tensor larger than a bucket is assembled whole in one
//! dedicated buffer, the size of the largest such tensor, because loaders take whole tensors
//! (a weight loader narrows the full tensor to its own shard, or checks the shape it was
//! given). Large tensors take the dedicated buffer in turn, each after the last, back at its
//! start when the next does not fit: a model's many tensors just over a bucket (Qwen3-8B's
//! MLP weights, 96 MiB against 64 MiB buckets) then stream several deep through the buffer
//! the largest one (the embedding) needs anyway, rather than one at a time. Tensors are
//! handed over in bucket order and given back in that order, so "bucket `j` given back" says
//! every tensor of buckets up to `j` is: bucket `k` is written only once the last bucket
//! whose bytes overlap its own ([`StreamLayout::reuses`]) is given back.
//!
//! [`whole_tensor_buckets`]: crate::whole_tensor_buckets

use crate::bucket::Bucket;
use crate::plan::Plan;

/// A buffer of the streaming receiver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamBuffer {
    /// One of the ring's `depth` buffers of a bucket each.
    Ring(u32),
    /// The buffer of tensors larger than a bucket.
    Dedicated,
}

/// Where one destination tensor sits: its buffer and the byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub buffer: StreamBuffer,
    pub offset: u64,
}

/// Where tensors start in a buffer: a multiple of this many bytes, so every view the engine
/// gets is aligned for any dtype and for vectorized copies.
pub const STREAM_ALIGN: u64 = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamLayout {
    pub depth: u32,
    /// The bucket size the buckets were made with.
    pub bucket_bytes: u64,
    /// Bytes of each ring buffer: a bucket's tensors with each one's start aligned to
    /// [`STREAM_ALIGN`] (a little more than `bucket_bytes` for buckets of many tensors).
    pub buffer_bytes: u64,
    /// Bytes of the dedicated buffer (0 when every tensor fits a bucket).
    pub dedicated_bytes: u64,
    /// Per destination (plan order); None for one of no bytes (nothing to place).
    pub places: Vec<Option<Place>>,
    /// Per bucket, the destinations complete once it is written, in the order they are
    /// handed over.
    pub complete_after: Vec<Vec<u32>>,
    /// Per bucket, the earlier bucket that must be given back before it is written (the
    /// last to use its buffer), or None.
    pub reuses: Vec<Option<usize>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("a streaming receiver needs a ring of at least one buffer")]
    NoDepth,
    #[error("bucket {bucket} holds {bytes} bytes, more than the {bucket_bytes}-byte buffers")]
    BucketTooLarge { bucket: usize, bytes: u64, bucket_bytes: u64 },
    #[error("`{name}` ({bytes} bytes) shares bucket {bucket} with other tensors although it does not fit one")]
    Shared { name: String, bytes: u64, bucket: usize },
    #[error("`{name}` fits a bucket but spans buckets {first} to {last}: buckets must be whole-tensor buckets")]
    Spans { name: String, first: usize, last: usize },
}

/// The layout of `plan`'s destinations over a ring of `depth` buffers of `bucket_bytes`, for
/// `buckets` made by [`crate::whole_tensor_buckets`] with that bucket size (other buckets are
/// refused, naming the tensor that breaks the rule).
pub fn stream_layout(
    plan: &Plan,
    buckets: &[Bucket],
    bucket_bytes: u64,
    depth: u32,
) -> Result<StreamLayout, StreamError> {
    if depth == 0 {
        return Err(StreamError::NoDepth);
    }
    let n = plan.destinations.len();
    // First and last bucket of each destination, and the order destinations start in.
    let mut span: Vec<Option<(usize, usize)>> = vec![None; n];
    let mut starts: Vec<Vec<u32>> = vec![Vec::new(); buckets.len()];
    for (k, bucket) in buckets.iter().enumerate() {
        if bucket.bytes > bucket_bytes {
            return Err(StreamError::BucketTooLarge { bucket: k, bytes: bucket.bytes, bucket_bytes });
        }
        for entry in &bucket.entries {
            let d = entry.op.dst as usize;
            match &mut span[d] {
                Some((_, last)) => *last = k,
                none => {
                    *none = Some((k, k));
                    starts[k].push(entry.op.dst);
                }
            }
        }
    }
    let mut places = vec![None; n];
    let mut complete_after: Vec<Vec<u32>> = vec![Vec::new(); buckets.len()];
    let dedicated_bytes =
        plan.destinations.iter().map(|d| d.byte_len()).filter(|&b| b > bucket_bytes).max().unwrap_or(0);
    // Where the next large tensor goes in the dedicated buffer.
    let mut cursor = 0;
    let mut buffer_bytes = 0;
    for (k, started) in starts.iter().enumerate() {
        let mut offset = 0;
        for &d in started {
            let spec = &plan.destinations[d as usize];
            let (first, last) = span[d as usize].expect("started here");
            let bytes = spec.byte_len();
            let place = if bytes > bucket_bytes {
                let shared = (first..=last).find(|&j| buckets[j].entries.iter().any(|e| e.op.dst != d));
                if let Some(bucket) = shared {
                    return Err(StreamError::Shared { name: spec.name.clone(), bytes, bucket });
                }
                if cursor + bytes > dedicated_bytes {
                    cursor = 0;
                }
                let place = Place { buffer: StreamBuffer::Dedicated, offset: cursor };
                cursor = (cursor + bytes).div_ceil(STREAM_ALIGN) * STREAM_ALIGN;
                place
            } else if first != last {
                return Err(StreamError::Spans { name: spec.name.clone(), first, last });
            } else {
                let place = Place { buffer: StreamBuffer::Ring(k as u32 % depth), offset };
                buffer_bytes = u64::max(buffer_bytes, offset + bytes);
                offset = (offset + bytes).div_ceil(STREAM_ALIGN) * STREAM_ALIGN;
                place
            };
            places[d as usize] = Some(place);
            complete_after[last].push(d);
        }
    }
    // Per ring buffer, the last bucket that wrote it; per large tensor placed so far, its
    // bytes in the dedicated buffer and its last bucket.
    let mut last_use: std::collections::HashMap<StreamBuffer, usize> = Default::default();
    let mut large: Vec<(u64, u64, usize)> = Vec::new();
    let mut reuses: Vec<Option<usize>> = Vec::with_capacity(buckets.len());
    for (k, bucket) in buckets.iter().enumerate() {
        let Some(first) = bucket.entries.first() else {
            reuses.push(None);
            continue;
        };
        let d = first.op.dst as usize;
        let place = places[d].unwrap_or(Place { buffer: StreamBuffer::Ring(k as u32 % depth), offset: 0 });
        if place.buffer == StreamBuffer::Dedicated {
            let (first, last) = span[d].expect("placed");
            // The buckets of one large tensor write its bytes in turn: what overlapped them
            // must be given back before the first, and nothing more after.
            if k != first {
                reuses.push(reuses[first]);
                continue;
            }
            let (start, end) = (place.offset, place.offset + plan.destinations[d].byte_len());
            let overlapped = large.iter().filter(|&&(s, e, _)| s < end && start < e).map(|&(_, _, j)| j).max();
            reuses.push(overlapped);
            large.push((start, end, last));
        } else {
            reuses.push(last_use.get(&place.buffer).copied());
            last_use.insert(place.buffer, k);
        }
    }
    Ok(StreamLayout { depth, bucket_bytes, buffer_bytes, dedicated_bytes, places, complete_after, reuses })
}

impl StreamLayout {
    /// Device memory the layout holds: the ring and the dedicated buffer.
    pub fn bytes(&self) -> u64 {
        u64::from(self.depth) * self.buffer_bytes + self.dedicated_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bucket::{buckets as fill_buckets, whole_tensor_buckets};
    use crate::dtype::DType;
    use crate::layout::{Split, TpRank};
    use crate::plan::{destination_manifest, plan, SourceSet};
    use crate::rules::{Rule, RuleSet};
    use crate::spec::{Manifest, TensorSpec};
    use proptest::prelude::*;

    fn plan_of(sizes: &[u64]) -> Plan {
        let specs =
            sizes.iter().enumerate().map(|(i, &n)| TensorSpec::new(format!("t{i}"), DType::BF16, vec![n])).collect();
        let source = SourceSet::single(Manifest::new(specs).unwrap());
        let rules = RuleSet::new(vec![Rule::rename("{name*}", "{name*}", Split::Replicated).unwrap()]).unwrap();
        let dest = destination_manifest(&source, &rules, TpRank::SINGLE, None, false).unwrap();
        plan(&source, &dest, &rules, TpRank::SINGLE).unwrap()
    }

    /// The bucket during which each destination is written (its first) and after which it is
    /// handed over (its last).
    fn spans(layout: &StreamLayout, buckets: &[Bucket], n: usize) -> Vec<Option<(usize, usize)>> {
        let mut span = vec![None; n];
        for (k, b) in buckets.iter().enumerate() {
            for e in &b.entries {
                let s: &mut Option<(usize, usize)> = &mut span[e.op.dst as usize];
                *s = Some(s.map_or((k, k), |(f, _)| (f, k)));
            }
        }
        assert_eq!(layout.complete_after.iter().map(Vec::len).sum::<usize>(), span.iter().flatten().count());
        span
    }

    /// No tensor is written over another before that one is given back: for any two whose
    /// bytes overlap in one buffer, the later one's first bucket waits for a bucket given back
    /// after the earlier one was handed over.
    fn assert_never_overwrites(plan: &Plan, layout: &StreamLayout, buckets: &[Bucket]) {
        let n = plan.destinations.len();
        let span = spans(layout, buckets, n);
        // Given back in order: waiting for bucket j covers every bucket up to j.
        for a in 0..n {
            for b in 0..n {
                let (Some(pa), Some(pb), Some((_, a_last)), Some((b_first, _))) =
                    (layout.places[a], layout.places[b], span[a], span[b])
                else {
                    continue;
                };
                if a == b || pa.buffer != pb.buffer || b_first <= a_last {
                    continue;
                }
                let (la, lb) = (plan.destinations[a].byte_len(), plan.destinations[b].byte_len());
                let overlap = pa.offset < pb.offset + lb && pb.offset < pa.offset + la;
                if overlap {
                    let waits = layout.reuses[b_first];
                    assert!(
                        waits.is_some_and(|j| j >= a_last),
                        "`{}` (bucket {b_first}) overwrites `{}` (handed over after bucket {a_last}) waiting for {waits:?}",
                        plan.destinations[b].name,
                        plan.destinations[a].name
                    );
                }
            }
        }
        for (d, place) in layout.places.iter().enumerate() {
            let Some(place) = place else { continue };
            let cap = match place.buffer {
                StreamBuffer::Ring(r) => {
                    assert!(r < layout.depth);
                    assert_eq!(place.offset % STREAM_ALIGN, 0);
                    layout.buffer_bytes
                }
                StreamBuffer::Dedicated => {
                    assert_eq!(place.offset % STREAM_ALIGN, 0);
                    layout.dedicated_bytes
                }
            };
            assert!(place.offset + plan.destinations[d].byte_len() <= cap, "`{}`", plan.destinations[d].name);
        }
    }

    #[test]
    fn large_tensors_take_the_dedicated_buffer_and_the_rest_the_ring() {
        // bf16: 10, 100, 10, 20, 120 elements; 64-byte buckets hold 32.
        let plan = plan_of(&[10, 100, 10, 20, 120]);
        let buckets = whole_tensor_buckets(&plan, 64).unwrap();
        let layout = stream_layout(&plan, &buckets, 64, 2).unwrap();
        assert_eq!(layout.dedicated_bytes, 240);
        // t3 starts at the next aligned offset after t2.
        assert_eq!(layout.buffer_bytes, STREAM_ALIGN + 40);
        assert_eq!(layout.bytes(), 2 * (STREAM_ALIGN + 40) + 240);
        assert_eq!(layout.places[1].unwrap().buffer, StreamBuffer::Dedicated);
        assert_eq!(layout.places[4].unwrap().buffer, StreamBuffer::Dedicated);
        // t2 and t3 (20 + 40 bytes) share a bucket.
        assert_eq!(layout.places[2].unwrap().offset, 0);
        assert_eq!(layout.places[3].unwrap().offset, STREAM_ALIGN);
        assert_never_overwrites(&plan, &layout, &buckets);
        // The second large tensor waits for the first to be given back, once, at its first bucket.
        let t4_first = buckets.iter().position(|b| b.entries[0].op.dst == 4).unwrap();
        let t1_last = buckets.iter().rposition(|b| b.entries[0].op.dst == 1).unwrap();
        assert_eq!(layout.reuses[t4_first], Some(t1_last));
    }

    #[test]
    fn large_tensors_under_half_the_dedicated_buffer_stream_side_by_side() {
        // bf16: one of 1000 elements (2000 bytes: the buffer), then four of 300 (600 bytes).
        let plan = plan_of(&[1000, 300, 300, 300, 300]);
        let buckets = whole_tensor_buckets(&plan, 512).unwrap();
        let layout = stream_layout(&plan, &buckets, 512, 2).unwrap();
        assert_eq!(layout.dedicated_bytes, 2000);
        let offsets: Vec<u64> = layout.places.iter().map(|p| p.unwrap().offset).collect();
        // Each of 600 bytes takes 768 (aligned): t1 and t2 side by side, t3 wraps to the
        // start (a third would pass the end), t4 follows it.
        assert_eq!(offsets, vec![0, 0, 768, 0, 768]);
        assert_never_overwrites(&plan, &layout, &buckets);
        let first = |d: u32| buckets.iter().position(|b| b.entries[0].op.dst == d).unwrap();
        let last = |d: u32| buckets.iter().rposition(|b| b.entries[0].op.dst == d).unwrap();
        // t2 waits for t0 only, not for t1 before it: two large tensors stream at once.
        assert_eq!(layout.reuses[first(2)], Some(last(0)));
        assert_eq!(layout.reuses[first(3)], Some(last(1)));
        assert_eq!(layout.reuses[first(4)], Some(last(2)));
    }

    #[test]
    fn buckets_that_split_a_small_tensor_are_refused_by_name() {
        let plan = plan_of(&[10, 30]);
        // Filled buckets cut t1 (60 bytes) over two 64-byte buckets after t0's 20 bytes.
        let filled = fill_buckets(&plan, 64).unwrap();
        let err = stream_layout(&plan, &filled, 64, 2).unwrap_err();
        assert_eq!(err, StreamError::Spans { name: "t1".into(), first: 0, last: 1 });
        assert_eq!(stream_layout(&plan, &filled, 64, 0).unwrap_err(), StreamError::NoDepth);
        let err = stream_layout(&plan, &filled, 32, 2).unwrap_err();
        assert!(matches!(err, StreamError::BucketTooLarge { bucket: 0, .. }));
    }

    proptest! {
        #[test]
        fn the_ring_never_overwrites_what_was_not_given_back(
            sizes in proptest::collection::vec(1u64..200, 1..24), max in 8u64..300, depth in 1u32..4,
        ) {
            let plan = plan_of(&sizes);
            let buckets = whole_tensor_buckets(&plan, max).unwrap();
            let layout = stream_layout(&plan, &buckets, max, depth).unwrap();
            assert_never_overwrites(&plan, &layout, &buckets);
            let largest_over = plan.destinations.iter().map(|d| d.byte_len()).filter(|&b| b > max).max().unwrap_or(0);
            prop_assert_eq!(layout.dedicated_bytes, largest_over);
        }
    }
}
