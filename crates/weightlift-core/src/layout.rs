//! Layouts: how one logical tensor is split over the tensor-parallel ranks of an engine.

use std::fmt;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// One receiver's place in the engine's tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TpRank {
    pub rank: u32,
    pub size: u32,
}

impl TpRank {
    pub const SINGLE: TpRank = TpRank { rank: 0, size: 1 };

    pub fn new(rank: u32, size: u32) -> Result<Self, LayoutError> {
        if size == 0 || rank >= size {
            return Err(LayoutError::BadRank { rank, size });
        }
        Ok(TpRank { rank, size })
    }

    /// Every rank of a group of `size`.
    pub fn all(size: u32) -> impl Iterator<Item = TpRank> {
        (0..size).map(move |rank| TpRank { rank, size })
    }
}

impl fmt::Display for TpRank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tp rank {}/{}", self.rank, self.size)
    }
}

/// How a tensor (or one fused part of a tensor) is divided over tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// Every rank holds the whole tensor (norms, routers).
    Replicated,
    /// Each rank holds one contiguous, equal slice of `dim`: dim 0 is column-parallel (q,
    /// gate_up, vocab-parallel embeddings), dim 1 row-parallel (o_proj, down_proj). `granule`
    /// indices along `dim` stay together (one attention head); they must divide evenly.
    Dim { dim: usize, granule: u64 },
    /// Dim 0 in whole KV heads of `head_dim` rows: split like `Dim` when there are at least as
    /// many heads as ranks; otherwise each head is replicated the way engines do it, rank r
    /// holding head `r / (size / heads)` (vLLM's QKVParallelLinear).
    KvHeads { head_dim: u64 },
}

impl Split {
    pub const fn columns() -> Split {
        Split::Dim { dim: 0, granule: 1 }
    }

    pub const fn rows() -> Split {
        Split::Dim { dim: 1, granule: 1 }
    }

    /// Query heads: whole heads per rank, as many on each.
    pub const fn heads(head_dim: u64) -> Split {
        Split::Dim { dim: 0, granule: head_dim }
    }

    pub const fn kv_heads(head_dim: u64) -> Split {
        Split::KvHeads { head_dim }
    }

    /// The slice of `shape` that `rank` holds, as a start and extent per dimension.
    pub fn slice(&self, shape: &[u64], rank: TpRank) -> Result<Block, LayoutError> {
        let mut block = Block::whole(shape);
        let (dim, range) = match *self {
            Split::Replicated => return Ok(block),
            Split::Dim { dim, granule } => (dim, split_dim(shape, dim, granule, false, rank)?),
            Split::KvHeads { head_dim } => (0, split_dim(shape, 0, head_dim, true, rank)?),
        };
        block.start[dim] = range.start;
        block.extent[dim] = range.end - range.start;
        Ok(block)
    }
}

fn split_dim(
    shape: &[u64],
    dim: usize,
    granule: u64,
    replicate_when_fewer: bool,
    rank: TpRank,
) -> Result<Range<u64>, LayoutError> {
    let len = *shape.get(dim).ok_or(LayoutError::NoSuchDim { dim, ndim: shape.len() })?;
    let size = u64::from(rank.size);
    let r = u64::from(rank.rank);
    if granule == 0 || len % granule != 0 {
        return Err(LayoutError::Granule { dim, len, granule });
    }
    let granules = len / granule;
    if granules >= size || !replicate_when_fewer {
        if granules % size != 0 {
            return Err(LayoutError::NotDivisible { dim, len, granule, size: rank.size });
        }
        let per_rank = granules / size * granule;
        return Ok(r * per_rank..(r + 1) * per_rank);
    }
    // Fewer granules than ranks: each granule is held by `size / granules` consecutive ranks.
    if granules == 0 || size % granules != 0 {
        return Err(LayoutError::NotDivisible { dim, len, granule, size: rank.size });
    }
    let g = r / (size / granules);
    Ok(g * granule..(g + 1) * granule)
}

