//! Quantizing on the way: engine weights in FP8 (e4m3) with a scale per block, written from
//! bf16 / f32 trainer tensors. A [`QuantPlan`] lays a plan's quantized destinations out
//! (which weights, their scale tensors, the block grid) and proves the scales are covered:
//! every op into a quantized weight writes whole blocks (a TP slice or a fused part that
//! splits a block is an error naming it, never a silent rounding), so each scale is computed
//! from exactly one op's bytes. [`quantize`] is the host's quantizer; GPU kernels must equal
//! it bit for bit.
//!
//! The quantizer, per block (DeepSeek-V3 / vLLM block FP8): `amax = max |x|` over the block
//! in f32 (NaN if any element is NaN), floored at [`AMAX_FLOOR`]; the scale is
//! `s = amax / 448` (stored as `weight_scale_inv`: the engine multiplies by it to
//! dequantize); each element is `e4m3(clamp(x / s, -448, 448))`, rounded to nearest even as
//! torch's `.to(torch.float8_e4m3fn)` rounds, NaN staying NaN.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::plan::{CopyOp, Plan, SourcePiece};
use crate::spec::{Manifest, TensorSpec};

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The smallest amax a block's scale is taken from (a block of zeros gets a tiny scale and
/// zeros, not a division by zero).
pub const AMAX_FLOOR: f32 = 1e-10;

/// How a weight's scales are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quant {
    /// One scale per `rows` x `cols` block of the last two dimensions (DeepSeek-V3, Qwen3
    /// FP8: 128 x 128), named `<weight>_scale_inv`.
    Block { rows: u64, cols: u64 },
    /// One scale per output row (vLLM's per-channel FP8), named `<weight>_scale`.
    Channel,
}

impl Quant {
    /// The block of a weight whose last two dimensions are `rows` x `cols`.
    pub fn block(&self, cols: u64) -> [u64; 2] {
        match *self {
            Quant::Block { rows, cols } => [rows, cols],
            Quant::Channel => [1, cols.max(1)],
        }
    }

    /// The name of a weight's scale tensor.
    pub fn scale_name(&self, weight: &str) -> String {
        match self {
            Quant::Block { .. } => format!("{weight}_scale_inv"),
            Quant::Channel => format!("{weight}_scale"),
        }
    }
}

impl fmt::Display for Quant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quant::Block { rows, cols } if rows == cols => write!(f, "block:{rows}"),
            Quant::Block { rows, cols } => write!(f, "block:{rows}x{cols}"),
            Quant::Channel => write!(f, "channel"),
        }
    }
}

impl FromStr for Quant {
    type Err = String;

    /// `block:128`, `block:128x64` or `channel`.
    fn from_str(s: &str) -> Result<Quant, String> {
        let bad = || format!("unknown quantization `{s}` (expected block:N, block:RxC or channel)");
        if s == "channel" {
            return Ok(Quant::Channel);
        }
        let size = s.strip_prefix("block:").ok_or_else(bad)?;
        let (rows, cols) = size.split_once('x').unwrap_or((size, size));
        let (rows, cols): (u64, u64) = (rows.parse().map_err(|_| bad())?, cols.parse().map_err(|_| bad())?);
        if rows == 0 || cols == 0 {
            return Err(format!("quantization `{s}`: a block is at least 1 x 1"));
        }
        Ok(Quant::Block { rows, cols })
    }
}

/// Whether an engine parameter is a weight that FP8 engines quantize: a matrix (or a stack
/// of them) of a linear layer. Embeddings, the LM head, norms and MoE routers stay as they
/// are, as in the FP8 checkpoints of DeepSeek-V3 and Qwen3.
pub fn quantizable(spec: &TensorSpec) -> bool {
    let name = spec.name.as_str();
    spec.shape.len() >= 2
        && name.ends_with("weight")
        && !["embed", "lm_head", "norm"].iter().any(|skip| name.contains(skip))
        && !name.ends_with("mlp.gate.weight")
}

/// One quantized weight of a plan and its scale tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantTarget {
    /// The weight's index among the plan's destinations.
    pub weight: u32,
    pub scale: TensorSpec,
    /// Rows x columns of the last two dimensions each scale covers.
    pub block: [u64; 2],
}

/// A plan's destinations quantized to FP8: which, with which scales.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantPlan {
    pub quant: Quant,
    pub targets: Vec<QuantTarget>,
}

/// Why a plan's destinations cannot be quantized as asked; names the tensor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error(
        "`{destination}`: the op from `{from}` writes rows {rows:?} and columns {cols:?}, which split its \
         {block_rows} x {block_cols} blocks (a TP slice or fused part that is not a whole number of blocks)"
    )]
    SplitBlock {
        destination: String,
        from: String,
        rows: (u64, u64),
        cols: (u64, u64),
        block_rows: u64,
        block_cols: u64,
    },
    #[error("`{destination}`: quantized from {dtype}; FP8 weights are quantized from F32, BF16 or F16")]
    SourceDtype { destination: String, dtype: DType },
    #[error("`{scale}`: the engine already has a tensor of that name, and it is `{weight}`'s scale")]
    ScaleExists { scale: String, weight: String },
    #[error("`{scale}`: scale {index} written {count} time(s), not once")]
    ScaleCoverage { scale: String, index: u64, count: u32 },
    #[error("`{scale}`: the scale of an FP8 weight is F32, not {dtype}")]
    ScaleDtype { scale: String, dtype: DType },
    #[error(
        "`{scale}` is {shape:?}, but `{weight}` {weight_shape:?} in {block_rows} x {block_cols} blocks has \
         {expected:?} scales"
    )]
    ScaleShape {
        scale: String,
        weight: String,
        shape: Vec<u64>,
        weight_shape: Vec<u64>,
        expected: Vec<u64>,
        block_rows: u64,
        block_cols: u64,
    },
    #[error("`{weight}`: an FP8 weight of {rank} dimension(s); a quantized weight is a matrix or a stack of them")]
    Rank { weight: String, rank: usize },
    #[error("`{scale}`: a scale tensor is written from its weight's ops, never by a copy of its own")]
    ScaleWritten { scale: String },
}

impl QuantError {
    /// The engine tensor the error is about (the weight, or the scale tensor).
    pub fn tensor(&self) -> &str {
        match self {
            QuantError::SplitBlock { destination, .. } | QuantError::SourceDtype { destination, .. } => destination,
            QuantError::ScaleExists { scale, .. }
            | QuantError::ScaleCoverage { scale, .. }
            | QuantError::ScaleDtype { scale, .. }
            | QuantError::ScaleShape { scale, .. }
            | QuantError::ScaleWritten { scale } => scale,
            QuantError::Rank { weight, .. } => weight,
        }
    }
}

