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
use crate::plan::Plan;
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
            let (rows, cols) = (spec.shape[n - 2], spec.shape[n - 1]);
            let block = quant.block(cols);
            let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
            let mut scale_shape = spec.shape[..n - 2].to_vec();
            scale_shape.extend(grid);
            let scale = TensorSpec::new(quant.scale_name(&spec.name), DType::F32, scale_shape);
            if names.contains(scale.name.as_str()) {
                errors.push(QuantError::ScaleExists { scale: scale.name.clone(), weight: spec.name.clone() });
                continue;
            }
            let mut written = vec![0u32; scale.numel() as usize];
            for &i in &ops_of[d] {
                let op = &plan.ops[i];
                let source = &plan.sources[op.src as usize].spec;
                if !matches!(source.dtype, DType::F32 | DType::BF16 | DType::F16) {
                    errors.push(QuantError::SourceDtype { destination: spec.name.clone(), dtype: source.dtype });
                    break;
                }
                let (r0, c0) = (op.dst_start[n - 2], op.dst_start[n - 1]);
                let (r1, c1) = (r0 + op.extent[n - 2], c0 + op.extent[n - 1]);
                let aligned =
                    |start: u64, end: u64, size: u64, dim: u64| start % size == 0 && (end % size == 0 || end == dim);
                if !aligned(r0, r1, block[0], rows) || !aligned(c0, c1, block[1], cols) {
                    errors.push(QuantError::SplitBlock {
                        destination: spec.name.clone(),
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
            if let Some((index, &count)) = written.iter().enumerate().find(|(_, &c)| c != 1) {
                if errors.is_empty() {
                    errors.push(QuantError::ScaleCoverage { scale: scale.name.clone(), index: index as u64, count });
                }
            }
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
    let value = if magnitude >= NAN_FROM {
        0x7f
    } else if magnitude < (121 << 23) {
        let shifted = (f32::from_bits(magnitude) + f32::from_bits(SUBNORMAL_BIAS)).to_bits();
        (shifted - SUBNORMAL_BIAS) as u8
    } else {
        let odd = (magnitude >> 20) & 1;
        let rebased = magnitude.wrapping_add(((7u32).wrapping_sub(127) << 23).wrapping_add(0x7_ffff)) + odd;
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
    let scaled = x / scale;
    // clamp keeps NaN; f32::clamp would too, but say so.
    let clamped = if scaled.is_nan() { scaled } else { scaled.clamp(-E4M3_MAX, E4M3_MAX) };
    e4m3(clamped)
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
    for m in 0..matrices {
        let base = m * rows * cols;
        for gr in 0..grid_r {
            for gc in 0..grid_c {
                let rows_of = gr * br..((gr + 1) * br).min(rows);
                let cols_of = gc * bc..((gc + 1) * bc).min(cols);
                let mut amax = 0f32;
                for r in rows_of.clone() {
                    for &v in &x[base + r * cols + cols_of.start..base + r * cols + cols_of.end] {
                        // NaN wins, as torch's amax propagates it.
                        amax = if v.is_nan() || amax.is_nan() { f32::NAN } else { amax.max(v.abs()) };
                    }
                }
                let scale = scale_of(amax);
                scales[(m * grid_r + gr) * grid_c + gc] = scale;
                for r in rows_of {
                    for c in cols_of.clone() {
                        q[base + r * cols + c] = quantize_one(x[base + r * cols + c], scale);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
