//! Turning a block copy between two row-major tensors into the fewest 2-D strided copies.
//!
//! Executors (host loops, GPU kernels) move `rows` rows of `row_elems` contiguous elements; a
//! plan's block copy becomes one such copy in every case the presets produce (contiguous for
//! column-parallel slices, strided for row-parallel ones) and a few in general N-d cases.

use serde::{Deserialize, Serialize};

/// `rows` rows of `row_elems` contiguous elements. Offsets and strides count elements, so
/// the same copy works when source and destination dtypes differ (a cast on the way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Strided {
    pub src_offset: u64,
    pub dst_offset: u64,
    pub rows: u64,
    pub row_elems: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
}

impl Strided {
    pub fn numel(&self) -> u64 {
        self.rows * self.row_elems
    }

    /// Both sides are one contiguous run.
    pub fn is_contiguous(&self) -> bool {
        self.rows <= 1 || (self.src_stride == self.row_elems && self.dst_stride == self.row_elems)
    }
}

/// One dimension of a block: how many indices, and the element stride on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Axis {
    count: u64,
    src_stride: u64,
    dst_stride: u64,
}

/// The strided copies that move block `extent` from `src_start` of a `src_shape` tensor to
/// `dst_start` of a `dst_shape` tensor. The source may have fewer dimensions than the
/// destination (a per-expert tensor stacked into a larger one): it aligns with the trailing
/// dimensions, and the block's leading extents beyond it must be 1.
///
/// The caller guarantees the block lies inside both tensors (plans verify this).
pub fn strided_copies(
    src_shape: &[u64],
    src_start: &[u64],
    dst_shape: &[u64],
    dst_start: &[u64],
    extent: &[u64],
) -> Vec<Strided> {
    debug_assert_eq!(extent.len(), dst_shape.len());
    debug_assert_eq!(src_start.len(), src_shape.len());
    let lead = dst_shape.len() - src_shape.len();
    let src_strides = row_major_strides(src_shape);
    let dst_strides = row_major_strides(dst_shape);
    let src_base: u64 = src_start.iter().zip(&src_strides).map(|(s, st)| s * st).sum();
    let dst_base: u64 = dst_start.iter().zip(&dst_strides).map(|(s, st)| s * st).sum();
    if extent.contains(&0) {
        return Vec::new();
    }

    // Axes outer to inner, size-1 axes dropped, neighbours merged when one stride spans both.
    let mut axes: Vec<Axis> = Vec::with_capacity(extent.len());
    for (d, &count) in extent.iter().enumerate() {
        if count == 1 {
            continue;
        }
        let src_stride = if d >= lead { src_strides[d - lead] } else { 0 };
        let axis = Axis { count, src_stride, dst_stride: dst_strides[d] };
        match axes.last_mut() {
            Some(outer)
                if outer.src_stride == axis.count * axis.src_stride
                    && outer.dst_stride == axis.count * axis.dst_stride =>
            {
                *outer = Axis { count: outer.count * axis.count, ..axis };
            }
            _ => axes.push(axis),
        }
    }

    let row_elems = match axes.last() {
        Some(inner) if inner.src_stride == 1 && inner.dst_stride == 1 => {
            let n = inner.count;
            axes.pop();
            n
        }
        _ => 1,
    };
    let rows_axis = axes.pop().unwrap_or(Axis { count: 1, src_stride: row_elems, dst_stride: row_elems });
    let mut copies = Vec::new();
    // Any axes left iterate outside the 2-D copies (rare: N-d blocks cut on two dims).
    let outer_total: u64 = axes.iter().map(|a| a.count).product();
    for flat in 0..outer_total {
        let (mut rem, mut src_offset, mut dst_offset) = (flat, src_base, dst_base);
        for axis in axes.iter().rev() {
            let i = rem % axis.count;
            rem /= axis.count;
            src_offset += i * axis.src_stride;
            dst_offset += i * axis.dst_stride;
        }
        copies.push(Strided {
            src_offset,
            dst_offset,
            rows: rows_axis.count,
            row_elems,
            src_stride: rows_axis.src_stride,
            dst_stride: rows_axis.dst_stride,
        });
    }
    copies
}