/// A quantized weight of a [`Plan`]: the ops into destination `weight` (F8_E4M3) quantize
/// their blocks, and write one scale per `block` (rows x columns of its last two dimensions)
/// into destination `scale` (F32, row-major over the leading dimensions then the block grid).
/// The scale tensor has no ops: each scale is written by the one op whose bytes it scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scaled {
    pub weight: u32,
    pub scale: u32,
    pub block: [u64; 2],
}

/// The block grid of a weight of `shape` in `block`s: the scale tensor's shape.
pub fn scale_shape(shape: &[u64], block: [u64; 2]) -> Vec<u64> {
    let n = shape.len();
    let mut out = shape[..n - 2].to_vec();
    out.extend([shape[n - 2].div_ceil(block[0]), shape[n - 1].div_ceil(block[1])]);
    out
}

/// The block FP8 engines use unless their scales say otherwise (DeepSeek-V3, Qwen3 FP8).
pub const DEFAULT_BLOCK: [u64; 2] = [128, 128];

/// The scales of an engine manifest: each F8_E4M3 weight `w` with an F32 `w_scale_inv`
/// beside it (block scales) or `w_scale` (per output channel, vLLM's `[rows, 1]`). The block
/// of the `_scale_inv` tensors is one for the whole engine, as an FP8 checkpoint's
/// `weight_block_size` is: 128 x 128 when every scale's shape agrees with it, else the
/// power-of-two block every scale agrees with; a scale that fits neither is an error naming
/// it. Only the weights `quantized` takes (by name) count. Returns (weight, scale, block) by
/// weight, and the errors.
pub fn engine_scales(engine: &Manifest, quantized: impl Fn(&str) -> bool) -> (Vec<Scaled>, Vec<QuantError>) {
    let mut found: Vec<(usize, usize, bool)> = Vec::new();
    for (s, spec) in engine.iter().enumerate() {
        let (weight, blocks) = match (spec.name.strip_suffix("_scale_inv"), spec.name.strip_suffix("_scale")) {
            (Some(w), _) => (w, true),
            (None, Some(w)) => (w, false),
            _ => continue,
        };
        let Some(w) = engine.position(weight) else { continue };
        if engine.specs()[w].dtype == DType::F8E4M3 && quantized(weight) {
            found.push((w, s, blocks));
        }
    }
    let mut errors = Vec::new();
    found.retain(|&(w, s, _)| {
        let (weight, scale) = (&engine.specs()[w], &engine.specs()[s]);
        if weight.shape.len() < 2 {
            errors.push(QuantError::Rank { weight: weight.name.clone(), rank: weight.shape.len() });
            return false;
        }
        if scale.dtype != DType::F32 {
            errors.push(QuantError::ScaleDtype { scale: scale.name.clone(), dtype: scale.dtype });
            return false;
        }
        true
    });
    // (rows or cols of the weight, grid along it) of every block-scaled weight.
    let dims = |axis: usize| -> Vec<(u64, u64)> {
        found
            .iter()
            .filter(|f| f.2)
            .filter_map(|&(w, s, _)| {
                let (weight, scale) = (&engine.specs()[w].shape, &engine.specs()[s].shape);
                let (n, m) = (weight.len(), scale.len());
                (m >= 2).then(|| (weight[n - 2 + axis], scale[m - 2 + axis]))
            })
            .collect()
    };
    let block_along = |axis: usize| -> u64 {
        let dims = dims(axis);
        let fits = |b: u64| dims.iter().filter(|&&(len, grid)| len.div_ceil(b) == grid).count();
        let derived = dims.iter().filter(|d| d.1 > 1).map(|&(len, grid)| len.div_ceil(grid).next_power_of_two());
        // The block most scales agree with (the default on a tie): one scale of a wrong shape
        // is named alone, not every other one with it.
        let mut best = (fits(DEFAULT_BLOCK[axis]), DEFAULT_BLOCK[axis]);
        for b in derived {
            if fits(b) > best.0 {
                best = (fits(b), b);
            }
        }
        best.1
    };
    let block = [block_along(0), block_along(1)];
    let mut scaled = Vec::new();
    for (w, s, blocks) in found {
        let (weight, scale) = (&engine.specs()[w], &engine.specs()[s]);
        let n = weight.shape.len();
        let block = if blocks { block } else { Quant::Channel.block(weight.shape[n - 1]) };
        let expected = scale_shape(&weight.shape, block);
        if scale.shape != expected {
            errors.push(QuantError::ScaleShape {
                scale: scale.name.clone(),
                weight: weight.name.clone(),
                shape: scale.shape.clone(),
                weight_shape: weight.shape.clone(),
                expected,
                block_rows: block[0],
                block_cols: block[1],
            });
            continue;
        }
        scaled.push(Scaled { weight: w as u32, scale: s as u32, block });
    }
    scaled.sort_unstable_by_key(|s| s.weight);
    (scaled, errors)
}

/// Whether a span `[start, end)` of a dimension of `len` is whole blocks of `size` (the last
/// block of the dimension may be short).
fn whole_blocks(start: u64, end: u64, size: u64, len: u64) -> bool {
    start % size == 0 && (end % size == 0 || end == len)
}