/// An axis-aligned block of a row-major tensor: `extent[d]` indices from `start[d]` on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Block {
    pub start: Vec<u64>,
    pub extent: Vec<u64>,
}

impl Block {
    pub fn whole(shape: &[u64]) -> Block {
        Block { start: vec![0; shape.len()], extent: shape.to_vec() }
    }

    pub fn numel(&self) -> u64 {
        self.extent.iter().product()
    }
}

/// A layout that cannot be applied to a shape; names the numbers involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("invalid tensor-parallel rank {rank} of {size}")]
    BadRank { rank: u32, size: u32 },
    #[error("split dim {dim} does not exist in a {ndim}-d tensor")]
    NoSuchDim { dim: usize, ndim: usize },
    #[error("dim {dim} of length {len} is not a whole number of granules of {granule}")]
    Granule { dim: usize, len: u64, granule: u64 },
    #[error("dim {dim} of length {len} ({granule}-wide granules) cannot be split over {size} ranks")]
    NotDivisible { dim: usize, len: u64, granule: u64, size: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(split: Split, shape: &[u64], size: u32, dim: usize) -> Vec<(u64, u64)> {
        TpRank::all(size)
            .map(|r| {
                let b = split.slice(shape, r).unwrap();
                (b.start[dim], b.extent[dim])
            })
            .collect()
    }

    #[test]
    fn column_and_row_splits() {
        assert_eq!(ranges(Split::columns(), &[8, 3], 2, 0), vec![(0, 4), (4, 4)]);
        assert_eq!(ranges(Split::rows(), &[3, 8], 4, 1), vec![(0, 2), (2, 2), (4, 2), (6, 2)]);
        let b = Split::Replicated.slice(&[3, 8], TpRank { rank: 1, size: 2 }).unwrap();
        assert_eq!(b, Block::whole(&[3, 8]));
    }

    #[test]
    fn heads_stay_whole_and_only_kv_heads_replicate_when_fewer_than_ranks() {
        // 2 KV heads of dim 4 over 8 ranks: ranks 0-3 hold head 0, ranks 4-7 head 1 (vLLM's
        // QKVParallelLinear: kv head = rank / (tp_size / num_kv_heads)).
        let got = ranges(Split::kv_heads(4), &[8, 16], 8, 0);
        let want: Vec<(u64, u64)> = (0..8).map(|r| (if r < 4 { 0 } else { 4 }, 4)).collect();
        assert_eq!(got, want);
        // 4 heads over 2 ranks: two whole heads each, query or KV alike.
        assert_eq!(ranges(Split::heads(4), &[16, 16], 2, 0), vec![(0, 8), (8, 8)]);
        assert_eq!(ranges(Split::kv_heads(4), &[16, 16], 2, 0), vec![(0, 8), (8, 8)]);
        // Query heads are never replicated: 2 heads over 8 ranks is an error.
        let err = Split::heads(4).slice(&[8, 16], TpRank { rank: 0, size: 8 }).unwrap_err();
        assert!(matches!(err, LayoutError::NotDivisible { len: 8, granule: 4, size: 8, .. }));
    }

    #[test]
    fn indivisible_splits_are_errors() {
        let r = TpRank { rank: 0, size: 4 };
        assert!(matches!(Split::columns().slice(&[6, 2], r), Err(LayoutError::NotDivisible { .. })));
        // 3 KV heads over 2 ranks and over 4 ranks are both impossible.
        assert!(Split::kv_heads(2).slice(&[6, 2], TpRank { rank: 0, size: 2 }).is_err());
        assert!(Split::kv_heads(2).slice(&[6, 2], r).is_err());
        assert!(matches!(Split::heads(4).slice(&[6, 2], r), Err(LayoutError::Granule { .. })));
        assert!(matches!(Split::rows().slice(&[6], r), Err(LayoutError::NoSuchDim { .. })));
        assert!(TpRank::new(2, 2).is_err());
        assert!(TpRank::new(0, 0).is_err());
    }
}