/// Element strides of a contiguous row-major tensor.
pub fn row_major_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn column_slice_is_one_contiguous_copy() {
        // Rows 4..8 of an [8, 16] source into rows 0..4 of a [6, 16] destination.
        let c = strided_copies(&[8, 16], &[4, 0], &[6, 16], &[0, 0], &[4, 16]);
        assert_eq!(
            c,
            vec![Strided { src_offset: 64, dst_offset: 0, rows: 1, row_elems: 64, src_stride: 64, dst_stride: 64 }]
        );
        assert!(c[0].is_contiguous());
    }

    #[test]
    fn row_parallel_slice_is_one_strided_copy() {
        // Columns 8..16 of an [4, 16] source into a whole [4, 8] destination.
        let c = strided_copies(&[4, 16], &[0, 8], &[4, 8], &[0, 0], &[4, 8]);
        assert_eq!(
            c,
            vec![Strided { src_offset: 8, dst_offset: 0, rows: 4, row_elems: 8, src_stride: 16, dst_stride: 8 }]
        );
        assert!(!c[0].is_contiguous());
    }

    #[test]
    fn stacked_expert_lands_at_its_index() {
        // A [3, 4] expert into slot 2 of a [5, 3, 4] stack: one contiguous run at 2 * 12.
        let c = strided_copies(&[3, 4], &[0, 0], &[5, 3, 4], &[2, 0, 0], &[1, 3, 4]);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].dst_offset, c[0].numel()), (24, 12));
        assert!(c[0].is_contiguous());
    }

    #[test]
    fn empty_block_copies_nothing_and_scalars_copy_one_element() {
        assert!(strided_copies(&[0, 4], &[0, 0], &[0, 4], &[0, 0], &[0, 4]).is_empty());
        let c = strided_copies(&[], &[], &[], &[], &[]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].numel(), 1);
    }

    /// Reference: visit every element of the block and compute both offsets directly.
    fn element_pairs(
        src_shape: &[u64],
        src_start: &[u64],
        dst_shape: &[u64],
        dst_start: &[u64],
        extent: &[u64],
    ) -> Vec<(u64, u64)> {
        let lead = dst_shape.len() - src_shape.len();
        let (ss, ds) = (row_major_strides(src_shape), row_major_strides(dst_shape));
        let total: u64 = extent.iter().product();
        (0..total)
            .map(|flat| {
                let (mut rem, mut s, mut d) = (flat, 0, 0);
                for k in (0..extent.len()).rev() {
                    let i = rem % extent[k];
                    rem /= extent[k];
                    d += (dst_start[k] + i) * ds[k];
                    if k >= lead {
                        s += (src_start[k - lead] + i) * ss[k - lead];
                    }
                }
                (s, d)
            })
            .collect()
    }

    fn expand(copies: &[Strided]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for c in copies {
            for r in 0..c.rows {
                for e in 0..c.row_elems {
                    out.push((c.src_offset + r * c.src_stride + e, c.dst_offset + r * c.dst_stride + e));
                }
            }
        }
        out
    }

    /// (src_shape, src_start, dst_shape, dst_start, extent)
    type BlockCase = (Vec<u64>, Vec<u64>, Vec<u64>, Vec<u64>, Vec<u64>);

    fn block_case() -> impl Strategy<Value = BlockCase> {
        (1usize..5, 0usize..2).prop_flat_map(|(ndim, lead)| {
            let dims = prop::collection::vec((1u64..5, 0u64..3, 0u64..3, 0u64..3), ndim + lead);
            dims.prop_map(move |d| {
                let extent: Vec<u64> = d.iter().enumerate().map(|(k, x)| if k < lead { 1 } else { x.0 }).collect();
                let src_start: Vec<u64> = d[lead..].iter().map(|x| x.1).collect();
                let src_shape: Vec<u64> = d[lead..].iter().zip(&extent[lead..]).map(|(x, e)| x.1 + e + x.3).collect();
                let dst_start: Vec<u64> = d.iter().map(|x| x.2).collect();
                let dst_shape: Vec<u64> = d.iter().zip(&extent).map(|(x, e)| x.2 + e + x.3).collect();
                (src_shape, src_start, dst_shape, dst_start, extent)
            })
        })
    }

    proptest! {
        /// The strided copies touch exactly the element pairs of the block, in row-major order.
        #[test]
        fn strided_copies_cover_exactly_the_block((ss, s0, ds, d0, ext) in block_case()) {
            let copies = strided_copies(&ss, &s0, &ds, &d0, &ext);
            prop_assert_eq!(expand(&copies), element_pairs(&ss, &s0, &ds, &d0, &ext));
        }
    }
}