/// Checks the ops of a quantized weight: each from a float source, each writing whole blocks
/// of the engine's tensor and (for block scales) of the source's whole tensor (a TP slice is
/// a range of the checkpoint's blocks, as vLLM requires), and together writing every scale
/// once.
pub(crate) fn check_scaled(
    weight: &TensorSpec,
    scale: &TensorSpec,
    block: [u64; 2],
    channel: bool,
    ops: &[&CopyOp],
    sources: &[SourcePiece],
) -> Vec<QuantError> {
    let mut errors = Vec::new();
    let n = weight.shape.len();
    let (rows, cols) = (weight.shape[n - 2], weight.shape[n - 1]);
    let mut written = vec![0u32; scale.numel() as usize];
    for op in ops {
        let piece = &sources[op.src as usize];
        let source = &piece.spec;
        if !matches!(source.dtype, DType::F32 | DType::BF16 | DType::F16) {
            errors.push(QuantError::SourceDtype { destination: weight.name.clone(), dtype: source.dtype });
            return errors;
        }
        let (r0, c0) = (op.dst_start[n - 2], op.dst_start[n - 1]);
        let (r1, c1) = (r0 + op.extent[n - 2], c0 + op.extent[n - 1]);
        let mut aligned = whole_blocks(r0, r1, block[0], rows) && whole_blocks(c0, c1, block[1], cols);
        // The same span in the source's whole tensor, along the dims it shares.
        let lead = n - source.shape.len();
        for (axis, size) in [(n - 2, block[0]), (n - 1, block[1])] {
            let Some(d) = axis.checked_sub(lead) else { continue };
            if channel && axis == n - 1 {
                continue; // a channel's scale is of the engine's own columns
            }
            let start = piece.offset[d] + op.src_start[d];
            let len = piece.whole.as_ref().map_or(piece.offset[d] + source.shape[d], |w| w[d]);
            aligned &= whole_blocks(start, start + op.extent[axis], size, len);
        }
        if !aligned {
            errors.push(QuantError::SplitBlock {
                destination: weight.name.clone(),
                from: source.name.clone(),
                rows: (r0, r1),
                cols: (c0, c1),
                block_rows: block[0],
                block_cols: block[1],
            });
            continue;
        }
        mark_scales(&mut written, &op.dst_start, &op.extent, &scale.shape, block);
    }
    if errors.is_empty() {
        if let Some((index, &count)) = written.iter().enumerate().find(|(_, &c)| c != 1) {
            errors.push(QuantError::ScaleCoverage { scale: scale.name.clone(), index: index as u64, count });
        }
    }
    errors
}

impl QuantPlan {
    /// Quantizes every quantizable destination of `plan` with `quant`, checking that every
    /// op into one writes whole blocks and that its scales are then each written once.
    pub fn new(plan: &Plan, quant: Quant) -> Result<QuantPlan, Vec<QuantError>> {
        let mut errors = Vec::new();
        let mut targets = Vec::new();
        let mut ops_of: Vec<Vec<usize>> = vec![Vec::new(); plan.destinations.len()];
        for (i, op) in plan.ops.iter().enumerate() {
            ops_of[op.dst as usize].push(i);
        }
        let names: std::collections::HashSet<&str> = plan.destinations.iter().map(|d| d.name.as_str()).collect();
        for (d, spec) in plan.destinations.iter().enumerate() {
            if !quantizable(spec) {
                continue;
            }
            let n = spec.shape.len();
            let block = quant.block(spec.shape[n - 1]);
            let scale = TensorSpec::new(quant.scale_name(&spec.name), DType::F32, scale_shape(&spec.shape, block));
            if names.contains(scale.name.as_str()) {
                errors.push(QuantError::ScaleExists { scale: scale.name.clone(), weight: spec.name.clone() });
                continue;
            }
            let ops: Vec<&CopyOp> = ops_of[d].iter().map(|&i| &plan.ops[i]).collect();
            let channel = quant == Quant::Channel;
            errors.extend(check_scaled(spec, &scale, block, channel, &ops, &plan.sources));
            targets.push(QuantTarget { weight: d as u32, scale, block });
        }
        match errors.is_empty() {
            true => Ok(QuantPlan { quant, targets }),
            false => Err(errors),
        }
    }

    /// The engine's parameters: the plan's destinations, quantized weights in F8_E4M3, each
    /// followed by its scale tensor.
    pub fn engine_manifest(&self, plan: &Plan) -> Manifest {
        let mut scale_of = vec![None; plan.destinations.len()];
        for t in &self.targets {
            scale_of[t.weight as usize] = Some(&t.scale);
        }
        let mut specs = Vec::new();
        for (spec, scale) in plan.destinations.iter().zip(scale_of) {
            match scale {
                Some(scale) => {
                    specs.push(TensorSpec { dtype: DType::F8E4M3, ..spec.clone() });
                    specs.push(scale.clone());
                }
                None => specs.push(spec.clone()),
            }
        }
        Manifest::new(specs).expect("scale names were checked against the destinations")
    }
}

/// Counts, in `written` (a scale tensor of `scale_shape`), the scales of the blocks an op at
/// `start` with `extent` (the weight's dimensions) writes.
fn mark_scales(written: &mut [u32], start: &[u64], extent: &[u64], scale_shape: &[u64], block: [u64; 2]) {
    let n = start.len();
    let mut lo: Vec<u64> = start[..n - 2].to_vec();
    let mut hi: Vec<u64> = start[..n - 2].iter().zip(&extent[..n - 2]).map(|(s, e)| s + e).collect();
    lo.extend([start[n - 2] / block[0], start[n - 1] / block[1]]);
    hi.extend([(start[n - 2] + extent[n - 2]).div_ceil(block[0]), (start[n - 1] + extent[n - 1]).div_ceil(block[1])]);
    if lo.iter().zip(&hi).any(|(l, h)| l >= h) {
        return;
    }
    let mut at = lo.clone();
    loop {
        let index = at.iter().zip(scale_shape).fold(0, |acc, (i, dim)| acc * dim + i);
        written[index as usize] += 1;
        // The next index in row-major order within [lo, hi).
        let mut k = n;
        loop {
            if k == 0 {
                return;
            }
            k -= 1;
            at[k] += 1;
            if at[k] < hi[k] {
                break;
            }
            at[k] = lo[k];
        }
    }
}

/// f32 -> e4m3 (`float8_e4m3fn`: no infinities, one NaN per sign), rounded to nearest even
/// as torch's conversion rounds; magnitudes from 464 up are NaN.
pub fn e4m3(x: f32) -> u8 {
    // 480, the first magnitude past e4m3's range once rounded, and the bias that moves an f32
    // below e4m3's smallest normal (2^-6) to where its low bits are the e4m3 subnormal.
    const NAN_FROM: u32 = 1087 << 20;
    const SUBNORMAL_BIAS: u32 = 141 << 23;
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let magnitude = bits & 0x7fff_ffff;
    // Both roundings are computed and one is selected, with no branch: the loops over a
    // block then vectorize.
    let subnormal = (f32::from_bits(magnitude) + f32::from_bits(SUBNORMAL_BIAS)).to_bits().wrapping_sub(SUBNORMAL_BIAS);
    let odd = (magnitude >> 20) & 1;
    let rebased = magnitude.wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7_ffff)).wrapping_add(odd);
    let value = if magnitude >= NAN_FROM {
        0x7f
    } else if magnitude < (121 << 23) {
        subnormal as u8
    } else {
        (rebased >> 20) as u8
    };
    value | sign
}

/// The scale of a block whose largest magnitude is `amax` (NaN if the block holds one).
pub fn scale_of(amax: f32) -> f32 {
    if amax.is_nan() {
        return f32::NAN;
    }
    amax.max(AMAX_FLOOR) / E4M3_MAX
}

/// One element quantized with its block's scale.
pub fn quantize_one(x: f32, scale: f32) -> u8 {
    // f32::clamp keeps a NaN a NaN.
    e4m3((x / scale).clamp(-E4M3_MAX, E4M3_MAX))
}

/// Quantizes `x` (row-major, `shape` with at least two dimensions, as f32) in blocks of the
/// last two dimensions: `q` gets the e4m3 bytes (as many as `x`), `scales` one per block
/// (row-major over `shape[..n-2]` then the block grid).
pub fn quantize(x: &[f32], shape: &[u64], block: [u64; 2], q: &mut [u8], scales: &mut [f32]) {
    let n = shape.len();
    assert!(n >= 2, "a quantized weight has two dimensions at least");
    let (rows, cols) = (shape[n - 2] as usize, shape[n - 1] as usize);
    let (br, bc) = (block[0] as usize, block[1] as usize);
    let (grid_r, grid_c) = (rows.div_ceil(br), cols.div_ceil(bc));
    let matrices = shape[..n - 2].iter().product::<u64>() as usize;
    assert_eq!(x.len(), matrices * rows * cols);
    assert_eq!(q.len(), x.len());
    assert_eq!(scales.len(), matrices * grid_r * grid_c);
    // A magnitude's bits order as the magnitude does, and every NaN's are above infinity's:
    // the largest |x| of a block is the largest of its elements' bits less the sign, NaN
    // when that is past infinity (torch's amax propagates NaN). Integer maxima vectorize.
    const MAGNITUDE: u32 = 0x7fff_ffff;
    const INFINITY: u32 = 0x7f80_0000;
    let mut amax = vec![0u32; grid_c];
    let mut scale_row = vec![0f32; grid_c];
    for m in 0..matrices {
        let base = m * rows * cols;
        for gr in 0..grid_r {
            let rows_of = gr * br..((gr + 1) * br).min(rows);
            amax.fill(0);
            for r in rows_of.clone() {
                let row = &x[base + r * cols..base + (r + 1) * cols];
                for (gc, part) in row.chunks(bc).enumerate() {
                    amax[gc] = part.iter().fold(amax[gc], |a, v| a.max(v.to_bits() & MAGNITUDE));
                }
            }
            for (gc, &bits) in amax.iter().enumerate() {
                let magnitude = if bits > INFINITY { f32::NAN } else { f32::from_bits(bits) };
                scale_row[gc] = scale_of(magnitude);
                scales[(m * grid_r + gr) * grid_c + gc] = scale_row[gc];
            }
            for r in rows_of {
                let (row, out) =
                    (&x[base + r * cols..base + (r + 1) * cols], &mut q[base + r * cols..base + (r + 1) * cols]);
                for ((part, out), &scale) in row.chunks(bc).zip(out.chunks_mut(bc)).zip(&scale_row) {
                    for (o, &v) in out.iter_mut().zip(part) {
                        *o = quantize_one(v, scale);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::{destination_manifest, plan, SourceSet};
    use crate::{synthetic, PresetOptions, TpRank};

    fn rank_plan(model: &str, tp: TpRank) -> Plan {
        let config = synthetic(model).unwrap();
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        let source = SourceSet::single(config.source_manifest());
        let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
        plan(&source, &dest, &rules, tp).unwrap()
    }

    /// e4m3 -> f32, exactly.
    fn e4m3_to_f32(q: u8) -> f32 {
        let sign = if q & 0x80 != 0 { -1.0 } else { 1.0 };
        let (exponent, mantissa) = (i32::from((q >> 3) & 0xf), f32::from(q & 0x7));
        if q & 0x7f == 0x7f {
            return f32::NAN;
        }
        sign * match exponent {
            0 => mantissa / 8.0 * 2f32.powi(-6),
            e => (1.0 + mantissa / 8.0) * 2f32.powi(e - 7),
        }
    }

    /// A synthetic model's bf16 plan at `tp`, and the plan of the same sources into its FP8
    /// engine (every quantizable weight in `quant` blocks, a scale tensor beside each).
    fn fp8_plans(model: &str, tp: TpRank, quant: Quant) -> (Plan, Result<Plan, crate::PlanError>) {
        let config = synthetic(model).unwrap();
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        let source = SourceSet::single(config.source_manifest());
        let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
        let bf16 = plan(&source, &dest, &rules, tp).unwrap();
        let engine = QuantPlan::new(&bf16, quant).unwrap().engine_manifest(&bf16);
        let fp8 = plan(&source, &engine, &rules, tp);
        (bf16, fp8)
    }

    /// bf16 bytes of values in about [-3, 3], deterministic per tensor, with a few zeros and
    /// a block's worth of tiny (denormal in e4m3) values.
    fn bf16_values(seed: usize, numel: u64) -> Vec<u8> {
        (0..numel)
            .flat_map(|i| {
                let h =
                    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (seed as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 40;
                let v = match i % 97 {
                    0 => 0.0,
                    1..=4 => (h as f32) * 1e-12,
                    _ => (h as f32 / (1u64 << 24) as f32 - 0.5) * 6.0,
                };
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect()
    }

    /// What the engine should hold: the bf16 plan's tensors, each quantized weight quantized
    /// whole (the torch reference's way) with its scales beside it.
    pub(crate) fn reference(bf16: &Plan, fp8: &Plan, sources: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut wide: Vec<Vec<u8>> = bf16.destinations.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
        crate::exec::execute(bf16, sources, &mut wide).unwrap();
        let mut out: Vec<Vec<u8>> = fp8.destinations.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
        for (d, spec) in fp8.destinations.iter().enumerate() {
            if let Some(b) = bf16.destinations.iter().position(|w| w.name == spec.name) {
                if fp8.scaled_of(d as u32).is_none() {
                    out[d] = wide[b].clone();
                }
            }
        }
        for s in &fp8.scaled {
            let w = &fp8.destinations[s.weight as usize];
            let b = bf16.destinations.iter().position(|x| x.name == w.name).unwrap();
            let x: Vec<f32> = wide[b].chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
            let mut scales = vec![0f32; fp8.destinations[s.scale as usize].numel() as usize];
            quantize(&x, &w.shape, s.block, &mut out[s.weight as usize], &mut scales);
            out[s.scale as usize] = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        out
    }

    /// Runs `plan` bucket by bucket, packing and unpacking (quantizing) as a transport does.
    pub(crate) fn through_buckets(plan: &Plan, sources: &[&[u8]], bucket_bytes: u64) -> Vec<Vec<u8>> {
        let mut dst: Vec<Vec<u8>> = plan.destinations.iter().map(|d| vec![0xAB; d.byte_len() as usize]).collect();
        for bucket in crate::buckets(plan, bucket_bytes).unwrap() {
            assert!(bucket.bytes <= bucket_bytes);
            let mut payload = vec![0u8; bucket.bytes as usize];
            for e in &bucket.entries {
                let range = e.payload_offset as usize..(e.payload_offset + plan.op_bytes(&e.op)) as usize;
                crate::exec::pack(plan, &e.op, sources[e.op.src as usize], &mut payload[range]).unwrap();
            }
            for e in &bucket.entries {
                let range = e.payload_offset as usize..(e.payload_offset + plan.op_bytes(&e.op)) as usize;
                match plan.scaled_of(e.op.dst) {
                    Some(s) => {
                        let (w, sc) = crate::exec::two_mut(&mut dst, s.weight as usize, s.scale as usize);
                        crate::exec::unpack_quantized(plan, &e.op, &payload[range], w, sc).unwrap();
                    }
                    None => crate::exec::unpack(plan, &e.op, &payload[range], &mut dst[e.op.dst as usize]).unwrap(),
                }
            }
        }
        dst
    }

    /// An FP8 engine of Qwen3 / Qwen3-MoE plans from the bf16 trainer: its weights' ops are
    /// quantizing, its scales covered from them; run directly or through buckets of any size
    /// (split between blocks), it holds what quantizing each whole bf16 tensor gives.
    #[test]
    fn fp8_engines_hold_the_whole_tensor_quantization_by_every_path() {
        for model in ["qwen3-tiny", "qwen3-moe-tiny", "deepseek-moe-tiny"] {
            for tp in [TpRank::SINGLE, TpRank::new(1, 2).unwrap()] {
                for quant in [Quant::Block { rows: 16, cols: 16 }, Quant::Block { rows: 8, cols: 16 }, Quant::Channel] {
                    let (bf16, fp8) = fp8_plans(model, tp, quant);
                    let fp8 = fp8.unwrap_or_else(|e| panic!("{model} {tp} {quant}: {e}"));
                    let expected_scaled = QuantPlan::new(&bf16, quant).unwrap().targets.len();
                    assert_eq!(fp8.scaled.len(), expected_scaled, "{model} {tp} {quant}");
                    assert!(fp8
                        .scaled
                        .iter()
                        .all(|s| s.block
                            == quant.block(fp8.destinations[s.weight as usize].shape.last().copied().unwrap())));
                    let bytes: Vec<Vec<u8>> =
                        fp8.sources.iter().enumerate().map(|(i, p)| bf16_values(i, p.spec.numel())).collect();
                    let sources: Vec<&[u8]> = bytes.iter().map(Vec::as_slice).collect();
                    let want = reference(&bf16, &fp8, &sources);
                    let mut direct: Vec<Vec<u8>> =
                        fp8.destinations.iter().map(|d| vec![0xCD; d.byte_len() as usize]).collect();
                    crate::exec::execute(&fp8, &sources, &mut direct).unwrap();
                    for (d, spec) in fp8.destinations.iter().enumerate() {
                        assert!(direct[d] == want[d], "{model} {tp} {quant}: `{}` directly", spec.name);
                    }
                    for bucket_bytes in [1 << 10, 3000, 1 << 20] {
                        let got = through_buckets(&fp8, &sources, bucket_bytes);
                        for (d, spec) in fp8.destinations.iter().enumerate() {
                            assert!(got[d] == want[d], "{model} {tp} {quant} {bucket_bytes}: `{}`", spec.name);
                        }
                    }
                }
            }
        }
    }

    /// A trainer that holds FP8 weights and their scales already (it quantizes itself) has
    /// both copied as they are: nothing is quantized twice.
    #[test]
    fn fp8_sources_with_their_scales_are_copied_as_they_are() {
        use crate::layout::Split;
        use crate::rules::{Rule, RuleSet};
        let specs = vec![
            TensorSpec::new("w.weight", DType::F8E4M3, vec![256, 128]),
            TensorSpec::new("w.weight_scale_inv", DType::F32, vec![2, 1]),
        ];
        let source = SourceSet::single(Manifest::new(specs.clone()).unwrap());
        let rules = RuleSet::new(vec![Rule::rename("{name*}", "{name*}", Split::Replicated).unwrap()]).unwrap();
        let copied = plan(&source, &Manifest::new(specs).unwrap(), &rules, TpRank::SINGLE).unwrap();
        assert!(copied.scaled.is_empty());
        assert_eq!(copied.ops.len(), 2);
        assert!(copied.ops.iter().all(|op| copied.cast(op).is_none()));
    }

    /// DeepSeek-V3's MoE shape (dense first layers, routed and shared experts) at TP 8, as its
    /// FP8 checkpoint is served: every projection, shared and routed expert quantized in
    /// 128 x 128 blocks, every scale covered; the routers stay.
    #[test]
    fn a_deepseek_style_moe_plans_into_its_fp8_engine_at_tp_8() {
        let (bf16, fp8) =
            fp8_plans("deepseek-v3-shape", TpRank::new(7, 8).unwrap(), Quant::Block { rows: 128, cols: 128 });
        let fp8 = fp8.unwrap();
        let names: Vec<&str> = fp8.scaled.iter().map(|s| fp8.destinations[s.weight as usize].name.as_str()).collect();
        for want in [
            "model.layers.0.mlp.gate_up_proj.weight",
            "model.layers.3.mlp.shared_experts.gate_up_proj.weight",
            "model.layers.3.mlp.shared_experts.down_proj.weight",
            "model.layers.60.mlp.experts.w13_weight",
            "model.layers.60.mlp.experts.w2_weight",
        ] {
            assert!(names.contains(&want), "{want}");
        }
        assert!(!names.iter().any(|n| n.ends_with("mlp.gate.weight")));
        assert_eq!(fp8.destinations.len(), bf16.destinations.len() + fp8.scaled.len());
        assert!(fp8.scaled.iter().all(|s| s.block == [128, 128]));
        let w13 = fp8.destinations.iter().position(|d| d.name == "model.layers.60.mlp.experts.w13_weight_scale_inv");
        assert_eq!(fp8.destinations[w13.unwrap()].shape, vec![256, 2 * 2048 / 8 / 128, 7168 / 128]);
    }

    /// The default 128 x 128 blocks are found from real shapes' scales; a scale of the wrong
    /// shape, or not F32, is named; an F8 weight with no scale is a dtype mismatch.
    #[test]
    fn engine_scales_are_found_by_name_and_checked_by_shape() {
        let (_, fp8) = fp8_plans("qwen3-8b", TpRank::new(1, 8).unwrap(), Quant::Block { rows: 128, cols: 128 });
        let fp8 = fp8.unwrap();
        assert!(fp8.scaled.iter().all(|s| s.block == [128, 128]));
        let (bf16, _) = fp8_plans("qwen3-tiny", TpRank::SINGLE, Quant::Block { rows: 16, cols: 16 });
        let engine = QuantPlan::new(&bf16, Quant::Block { rows: 16, cols: 16 }).unwrap().engine_manifest(&bf16);
        let source = SourceSet::single(synthetic("qwen3-tiny").unwrap().source_manifest());
        let rules = synthetic("qwen3-tiny").unwrap().preset.rules(PresetOptions::default()).unwrap();
        let edit = |f: &dyn Fn(&mut TensorSpec) -> bool| {
            let specs: Vec<TensorSpec> = engine.iter().cloned().filter_map(|mut t| f(&mut t).then_some(t)).collect();
            plan(&source, &Manifest::new(specs).unwrap(), &rules, TpRank::SINGLE).unwrap_err().to_string()
        };
        let scale = "model.layers.1.mlp.down_proj.weight_scale_inv";
        let wrong_shape = edit(&|t| {
            if t.name == scale {
                t.shape[1] += 1;
            }
            true
        });
        assert!(wrong_shape.contains(scale) && wrong_shape.contains("16 x 16 blocks"), "{wrong_shape}");
        let wrong_dtype = edit(&|t| {
            if t.name == scale {
                t.dtype = DType::BF16;
            }
            true
        });
        assert!(wrong_dtype.contains(scale) && wrong_dtype.contains("F32"), "{wrong_dtype}");
        let no_scale = edit(&|t| t.name != scale);
        assert!(no_scale.contains("model.layers.1.mlp.down_proj.weight") && no_scale.contains("F8_E4M3"), "{no_scale}");
    }

    /// A stored plan is checked again: an op into a scale tensor, a scale of the wrong shape or
    /// an FP8 weight left without its scales does not verify.
    #[test]
    fn tampered_quantized_plans_do_not_verify() {
        let (_, fp8) = fp8_plans("qwen3-tiny", TpRank::SINGLE, Quant::Block { rows: 16, cols: 16 });
        let fp8 = fp8.unwrap();
        fp8.verify().unwrap();
        assert_eq!(Plan::from_json(&serde_json::to_string(&fp8).unwrap()).unwrap(), fp8);
        let mut unscaled = fp8.clone();
        unscaled.scaled.pop();
        assert!(unscaled.verify().unwrap_err().to_string().contains("cannot be cast to F8_E4M3"));
        let mut reshaped = fp8.clone();
        let s = reshaped.scaled[0];
        reshaped.destinations[s.scale as usize].shape[0] += 1;
        let text = reshaped.verify().unwrap_err().to_string();
        assert!(text.contains(&reshaped.destinations[s.scale as usize].name), "{text}");
        let mut into_scale = fp8.clone();
        let mut op = into_scale.ops[0].clone();
        op.dst = s.scale;
        into_scale.ops.push(op);
        assert!(into_scale.verify().unwrap_err().to_string().contains("never by a copy of its own"));
        let mut split = fp8.clone();
        let i = split.ops.iter().position(|op| op.dst == s.weight).unwrap();
        let mut head = split.ops[i].clone();
        head.extent[0] = 8;
        let mut tail = split.ops[i].clone();
        tail.extent[0] -= 8;
        tail.dst_start[0] += 8;
        tail.src_start[0] += 8;
        split.ops.splice(i..=i, [head, tail]);
        let text = split.verify().unwrap_err().to_string();
        assert!(text.contains("split its 16 x 16 blocks"), "{text}");
    }

    /// TP that cuts a 128-row block is refused by the planner, naming the weight, whether the
    /// cut is in the engine's tensor (a fused part) or in the checkpoint's (a rank's slice).
    #[test]
    fn the_planner_refuses_blocks_split_by_tp() {
        // Qwen3-30B-A3B's experts at TP 4: 192 rows of gate and of up a rank.
        let (_, fp8) = fp8_plans("qwen3-30b-a3b", TpRank::new(0, 4).unwrap(), Quant::Channel);
        let fp8 = fp8.unwrap();
        let bf16 = rank_plan("qwen3-30b-a3b", TpRank::new(1, 4).unwrap());
        let engine = QuantPlan::new(&bf16, Quant::Channel).unwrap().engine_manifest(&bf16);
        // The same engine shapes with 128-row block scales: gate and up split a block.
        let blocks: Vec<TensorSpec> = engine
            .iter()
            .map(|t| match t.name.strip_suffix("_scale") {
                Some(w) => {
                    let weight = engine.get(w).unwrap();
                    TensorSpec::new(format!("{w}_scale_inv"), DType::F32, scale_shape(&weight.shape, [128, 128]))
                }
                None => t.clone(),
            })
            .collect();
        let config = synthetic("qwen3-30b-a3b").unwrap();
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        let source = SourceSet::single(config.source_manifest());
        let err = plan(&source, &Manifest::new(blocks).unwrap(), &rules, TpRank::new(1, 4).unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("experts.w13_weight") && text.contains("split its 128 x 128 blocks"), "{text}");
        assert!(err.problems.iter().all(|p| p.kind() == "quant"), "{text}");
        // Per channel nothing splits.
        assert!(fp8.scaled.iter().all(|s| s.block[0] == 1));
    }

    /// A row-parallel weight whose rank holds 64 of a 128-column block: whole in the engine's
    /// tensor (its last, short block) but a cut of the checkpoint's block.
    #[test]
    fn a_tp_slice_ending_mid_block_is_refused() {
        use crate::layout::Split;
        use crate::rules::{Rule, RuleSet};
        let source =
            SourceSet::single(Manifest::new(vec![TensorSpec::new("w.weight", DType::BF16, vec![256, 128])]).unwrap());
        let rules =
            RuleSet::new(vec![Rule::rename("w.weight", "w.weight", Split::Dim { dim: 1, granule: 1 }).unwrap()])
                .unwrap();
        let tp = TpRank::new(1, 2).unwrap();
        let engine = Manifest::new(vec![
            TensorSpec::new("w.weight", DType::F8E4M3, vec![256, 64]),
            TensorSpec::new("w.weight_scale_inv", DType::F32, vec![2, 1]),
        ])
        .unwrap();
        let text = plan(&source, &engine, &rules, tp).unwrap_err().to_string();
        assert!(text.contains("`w.weight`") && text.contains("columns (0, 64)"), "{text}");
        // At TP 1 the same weight is whole blocks.
        let whole = Manifest::new(vec![
            TensorSpec::new("w.weight", DType::F8E4M3, vec![256, 128]),
            TensorSpec::new("w.weight_scale_inv", DType::F32, vec![2, 1]),
        ])
        .unwrap();
        let one = plan(&source, &whole, &rules, TpRank::SINGLE).unwrap();
        assert_eq!(one.scaled, vec![Scaled { weight: 0, scale: 1, block: [128, 128] }]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// Any matrix, TP split and block: the plan exists exactly when every rank's slice is
        /// whole blocks of the checkpoint's tensor; then every scale is covered once, buckets
        /// of any size cut only between blocks, and the engine holds the whole tensor's
        /// quantization of its slice; otherwise the error names the weight.
        #[test]
        fn quantized_plans_cover_every_scale_once_or_name_the_split(
            rows in 1u64..9, cols in 1u64..9, br in 1u64..5, bc in 1u64..5, tp in 1u32..4,
            row_parallel in proptest::prelude::any::<bool>(), bucket in 16u64..400, f32_source in proptest::prelude::any::<bool>(),
        ) {
            use crate::layout::Split;
            use crate::rules::{Rule, RuleSet};
            let (rows, cols) = (rows * u64::from(tp) * 2, cols * u64::from(tp) * 2);
            let dtype = if f32_source { DType::F32 } else { DType::BF16 };
            let source = SourceSet::single(Manifest::new(vec![TensorSpec::new("m.weight", dtype, vec![rows, cols])]).unwrap());
            let dim = usize::from(row_parallel);
            let rules = RuleSet::new(vec![Rule::rename("m.weight", "m.weight", Split::Dim { dim, granule: 1 }).unwrap()]).unwrap();
            let block = [br.next_power_of_two(), bc.next_power_of_two()];
            for rank in 0..tp {
                let tp = TpRank::new(rank, tp).unwrap();
                let mut local = vec![rows, cols];
                local[dim] /= u64::from(tp.size);
                let engine = Manifest::new(vec![
                    TensorSpec::new("m.weight", DType::F8E4M3, local.clone()),
                    TensorSpec::new("m.weight_scale_inv", DType::F32, scale_shape(&local, block)),
                ]).unwrap();
                let start = local[dim] * u64::from(rank);
                let whole = [rows, cols][dim];
                // A scale grid of one along a dim says only that the block is at least the
                // dim: the planner takes the default, 128.
                let inferred: Vec<u64> = (0..2).map(|a| if local[a].div_ceil(block[a]) == 1 { 128 } else { block[a] }).collect();
                let aligned = whole_blocks(start, start + local[dim], inferred[dim], whole);
                let planned = plan(&source, &engine, &rules, tp);
                proptest::prop_assert_eq!(planned.is_ok(), aligned, "{:?}", planned.as_ref().err().map(ToString::to_string));
                match planned {
                    Ok(p) => {
                        p.verify().unwrap();
                        let s = p.scaled[0];
                        let values: Vec<u8> = match dtype {
                            DType::F32 => (0..rows * cols).flat_map(|i| ((i as f32 * 0.37).sin() * (i % 7) as f32).to_le_bytes()).collect(),
                            _ => bf16_values(rank as usize, rows * cols),
                        };
                        let mut want_q = vec![0u8; (local[0] * local[1]) as usize];
                        let mut want_s = vec![0f32; p.destinations[1].numel() as usize];
                        let x: Vec<f32> = (0..local[0]).flat_map(|r| (0..local[1]).map(move |c| (r, c))).map(|(r, c)| {
                            let (gr, gc) = if dim == 0 { (r + start, c) } else { (r, c + start) };
                            let i = (gr * cols + gc) as usize;
                            match dtype {
                                DType::F32 => f32::from_le_bytes(values[i * 4..i * 4 + 4].try_into().unwrap()),
                                _ => half::bf16::from_le_bytes([values[i * 2], values[i * 2 + 1]]).to_f32(),
                            }
                        }).collect();
                        quantize(&x, &local, s.block, &mut want_q, &mut want_s);
                        let got = through_buckets(&p, &[&values], bucket.max(s.block[0] * s.block[1] * dtype.size()));
                        proptest::prop_assert_eq!(&got[0], &want_q);
                        let want_s: Vec<u8> = want_s.iter().flat_map(|v| v.to_le_bytes()).collect();
                        proptest::prop_assert_eq!(&got[1], &want_s);
                    }
                    Err(e) => {
                        let text = e.to_string();
                        proptest::prop_assert!(text.contains("`m.weight`") && text.contains("split its"), "{}", text);
                    }
                }
            }
        }
    }

    #[test]
    fn quantization_names_parse_and_print() {
        assert_eq!("block:128".parse::<Quant>().unwrap(), Quant::Block { rows: 128, cols: 128 });
        assert_eq!("block:1x64".parse::<Quant>().unwrap(), Quant::Block { rows: 1, cols: 64 });
        assert_eq!("channel".parse::<Quant>().unwrap(), Quant::Channel);
        for text in ["block:128", "block:1x64", "channel"] {
            assert_eq!(text.parse::<Quant>().unwrap().to_string(), text);
        }
        for bad in ["block:", "block:0", "block:12y", "tensor"] {
            assert!(bad.parse::<Quant>().is_err(), "{bad}");
        }
    }

    /// Every finite e4m3 value converts back to itself; halfway between two neighbours rounds
    /// to the even one; past the range is NaN; the sign is kept, -0 included.
    #[test]
    fn e4m3_rounds_to_nearest_even_and_round_trips() {
        for q in 0u8..=255 {
            let x = e4m3_to_f32(q);
            if q & 0x7f == 0x7f {
                assert!(x.is_nan());
                continue;
            }
            assert_eq!(e4m3(x), q, "{q:#04x} = {x}");
        }
        let mid = |a: u8| (e4m3_to_f32(a) + e4m3_to_f32(a + 1)) / 2.0;
        assert_eq!(e4m3(mid(0x40)), 0x40, "tie to even (down)");
        assert_eq!(e4m3(mid(0x41)), 0x42, "tie to even (up)");
        assert_eq!(e4m3(mid(0x00)), 0x00, "subnormal tie to even");
        assert_eq!(e4m3(448.0), 0x7e);
        assert_eq!(e4m3(-448.0), 0xfe);
        assert_eq!(e4m3(f32::INFINITY) & 0x7f, 0x7f);
        assert_eq!(e4m3(f32::NAN) & 0x7f, 0x7f);
        assert_eq!(e4m3(-0.0), 0x80);
        assert_eq!(e4m3(1e-30), 0x00);
    }

    /// A block's largest magnitude maps to 448; zeros get a tiny scale and zeros; a NaN
    /// poisons its block (and only it); an infinity makes its block's scale infinite.
    #[test]
    fn blocks_are_scaled_by_their_own_amax() {
        let shape = [2, 4];
        let mut x = vec![1.0, -2.0, 0.0, 0.0, 0.5, 0.25, 0.0, 0.0];
        let (mut q, mut s) = (vec![0; 8], vec![0.0; 2]);
        quantize(&x, &shape, [2, 2], &mut q, &mut s);
        assert_eq!(s, [2.0 / 448.0, AMAX_FLOOR / 448.0]);
        assert_eq!(q[1], 0xfe, "-2 is the block's -448");
        assert_eq!(&q[2..4], [0, 0]);
        x[6] = f32::NAN;
        x[0] = f32::INFINITY;
        quantize(&x, &shape, [2, 2], &mut q, &mut s);
        assert!(s[0].is_infinite() && s[1].is_nan(), "{s:?}");
        assert_eq!(q[0] & 0x7f, 0x7f, "inf / inf");
        assert_eq!(q[1], 0x80, "finite / inf is -0");
        assert!(q[2..4].iter().chain(&q[6..8]).all(|&b| b & 0x7f == 0x7f), "{q:?}");
    }

    /// Real shapes at the TP sizes they are served at: every projection and expert weight is
    /// quantized, each with a scale of the block grid, and the scales are each covered once;
    /// embeddings, norms, routers and the LM head are not.
    #[test]
    fn real_models_quantize_at_their_tp_sizes_with_every_scale_covered() {
        for (model, tp_size) in [("qwen3-8b", 8), ("qwen3-30b-a3b", 2)] {
            for tp in [TpRank { rank: 0, size: 1 }, TpRank { rank: tp_size - 1, size: tp_size }] {
                let plan = rank_plan(model, tp);
                let quant = QuantPlan::new(&plan, Quant::Block { rows: 128, cols: 128 }).unwrap();
                let quantized: Vec<&str> =
                    quant.targets.iter().map(|t| plan.destinations[t.weight as usize].name.as_str()).collect();
                assert!(quantized.iter().any(|n| n.contains("qkv_proj")), "{model} {tp}");
                assert!(!quantized.iter().any(|n| n.contains("norm") || n.contains("embed") || n.contains("lm_head")));
                assert!(!quantized.iter().any(|n| n.ends_with("mlp.gate.weight")), "routers stay");
                let engine = quant.engine_manifest(&plan);
                assert_eq!(engine.len(), plan.destinations.len() + quant.targets.len());
                for t in &quant.targets {
                    let w = &plan.destinations[t.weight as usize];
                    let n = w.shape.len();
                    assert_eq!(t.scale.name, format!("{}_scale_inv", w.name));
                    assert_eq!(t.scale.shape[n - 2], w.shape[n - 2].div_ceil(128), "{}", w.name);
                    assert_eq!(t.scale.shape[n - 1], w.shape[n - 1].div_ceil(128), "{}", w.name);
                }
            }
        }
    }

    /// A TP slice that is not a whole number of blocks is an error naming the tensor and the
    /// op's rows, never a scale silently shared across ranks.
    #[test]
    fn a_block_split_by_tp_names_the_tensor() {
        // Qwen3-8B at TP 8: k_proj's 1024 rows are 128 a rank; blocks of 256 split them.
        let plan = rank_plan("qwen3-8b", TpRank { rank: 1, size: 8 });
        let errors = QuantPlan::new(&plan, Quant::Block { rows: 256, cols: 128 }).unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let k = text.iter().find(|e| e.contains("layers.0.self_attn.qkv_proj.weight") && e.contains("k_proj"));
        assert!(k.is_some_and(|e| e.contains("256 x 128 blocks")), "{text:?}");
        // Qwen3-30B-A3B's experts at TP 4 are 192 rows of gate and of up a rank: vLLM refuses
        // its FP8 checkpoint there for the same reason.
        let plan_moe = rank_plan("qwen3-30b-a3b", TpRank { rank: 0, size: 4 });
        let errors = QuantPlan::new(&plan_moe, Quant::Block { rows: 128, cols: 128 }).unwrap_err();
        let first = errors[0].to_string();
        assert!(first.contains("experts.w13_weight") && first.contains("rows (0, 192)"), "{first}");
        // Per channel nothing splits.
        let channel = QuantPlan::new(&plan, Quant::Channel).unwrap();
        assert!(channel.targets.iter().all(|t| t.scale.name.ends_with("weight_scale") && t.block[0] == 1));
    }

    /// Every scale of a weight is written once: the coverage check sees a scale missed or
    /// written twice.
    #[test]
    fn scale_coverage_counts_every_block() {
        let mut written = vec![0u32; 6];
        mark_scales(&mut written, &[0, 128], &[256, 256], &[2, 3], [128, 128]);
        assert_eq!(written, [0, 1, 1, 0, 1, 1]);
        mark_scales(&mut written, &[0, 0], &[256, 100], &[2, 3], [128, 128]);
        assert_eq!(written, [1, 1, 1, 1, 1, 1]);
        let mut stacked = vec![0u32; 2 * 2];
        mark_scales(&mut stacked, &[1, 0, 0], &[1, 200, 64], &[2, 2, 1], [128, 128]);
        assert_eq!(stacked, [0, 0, 1, 1], "the second expert's two row blocks");
    }
}
