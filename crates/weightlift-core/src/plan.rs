//! Plans: for one receiver, the copy operations that realise the rules and layouts, with a
//! coverage proof. Built once, reused every update.

use std::collections::HashMap;
use std::fmt;
use std::io;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh64::Xxh64;

use crate::dtype::{Cast, DType};
use crate::layout::{Block, LayoutError, TpRank};
use crate::pattern::{Bindings, Pattern};
use crate::quant::{check_scaled, engine_scales, QuantError, Scaled};
use crate::region::{strided_copies, Strided};
use crate::rules::{Part, Rule, RuleSet, Segment, Stack};
use crate::spec::{Manifest, TensorSpec};

/// The tensors of the sending side: one manifest per sender rank. A name held by one sender
/// is a whole tensor. A name held by several is either placed (each piece says where it lies
/// in the whole: [`Placement`], as a DTensor's placement and global shape say) or, unplaced,
/// split along dim 0 (FSDP-style) with its pieces concatenated in sender order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSet {
    senders: Vec<Manifest>,
    /// Per sender, per tensor of its manifest: where it lies in its whole tensor (empty: none
    /// placed).
    placements: Vec<Vec<Option<Placement>>>,
}

/// Where a sender's piece lies in the whole tensor of its name: its start along every dim,
/// and the whole's shape. Pieces may be cut along any dims (FSDP dim-0 shards, even or not;
/// tensor-parallel rows or columns; a range of experts).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    pub offset: Vec<u64>,
    pub whole: Vec<u64>,
}

impl SourceSet {
    pub fn single(manifest: Manifest) -> SourceSet {
        SourceSet { senders: vec![manifest], placements: Vec::new() }
    }

    pub fn sharded(senders: Vec<Manifest>) -> SourceSet {
        SourceSet { senders, placements: Vec::new() }
    }

    /// Senders whose tensors may each carry a placement (None: a whole tensor, or an unplaced
    /// dim-0 piece); `placements[s]` is parallel to `senders[s]`.
    pub fn placed(senders: Vec<Manifest>, placements: Vec<Vec<Option<Placement>>>) -> Result<SourceSet, PlanError> {
        let mismatched = senders.iter().zip(&placements).position(|(m, p)| m.len() != p.len());
        if placements.len() != senders.len() || mismatched.is_some() {
            let sender = mismatched.unwrap_or(senders.len().min(placements.len()));
            let detail = format!("sender {sender}: one placement (or none) per tensor of its manifest");
            return Err(PlanError { problems: vec![Problem::BadPieces { source: String::new(), detail }] });
        }
        Ok(SourceSet { senders, placements })
    }

    pub fn senders(&self) -> &[Manifest] {
        &self.senders
    }

    /// Every piece of every sender, in sender order; a plan refers to pieces by this index.
    fn pieces(&self) -> Vec<SourcePiece> {
        let mut rows_so_far: HashMap<&str, u64> = HashMap::new();
        let mut pieces = Vec::new();
        for (sender, manifest) in self.senders.iter().enumerate() {
            for (i, spec) in manifest.iter().enumerate() {
                let placement = self.placements.get(sender).and_then(|p| p.get(i)).cloned().flatten();
                let sender = sender as u32;
                match placement {
                    Some(Placement { offset, whole }) => {
                        pieces.push(SourcePiece { sender, offset, whole: Some(whole), spec: spec.clone() })
                    }
                    None => {
                        let row = rows_so_far.entry(&spec.name).or_insert(0);
                        let mut offset = vec![0; spec.shape.len()];
                        if let Some(first) = offset.first_mut() {
                            *first = *row;
                        }
                        pieces.push(SourcePiece { sender, offset, whole: None, spec: spec.clone() });
                        *row += spec.shape.first().copied().unwrap_or(1);
                    }
                }
            }
        }
        pieces
    }
}

/// One tensor, or one piece of one, held by one sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePiece {
    pub sender: u32,
    /// Where the piece starts in the whole tensor, along every dim (zeros for a whole tensor).
    pub offset: Vec<u64>,
    /// The whole tensor's shape, for a placed piece (unplaced pieces add up along dim 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<Vec<u64>>,
    pub spec: TensorSpec,
}

/// Copy block `extent` (destination dimensions) from `src_start` of source piece `src` to
/// `dst_start` of destination `dst`, casting if their dtypes differ. A source with fewer
/// dimensions than the destination (one expert of a stack) aligns with its trailing ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CopyOp {
    pub src: u32,
    pub dst: u32,
    pub src_start: Vec<u64>,
    pub dst_start: Vec<u64>,
    pub extent: Vec<u64>,
}

impl CopyOp {
    pub fn numel(&self) -> u64 {
        self.extent.iter().product()
    }
}

/// The copy operations for one receiver, and what they are made from. A `Plan` value has
/// passed [`Plan::verify`]: every destination byte is written exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub tp: TpRank,
    pub sources: Vec<SourcePiece>,
    pub destinations: Vec<TensorSpec>,
    pub ops: Vec<CopyOp>,
    /// Source tensors dropped by an explicit `ignore` rule.
    pub ignored: Vec<String>,
    /// The destinations quantized to FP8 on the way, with their scale tensors, by weight
    /// (absent from the JSON of a plan with none, so such plans hash as they always did).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scaled: Vec<Scaled>,
}

/// Figures that describe a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub tp_rank: u32,
    pub tp_size: u32,
    pub source_tensors: usize,
    pub source_bytes: u64,
    pub destination_tensors: usize,
    pub destination_bytes: u64,
    /// Bytes this receiver gets: each op's block in the destination dtype.
    pub bytes_to_send: u64,
    pub ops: usize,
    /// Ops that need a strided (row-by-row) copy rather than one contiguous run.
    pub strided_ops: usize,
    pub cast_ops: usize,
    pub ignored: usize,
    pub covered: bool,
    pub plan_hash: String,
}

/// One thing wrong with a planning problem; each names the tensors involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A source tensor no rule claims.
    Unmapped {
        source: String,
    },
    /// A destination needs a source tensor the source does not have.
    MissingSource {
        destination: String,
        source: String,
    },
    /// A rule produces a parameter the engine does not have.
    NoDestination {
        destination: String,
        sources: Vec<String>,
    },
    /// An engine parameter that nothing writes.
    NotWritten {
        destination: String,
    },
    /// Two rules produce the same parameter.
    Duplicate {
        destination: String,
        rules: Vec<String>,
    },
    ShapeMismatch {
        destination: String,
        engine: Vec<u64>,
        planned: Vec<u64>,
    },
    DtypeMismatch {
        destination: String,
        source: String,
        from: DType,
        to: DType,
    },
    /// A part of a fused or stacked destination whose source does not have the shape the
    /// layout gives it. `shape` is what the part takes from `source` (its segment's, for a
    /// segment part).
    PartShape {
        destination: String,
        source: String,
        shape: Vec<u64>,
        expected: Vec<u64>,
        by: PartRule,
    },
    /// Parts that a rule declares equal (`equal_parts`, such as gate and up) but are not: each
    /// part's source tensor and shape, in order.
    UnequalParts {
        destination: String,
        dim: usize,
        parts: Vec<(String, Vec<u64>)>,
    },
    /// Parts that cannot be concatenated or stacked, or a split that does not apply.
    BadParts {
        destination: String,
        detail: String,
    },
    Layout {
        tensor: String,
        error: LayoutError,
    },
    /// Pieces of one source tensor that do not line up (or do not tile a placed whole).
    BadPieces {
        source: String,
        detail: String,
    },
    /// An op outside its tensors, or destination bytes written twice or never.
    Coverage {
        destination: String,
        detail: String,
    },
    /// An FP8 weight or its scales that cannot be written as the engine lays them out.
    Quant(QuantError),
}

/// What gives a part of a fused or stacked destination its shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartRule {
    /// The rule's `len` for the part, along the rule's `dim`.
    Len { dim: usize, len: u64 },
    /// The experts of a stack are alike: most have the expected shape, `like` among them.
    Experts { like: String },
}

impl Problem {
    /// What kind of problem this is, in snake case (`missing_source`, `shape_mismatch`, ...),
    /// for callers that sort problems without parsing their messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Unmapped { .. } => "unmapped",
            Problem::MissingSource { .. } => "missing_source",
            Problem::NoDestination { .. } => "no_destination",
            Problem::NotWritten { .. } => "not_written",
            Problem::Duplicate { .. } => "duplicate",
            Problem::ShapeMismatch { .. } => "shape_mismatch",
            Problem::DtypeMismatch { .. } => "dtype_mismatch",
            Problem::PartShape { .. } => "part_shape",
            Problem::UnequalParts { .. } => "unequal_parts",
            Problem::BadParts { .. } => "bad_parts",
            Problem::Layout { .. } => "layout",
            Problem::BadPieces { .. } => "bad_pieces",
            Problem::Coverage { .. } => "coverage",
            Problem::Quant(_) => "quant",
        }
    }

    /// The tensor names this problem is about.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Problem::Unmapped { source } | Problem::BadPieces { source, .. } => vec![source],
            Problem::MissingSource { destination, source }
            | Problem::DtypeMismatch { destination, source, .. }
            | Problem::PartShape { destination, source, .. } => vec![destination, source],
            Problem::UnequalParts { destination, parts, .. } => {
                std::iter::once(destination.as_str()).chain(parts.iter().map(|(name, _)| name.as_str())).collect()
            }
            Problem::NoDestination { destination, sources } => {
                std::iter::once(destination.as_str()).chain(sources.iter().map(String::as_str)).collect()
            }
            Problem::NotWritten { destination }
            | Problem::Duplicate { destination, .. }
            | Problem::ShapeMismatch { destination, .. }
            | Problem::BadParts { destination, .. }
            | Problem::Coverage { destination, .. } => vec![destination],
            Problem::Layout { tensor, .. } => vec![tensor],
            Problem::Quant(error) => vec![error.tensor()],
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unmapped { source } => {
                write!(f, "unmapped: source tensor `{source}` matches no rule (map it, or ignore it explicitly)")
            }
            Problem::MissingSource { destination, source } => {
                write!(f, "missing: `{destination}` needs source tensor `{source}`, which the source does not have")
            }
            Problem::NoDestination { destination, sources } => write!(
                f,
                "no destination: `{destination}` (from {}) is not a parameter of the engine",
                sources.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
            ),
            Problem::NotWritten { destination } => {
                write!(f, "not written: engine parameter `{destination}` gets no source tensor")
            }
            Problem::Duplicate { destination, rules } => {
                write!(f, "duplicated: `{destination}` is produced by several rules: {}", rules.join("; "))
            }
            Problem::ShapeMismatch { destination, engine, planned } => write!(
                f,
                "shape mismatch: `{destination}` is {engine:?} in the engine but the sources make {planned:?}"
            ),
            Problem::DtypeMismatch { destination, source, from, to } => {
                write!(f, "dtype mismatch: `{source}` is {from}, which cannot be cast to {to} for `{destination}`")
            }
            Problem::PartShape { destination, source, shape, expected, by } => {
                write!(f, "part shape: `{source}` is {shape:?}, but ")?;
                match by {
                    PartRule::Len { dim, len } => write!(
                        f,
                        "`{destination}` needs it to be {expected:?} (its rule gives the part {len} along dim {dim})"
                    ),
                    PartRule::Experts { like } => {
                        write!(f, "the other experts of `{destination}` are {expected:?} (as `{like}` is)")
                    }
                }
            }
            Problem::UnequalParts { destination, dim, parts } => write!(
                f,
                "unequal parts: `{destination}` is made of equal parts along dim {dim}, but {}",
                parts.iter().map(|(name, shape)| format!("`{name}` is {shape:?}")).collect::<Vec<_>>().join(", ")
            ),
            Problem::BadParts { destination, detail } => write!(f, "bad parts for `{destination}`: {detail}"),
            Problem::Layout { tensor, error } => write!(f, "layout: `{tensor}`: {error}"),
            Problem::BadPieces { source, detail } => write!(f, "bad pieces of `{source}`: {detail}"),
            Problem::Coverage { destination, detail } => write!(f, "coverage: `{destination}`: {detail}"),
            Problem::Quant(error) => write!(f, "quantization: {error}"),
        }
    }
}

/// Planning failed; every problem found is listed, not just the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PlanError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "planning failed with {} problem(s):", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// A stored plan that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoredPlanError {
    #[error("not a plan: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the stored plan does not verify: {0}")]
    Invalid(#[from] PlanError),
}

/// A whole source tensor, possibly made of pieces from several senders.
struct Logical {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    /// (piece index, start, shape): each piece's box in the whole tensor.
    pieces: Vec<(u32, Vec<u64>, Vec<u64>)>,
}

fn logical_tensors(pieces: &[SourcePiece], problems: &mut Vec<Problem>) -> Vec<Logical> {
    let mut tensors: Vec<Logical> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut placed = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let spec = &piece.spec;
        let bad = |detail: String| Problem::BadPieces { source: spec.name.clone(), detail };
        let Some(&t) = by_name.get(&spec.name) else {
            by_name.insert(spec.name.clone(), tensors.len());
            let shape = piece.whole.clone().unwrap_or_else(|| spec.shape.clone());
            if piece.whole.is_some() {
                placed.push(tensors.len());
            }
            tensors.push(Logical {
                name: spec.name.clone(),
                dtype: spec.dtype,
                shape,
                pieces: vec![(i as u32, piece.offset.clone(), spec.shape.clone())],
            });
            continue;
        };
        let whole = &mut tensors[t];
        let first_placed = pieces[whole.pieces[0].0 as usize].whole.is_some();
        let detail = if spec.dtype != whole.dtype {
            Some(format!("sender {} holds {} but an earlier piece is {}", piece.sender, spec.dtype, whole.dtype))
        } else if first_placed != piece.whole.is_some() {
            Some(format!("sender {} places its piece and another sender does not (or the reverse)", piece.sender))
        } else if let Some(shape) = &piece.whole {
            (shape != &whole.shape).then(|| {
                format!(
                    "sender {} places it in a whole of {:?}, an earlier piece in {:?}",
                    piece.sender, shape, whole.shape
                )
            })
        } else if spec.shape.is_empty() {
            Some("a scalar cannot be split along dim 0".to_string())
        } else if spec.shape[1..] != whole.shape[1..] {
            Some(format!(
                "sender {} holds {:?} but an earlier piece is {:?}: only dim 0 may differ",
                piece.sender, spec.shape, whole.shape
            ))
        } else {
            None
        };
        match detail {
            Some(detail) => problems.push(bad(detail)),
            None => {
                // An unplaced piece's offset is its rows so far (`SourceSet::pieces`).
                whole.pieces.push((i as u32, piece.offset.clone(), spec.shape.clone()));
                if piece.whole.is_none() {
                    whole.shape[0] += spec.shape[0];
                }
            }
        }
    }
    // Placed pieces must tile their whole: each inside it, none overlapping, nothing left out.
    for t in placed {
        let tensor = &tensors[t];
        if let Some(detail) = tiling_problem(tensor, pieces) {
            problems.push(Problem::BadPieces { source: tensor.name.clone(), detail });
        }
    }
    tensors
}

/// Why the placed pieces of `tensor` do not tile it exactly, if they do not.
fn tiling_problem(tensor: &Logical, pieces: &[SourcePiece]) -> Option<String> {
    let sender = |i: u32| pieces[i as usize].sender;
    for (i, start, shape) in &tensor.pieces {
        let inside = start.len() == tensor.shape.len()
            && shape.len() == tensor.shape.len()
            && start
                .iter()
                .zip(shape)
                .zip(&tensor.shape)
                .all(|((&s, &n), &w)| s.checked_add(n).is_some_and(|e| e <= w));
        if !inside {
            return Some(format!(
                "sender {}'s piece {:?} at {:?} does not lie inside the whole {:?}",
                sender(*i),
                shape,
                start,
                tensor.shape
            ));
        }
    }
    for (a, (i, sa, na)) in tensor.pieces.iter().enumerate() {
        for (j, sb, nb) in &tensor.pieces[a + 1..] {
            let overlap =
                sa.iter().zip(na).zip(sb.iter().zip(nb)).all(|((&s1, &n1), (&s2, &n2))| s1 < s2 + n2 && s2 < s1 + n1);
            if overlap && na.iter().all(|&n| n > 0) && nb.iter().all(|&n| n > 0) {
                return Some(format!("the pieces of senders {} and {} overlap", sender(*i), sender(*j)));
            }
        }
    }
    let covered: u64 = tensor.pieces.iter().map(|(_, _, n)| n.iter().product::<u64>()).sum();
    let whole: u64 = tensor.shape.iter().product();
    (covered != whole).then(|| format!("the pieces hold {covered} of its {whole} elements"))
}

/// A rule in the uniform shape planning works with (a tie is a one-part map).
struct Template<'a> {
    parts: Vec<Part>,
    dim: usize,
    stack: Option<&'a Stack>,
    equal_parts: bool,
}

fn template(rule: &Rule) -> Option<Template<'_>> {
    match rule {
        Rule::Map { parts, dim, stack, equal_parts, .. } => {
            Some(Template { parts: parts.clone(), dim: *dim, stack: stack.as_ref(), equal_parts: *equal_parts })
        }
        Rule::Tie { from, split, .. } => Some(Template {
            parts: vec![Part { from: from.clone(), split: *split, segment: None, len: None }],
            dim: 0,
            stack: None,
            equal_parts: false,
        }),
        Rule::Ignore { .. } => None,
    }
}

/// One destination parameter as the rules build it, before it meets the engine's manifest.
struct Target {
    name: String,
    rule: usize,
    bindings: Bindings,
    /// `sources[expert][part]`: logical tensor index (one "expert" when not stacked).
    sources: Vec<Vec<Option<usize>>>,
}

/// What a part takes from its source: the shape of its segment (the whole source when not
/// segmented) and, for a segment, the dim and index where it starts.
struct PartSource {
    shape: Vec<u64>,
    segment_start: Option<(usize, u64)>,
}

/// A target with its local shape and the blocks that fill it.
struct Resolved {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    /// (logical source, block of the source, start in the destination)
    copies: Vec<(usize, Block, Vec<u64>)>,
}

/// What planning needs to know about the destination.
enum Destination<'a> {
    /// The engine's parameters for this rank: ties apply only to names it has.
    Engine(&'a Manifest),
    /// Derive what the engine should hold; `untied` adds the parameters tie rules fill (an
    /// engine that keeps its own lm_head).
    Derive { untied: bool },
}

struct Planner<'a> {
    rules: &'a RuleSet,
    templates: Vec<Option<Template<'a>>>,
    tp: TpRank,
    pieces: Vec<SourcePiece>,
    logical: Vec<Logical>,
    problems: Vec<Problem>,
}

impl<'a> Planner<'a> {
    fn new(source: &SourceSet, rules: &'a RuleSet, tp: TpRank) -> Planner<'a> {
        let pieces = source.pieces();
        let mut problems = Vec::new();
        let logical = logical_tensors(&pieces, &mut problems);
        let templates = rules.rules().iter().map(template).collect();
        Planner { rules, templates, tp, pieces, logical, problems }
    }

    /// Groups source tensors into destination targets by the first rule that claims each.
    fn targets(&mut self, destination: &Destination) -> (Vec<Target>, Vec<String>) {
        let mut targets: Vec<Target> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        let mut ignored = Vec::new();
        'sources: for (li, tensor) in self.logical.iter().enumerate() {
            let components: Vec<&str> = tensor.name.split('.').collect();
            for (ri, rule) in self.rules.rules().iter().enumerate() {
                match rule {
                    Rule::Ignore { from } => {
                        if from.matches_components(&components).is_some() {
                            ignored.push(tensor.name.clone());
                            continue 'sources;
                        }
                    }
                    Rule::Tie { .. } => {}
                    Rule::Map { to, parts, stack, .. } => {
                        // A source fills the first part it matches, and, when that part is a
                        // segment of it, every later segment part it matches too.
                        let mut claimed = false;
                        for (pi, part) in parts.iter().enumerate() {
                            if claimed && part.segment.is_none() {
                                continue;
                            }
                            let Some(bindings) = part.from.matches_components(&components) else { continue };
                            let (expert, bindings) = match stack {
                                None => (0, bindings),
                                Some(stack) => {
                                    let value = bindings.get(&stack.var).unwrap_or_default();
                                    match value.parse::<usize>() {
                                        Ok(e) => (e, bindings.without(&stack.var)),
                                        Err(_) => {
                                            self.problems.push(Problem::BadParts {
                                                destination: to.as_str().to_string(),
                                                detail: format!(
                                                    "`{}`: expert index `{value}` is not an integer",
                                                    tensor.name
                                                ),
                                            });
                                            continue 'sources;
                                        }
                                    }
                                }
                            };
                            let name = fill(to, &bindings);
                            let ti = *by_name.entry(name.clone()).or_insert_with(|| {
                                targets.push(Target { name, rule: ri, bindings, sources: Vec::new() });
                                targets.len() - 1
                            });
                            let target = &mut targets[ti];
                            if target.rule != ri {
                                let rules = vec![self.rules.rules()[target.rule].describe(), rule.describe()];
                                let problem = Problem::Duplicate { destination: target.name.clone(), rules };
                                if !self.problems.contains(&problem) {
                                    self.problems.push(problem);
                                }
                                continue 'sources;
                            }
                            if target.sources.len() <= expert {
                                target.sources.resize(expert + 1, vec![None; parts.len()]);
                            }
                            target.sources[expert][pi] = Some(li);
                            if part.segment.is_none() {
                                continue 'sources;
                            }
                            claimed = true;
                        }
                        if claimed {
                            continue 'sources;
                        }
                    }
                }
            }
            self.problems.push(Problem::Unmapped { source: tensor.name.clone() });
        }

        // Ties fill only what no other rule wrote, and only where the engine wants it.
        for (ri, rule) in self.rules.rules().iter().enumerate() {
            let Rule::Tie { from, to, .. } = rule else { continue };
            for (li, tensor) in self.logical.iter().enumerate() {
                let Some(bindings) = from.matches(&tensor.name) else { continue };
                let name = fill(to, &bindings);
                let wanted = match destination {
                    Destination::Engine(manifest) => manifest.get(&name).is_some(),
                    Destination::Derive { untied } => *untied,
                };
                if wanted && !by_name.contains_key(&name) {
                    by_name.insert(name.clone(), targets.len());
                    targets.push(Target { name, rule: ri, bindings, sources: vec![vec![Some(li)]] });
                }
            }
        }
        (targets, ignored)
    }

    /// Computes a target's local shape and copies; records problems and returns None if any.
    fn resolve(&mut self, target: &Target) -> Option<Resolved> {
        let t = self.templates[target.rule].as_ref().expect("targets come from map and tie rules");
        let checked = self
            .sources_present(target, t)
            .and_then(|()| self.part_sources(target, t))
            .and_then(|parts| self.check_part_sizes(target, t, parts));
        let parts = match checked {
            Ok(parts) => parts,
            Err(problems) => {
                self.problems.extend(problems);
                return None;
            }
        };
        let experts = target.sources.len();
        let bad = |detail: String| Problem::BadParts { destination: target.name.clone(), detail };

        // Each part's split for this rank, found at its segment's offset.
        let mut part_blocks: Vec<Block> = Vec::with_capacity(t.parts.len());
        for (pi, (part, source)) in t.parts.iter().zip(&parts).enumerate() {
            match part.split.slice(&source.shape, self.tp) {
                Ok(mut block) => {
                    if let Some((dim, start)) = source.segment_start {
                        block.start[dim] += start;
                    }
                    part_blocks.push(block)
                }
                Err(error) => {
                    let tensor = self.part_tensor(target, pi).name.clone();
                    self.problems.push(Problem::Layout { tensor, error });
                    return None;
                }
            }
        }

        // Concatenate the parts' local blocks along `dim`.
        let mut fused: Vec<u64> = part_blocks[0].extent.clone();
        if t.dim >= fused.len() {
            self.problems.push(bad(format!("cannot concatenate {}-d parts along dim {}", fused.len(), t.dim)));
            return None;
        }
        let mut offsets = vec![0u64];
        for (pi, block) in part_blocks.iter().enumerate().skip(1) {
            let ext = &block.extent;
            let agrees = ext.len() == fused.len() && (0..ext.len()).all(|d| d == t.dim || ext[d] == fused[d]);
            if !agrees {
                let name = &self.logical[target.sources[0][pi].expect("checked above")].name;
                self.problems.push(bad(format!(
                    "`{name}` has local shape {ext:?}, which does not concatenate with {fused:?} along dim {}",
                    t.dim
                )));
                return None;
            }
            offsets.push(fused[t.dim]);
            fused[t.dim] += ext[t.dim];
        }

        // Experts this rank holds: all of them, or an even, contiguous range with EP.
        let local_experts = match t.stack {
            Some(stack) if stack.expert_parallel => {
                let size = self.tp.size as usize;
                if experts % size != 0 {
                    let error =
                        LayoutError::NotDivisible { dim: 0, len: experts as u64, granule: 1, size: self.tp.size };
                    self.problems.push(Problem::Layout { tensor: target.name.clone(), error });
                    return None;
                }
                let per_rank = experts / size;
                let first = self.tp.rank as usize * per_rank;
                first..first + per_rank
            }
            _ => 0..experts,
        };
        let stacked = t.stack.is_some();
        let shape: Vec<u64> = if stacked {
            std::iter::once(local_experts.len() as u64).chain(fused.iter().copied()).collect()
        } else {
            fused
        };

        let mut copies = Vec::with_capacity(local_experts.len() * t.parts.len());
        for (local, expert) in local_experts.enumerate() {
            for (pi, block) in part_blocks.iter().enumerate() {
                let mut dst_start: Vec<u64> = vec![0; block.extent.len()];
                dst_start[t.dim] = offsets[pi];
                if stacked {
                    dst_start.insert(0, local as u64);
                }
                let li = target.sources[expert][pi].expect("checked above");
                copies.push((li, block.clone(), dst_start));
            }
        }
        let dtype = self.logical[target.sources[0][0].expect("checked above")].dtype;
        Some(Resolved { name: target.name.clone(), dtype, shape, copies })
    }

    /// Fails naming every part of `target` whose source tensor is absent.
    fn sources_present(&self, target: &Target, t: &Template) -> Result<(), Vec<Problem>> {
        let mut problems = Vec::new();
        for (expert, slots) in target.sources.iter().enumerate() {
            for (pi, _) in slots.iter().enumerate().filter(|(_, slot)| slot.is_none()) {
                let mut bindings = target.bindings.clone();
                if let Some(stack) = t.stack {
                    bindings = bindings.with(&stack.var, expert.to_string());
                }
                let source = fill(&t.parts[pi].from, &bindings);
                problems.push(Problem::MissingSource { destination: target.name.clone(), source });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    /// The source tensor of part `pi` of the first expert (the only one when not stacked).
    fn part_tensor(&self, target: &Target, pi: usize) -> &Logical {
        &self.logical[target.sources[0][pi].expect("sources checked present")]
    }

    /// What each part takes from its source. Every expert's tensor for a part must have one
    /// shape; the segments of a segment part must divide its source.
    fn part_sources(&self, target: &Target, t: &Template) -> Result<Vec<PartSource>, Vec<Problem>> {
        let unlike: Vec<Problem> = (0..t.parts.len()).flat_map(|pi| self.unlike_experts(target, pi)).collect();
        if !unlike.is_empty() {
            return Err(unlike);
        }
        let mut parts = Vec::with_capacity(t.parts.len());
        for (pi, part) in t.parts.iter().enumerate() {
            let tensor = self.part_tensor(target, pi);
            let mut shape = tensor.shape.clone();
            let mut segment_start = None;
            if let Some(Segment { dim, index, count }) = part.segment {
                match shape.get(dim) {
                    Some(&len) if len % count == 0 => {
                        shape[dim] = len / count;
                        segment_start = Some((dim, index * (len / count)));
                    }
                    _ => {
                        return Err(vec![Problem::BadParts {
                            destination: target.name.clone(),
                            detail: format!(
                                "`{}` ({:?}) has no dim {dim} of {count} equal segments",
                                tensor.name, tensor.shape
                            ),
                        }]);
                    }
                }
            }
            parts.push(PartSource { shape, segment_start });
        }
        Ok(parts)
    }

    /// The experts whose tensor for part `pi` differs in shape from most experts' (from the
    /// first expert's, when no shape is the most common).
    fn unlike_experts(&self, target: &Target, pi: usize) -> Vec<Problem> {
        let tensors: Vec<&Logical> =
            target.sources.iter().map(|slots| &self.logical[slots[pi].expect("sources checked present")]).collect();
        if tensors.iter().all(|t| t.shape == tensors[0].shape) {
            return Vec::new();
        }
        let count = |shape: &[u64]| tensors.iter().filter(|t| t.shape == shape).count();
        let mut common = tensors[0];
        for tensor in &tensors[1..] {
            if count(&tensor.shape) > count(&common.shape) {
                common = tensor;
            }
        }
        tensors
            .iter()
            .filter(|t| t.shape != common.shape)
            .map(|t| Problem::PartShape {
                destination: target.name.clone(),
                source: t.name.clone(),
                shape: t.shape.clone(),
                expected: common.shape.clone(),
                by: PartRule::Experts { like: common.name.clone() },
            })
            .collect()
    }

    /// The parts, unless some length along the rule's dim is not the part's `len` or the rule
    /// declares the parts equal and they are not: then the parts at fault are named.
    fn check_part_sizes(
        &self,
        target: &Target,
        t: &Template,
        parts: Vec<PartSource>,
    ) -> Result<Vec<PartSource>, Vec<Problem>> {
        let mut problems = Vec::new();
        for (pi, (part, source)) in t.parts.iter().zip(&parts).enumerate() {
            let (Some(len), Some(&got)) = (part.len, source.shape.get(t.dim)) else { continue };
            if got != len {
                let mut expected = source.shape.clone();
                expected[t.dim] = len;
                problems.push(Problem::PartShape {
                    destination: target.name.clone(),
                    source: self.part_tensor(target, pi).name.clone(),
                    shape: source.shape.clone(),
                    expected,
                    by: PartRule::Len { dim: t.dim, len },
                });
            }
        }
        if t.equal_parts && parts.iter().any(|p| p.shape != parts[0].shape) {
            problems.push(Problem::UnequalParts {
                destination: target.name.clone(),
                dim: t.dim,
                parts: parts
                    .iter()
                    .enumerate()
                    .map(|(pi, p)| (self.part_tensor(target, pi).name.clone(), p.shape.clone()))
                    .collect(),
            });
        }
        if problems.is_empty() {
            Ok(parts)
        } else {
            Err(problems)
        }
    }

    /// The distinct source tensors a target is made of, in order.
    fn source_names(&self, target: &Target) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for li in target.sources.iter().flatten().flatten() {
            let name = &self.logical[*li].name;
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names
    }

    /// Splits a copy of a whole logical tensor's block into ops on its pieces.
    fn ops_for(&self, li: usize, block: &Block, dst: u32, dst_start: &[u64], out: &mut Vec<CopyOp>) {
        let tensor = &self.logical[li];
        let lead = dst_start.len() - block.extent.len();
        let extent: Vec<u64> = std::iter::repeat_n(1, lead).chain(block.extent.iter().copied()).collect();
        if extent.contains(&0) {
            return;
        }
        if tensor.pieces.len() == 1 && tensor.pieces[0].2 == tensor.shape {
            let src = tensor.pieces[0].0;
            out.push(CopyOp { src, dst, src_start: block.start.clone(), dst_start: dst_start.to_vec(), extent });
            return;
        }
        // The block's intersection with each piece's box, along every dim.
        'pieces: for (piece, start, shape) in &tensor.pieces {
            let mut src_start = Vec::with_capacity(start.len());
            let mut piece_dst = dst_start.to_vec();
            let mut piece_extent = extent.clone();
            for d in 0..start.len() {
                let (lo, hi) = (block.start[d], block.start[d] + block.extent[d]);
                let (a, b) = (lo.max(start[d]), hi.min(start[d] + shape[d]));
                if a >= b {
                    continue 'pieces;
                }
                src_start.push(a - start[d]);
                piece_dst[lead + d] += a - lo;
                piece_extent[lead + d] = b - a;
            }
            out.push(CopyOp { src: *piece, dst, src_start, dst_start: piece_dst, extent: piece_extent });
        }
    }

    fn fail_if_problems(&mut self) -> Result<(), PlanError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(PlanError { problems: std::mem::take(&mut self.problems) })
        }
    }
}

fn fill(pattern: &Pattern, bindings: &Bindings) -> String {
    // Rule sets are validated: every variable of a destination is bound by each part.
    pattern.fill(bindings).expect("validated rule binds every variable")
}

/// Plans the update of one engine rank holding `destination` from `source` under `rules`.
/// Fails listing every problem at once; a returned plan has passed [`Plan::verify`].
pub fn plan(source: &SourceSet, destination: &Manifest, rules: &RuleSet, tp: TpRank) -> Result<Plan, PlanError> {
    let mut planner = Planner::new(source, rules, tp);
    let (targets, ignored) = planner.targets(&Destination::Engine(destination));
    let mut written = vec![false; destination.len()];
    // FP8 weights with a scale tensor beside them: quantized on the way from float sources,
    // their scales written from the weights' ops. From FP8 sources (a trainer that quantizes
    // itself and sends its scales) both are copied as they are.
    let already_fp8: std::collections::HashSet<&str> = targets
        .iter()
        .filter(|t| {
            let mut dtypes = t.sources.iter().flatten().flatten().map(|&li| planner.logical[li].dtype);
            dtypes.next().is_some_and(|first| first == DType::F8E4M3 && dtypes.all(|d| d == DType::F8E4M3))
        })
        .map(|t| t.name.as_str())
        .collect();
    let (scaled, errors) = engine_scales(destination, |weight| !already_fp8.contains(weight));
    planner.problems.extend(errors.into_iter().map(Problem::Quant));
    let (mut quantized, mut is_scale) = (vec![false; destination.len()], vec![false; destination.len()]);
    for s in &scaled {
        quantized[s.weight as usize] = true;
        is_scale[s.scale as usize] = true;
        written[s.scale as usize] = true;
    }
    let mut ops = Vec::new();
    for target in &targets {
        // Sources for a parameter the engine lacks are reported as themselves, not as the
        // partners they are missing (an extra layer's up_proj is not a missing gate_proj).
        let Some(dst) = destination.position(&target.name) else {
            let sources = planner.source_names(target);
            planner.problems.push(Problem::NoDestination { destination: target.name.clone(), sources });
            continue;
        };
        if is_scale[dst] {
            let scale = destination.specs()[dst].name.clone();
            planner.problems.push(Problem::Quant(QuantError::ScaleWritten { scale }));
            continue;
        }
        // A parameter whose sources have problems is still accounted for, not "not written".
        written[dst] = true;
        let Some(resolved) = planner.resolve(target) else { continue };
        let spec = &destination.specs()[dst];
        if spec.shape != resolved.shape {
            planner.problems.push(Problem::ShapeMismatch {
                destination: resolved.name,
                engine: spec.shape.clone(),
                planned: resolved.shape,
            });
            continue;
        }
        let mut castable = true;
        for (li, _, _) in &resolved.copies {
            let tensor = &planner.logical[*li];
            if !casts(tensor.dtype, spec.dtype, quantized[dst]) {
                let problem = Problem::DtypeMismatch {
                    destination: resolved.name.clone(),
                    source: tensor.name.clone(),
                    from: tensor.dtype,
                    to: spec.dtype,
                };
                if !planner.problems.contains(&problem) {
                    planner.problems.push(problem);
                }
                castable = false;
            }
        }
        if castable {
            for (li, block, dst_start) in &resolved.copies {
                planner.ops_for(*li, block, dst as u32, dst_start, &mut ops);
            }
        }
    }
    for (spec, written) in destination.iter().zip(&written) {
        if !written {
            planner.problems.push(Problem::NotWritten { destination: spec.name.clone() });
        }
    }
    planner.fail_if_problems()?;
    let plan = Plan { tp, sources: planner.pieces, destinations: destination.specs().to_vec(), ops, ignored, scaled };
    plan.verify()?;
    Ok(plan)
}

/// Whether a copy may convert `from` into `to`: a cast [`DType::casts_to`] allows, or a
/// float quantized into an FP8 weight that has scales.
fn casts(from: DType, to: DType, quantized: bool) -> bool {
    from.casts_to(to) || (quantized && to == DType::F8E4M3 && matches!(from, DType::F32 | DType::BF16 | DType::F16))
}

/// The parameters an engine rank should hold for `source` under `rules`: what `plan` expects
/// as its destination. `dtype` overrides the sources' dtype (e.g. f32 master weights into a
/// bf16 engine); `untied` adds the parameters that tie rules fill (an engine with its own
/// lm_head while the source ties it to the embeddings).
pub fn destination_manifest(
    source: &SourceSet,
    rules: &RuleSet,
    tp: TpRank,
    dtype: Option<DType>,
    untied: bool,
) -> Result<Manifest, PlanError> {
    let mut planner = Planner::new(source, rules, tp);
    let (targets, _) = planner.targets(&Destination::Derive { untied });
    let mut specs = Vec::with_capacity(targets.len());
    for target in &targets {
        if let Some(r) = planner.resolve(target) {
            specs.push(TensorSpec::new(r.name, dtype.unwrap_or(r.dtype), r.shape));
        }
    }
    planner.fail_if_problems()?;
    Manifest::new(specs).map_err(|e| PlanError {
        problems: vec![Problem::Coverage { destination: "<derived manifest>".into(), detail: e.to_string() }],
    })
}

impl Plan {
    /// The quantized weight (and its scales) that `dst` is, if it is one.
    pub fn scaled_of(&self, dst: u32) -> Option<&Scaled> {
        let i = self.scaled.binary_search_by_key(&dst, |s| s.weight).ok()?;
        Some(&self.scaled[i])
    }

    /// Per destination: whether it is the scale tensor of a quantized weight (written from
    /// that weight's ops, with none of its own).
    pub fn scale_tensors(&self) -> Vec<bool> {
        let mut out = vec![false; self.destinations.len()];
        for s in &self.scaled {
            out[s.scale as usize] = true;
        }
        out
    }

    /// The dtype of an op's block as it travels: the destination's, but a quantized op's
    /// block travels in its source's dtype and is quantized where it is written (where its
    /// whole blocks are, for their scales).
    pub fn payload_dtype(&self, op: &CopyOp) -> DType {
        match self.scaled_of(op.dst) {
            Some(_) => self.sources[op.src as usize].spec.dtype,
            None => self.destinations[op.dst as usize].dtype,
        }
    }

    /// The dtype conversion of an op, if its source and destination dtypes differ.
    pub fn cast(&self, op: &CopyOp) -> Option<Cast> {
        let (from, to) = (self.sources[op.src as usize].spec.dtype, self.destinations[op.dst as usize].dtype);
        (from != to).then_some(Cast { from, to })
    }

    /// The op as 2-D strided copies, in elements.
    pub fn strided(&self, op: &CopyOp) -> Vec<Strided> {
        let src = &self.sources[op.src as usize].spec.shape;
        let dst = &self.destinations[op.dst as usize].shape;
        strided_copies(src, &op.src_start, dst, &op.dst_start, &op.extent)
    }

    /// For each destination: whether its ops, in plan order, write it front to back in
    /// contiguous runs. Then a digest can be streamed over the bytes as they arrive (every
    /// preset's plans are like this); otherwise the tensor must be digested once complete.
    pub fn sequential_destinations(&self) -> Vec<bool> {
        let mut next: Vec<Option<u64>> = vec![Some(0); self.destinations.len()];
        for op in &self.ops {
            let d = op.dst as usize;
            let copies = self.strided(op);
            if self.scaled_of(op.dst).is_some() {
                // Quantized in whole blocks, not front to back: digested once complete.
                next[d] = None;
                continue;
            }
            next[d] = match (next[d], copies.as_slice()) {
                (Some(at), [one]) if one.dst_offset == at && (one.rows <= 1 || one.dst_stride == one.row_elems) => {
                    Some(at + one.numel())
                }
                _ => None,
            };
        }
        next.iter().zip(&self.destinations).map(|(n, d)| *n == Some(d.numel())).collect()
    }

    /// The plan of `destinations` alone (plan indices, in the order the new plan numbers
    /// them), with every source kept at its index: what one bucket of a streaming update
    /// writes. Every destination keeps all its ops, so the part still verifies.
    pub fn restricted_to(&self, destinations: &[u32]) -> Plan {
        let mut renumbered = vec![None; self.destinations.len()];
        for (new, &d) in destinations.iter().enumerate() {
            renumbered[d as usize] = Some(new as u32);
        }
        let ops = self
            .ops
            .iter()
            .filter_map(|op| renumbered[op.dst as usize].map(|dst| CopyOp { dst, ..op.clone() }))
            .collect();
        let mut scaled: Vec<Scaled> = self
            .scaled
            .iter()
            .filter_map(|s| {
                let (weight, scale) = (renumbered[s.weight as usize]?, renumbered[s.scale as usize]?);
                Some(Scaled { weight, scale, block: s.block })
            })
            .collect();
        scaled.sort_unstable_by_key(|s| s.weight);
        Plan {
            tp: self.tp,
            sources: self.sources.clone(),
            destinations: destinations.iter().map(|&d| self.destinations[d as usize].clone()).collect(),
            ops,
            ignored: Vec::new(),
            scaled,
        }
    }

    /// The senders whose pieces this plan reads: one more than the highest sender index.
    pub fn senders(&self) -> u32 {
        self.sources.iter().map(|p| p.sender + 1).max().unwrap_or(1)
    }

    /// What sender `sender` of a plan over several moves: its pieces alone, renumbered from 0
    /// in the order of its manifest (so its own tensors index them), and the ops that read
    /// them; every destination kept at its index. A share does not verify on its own: the
    /// bytes other senders write are missing, and a destination it writes only part of is
    /// digested as that part ([`Plan::share_bytes`]).
    pub fn share_of(&self, sender: u32) -> Plan {
        let mut renumbered = vec![None; self.sources.len()];
        let mut sources = Vec::new();
        for (i, piece) in self.sources.iter().enumerate() {
            if piece.sender == sender {
                renumbered[i] = Some(sources.len() as u32);
                sources.push(SourcePiece { sender: 0, ..piece.clone() });
            }
        }
        let ops = self
            .ops
            .iter()
            .filter_map(|op| renumbered[op.src as usize].map(|src| CopyOp { src, ..op.clone() }))
            .collect();
        Plan {
            tp: self.tp,
            sources,
            destinations: self.destinations.clone(),
            ops,
            ignored: self.ignored.clone(),
            scaled: self.scaled.clone(),
        }
    }

    /// Bytes of each destination this plan writes: all of it for a plan that verifies, the
    /// sender's part for a share of one ([`Plan::share_of`]).
    pub fn share_bytes(&self) -> Vec<u64> {
        let mut bytes = vec![0; self.destinations.len()];
        for op in &self.ops {
            bytes[op.dst as usize] += op.numel() * self.destinations[op.dst as usize].dtype.size();
        }
        // A scale tensor is written with its weight (a share of part of a quantized weight is
        // not sent: the sender refuses it).
        for s in &self.scaled {
            let whole = bytes[s.weight as usize] == self.destinations[s.weight as usize].byte_len();
            bytes[s.scale as usize] = if whole { self.destinations[s.scale as usize].byte_len() } else { 0 };
        }
        bytes
    }

    /// Bytes an op's block takes in a payload, in [`Plan::payload_dtype`].
    pub fn op_bytes(&self, op: &CopyOp) -> u64 {
        op.numel() * self.payload_dtype(op).size()
    }

    /// Stable across runs and machines: xxh64 of the plan's canonical JSON form.
    pub fn hash(&self) -> u64 {
        struct HashWriter(Xxh64);
        impl io::Write for HashWriter {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut writer = HashWriter(Xxh64::new(0));
        serde_json::to_writer(&mut writer, self).expect("a plan always serialises");
        writer.0.digest()
    }

    /// The hash as the 16 hex digits reports and the protocol use.
    pub fn hash_hex(&self) -> String {
        format!("{:016x}", self.hash())
    }

    pub fn summary(&self) -> PlanSummary {
        let mut names: Vec<&str> = self.sources.iter().map(|p| p.spec.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        PlanSummary {
            tp_rank: self.tp.rank,
            tp_size: self.tp.size,
            source_tensors: names.len(),
            source_bytes: self.sources.iter().map(|p| p.spec.byte_len()).sum(),
            destination_tensors: self.destinations.len(),
            destination_bytes: self.destinations.iter().map(TensorSpec::byte_len).sum(),
            bytes_to_send: self.ops.iter().map(|op| self.op_bytes(op)).sum(),
            ops: self.ops.len(),
            strided_ops: self.ops.iter().filter(|op| self.strided(op).iter().any(|s| !s.is_contiguous())).count(),
            cast_ops: self.ops.iter().filter(|op| self.cast(op).is_some()).count(),
            ignored: self.ignored.len(),
            covered: self.verify().is_ok(),
            plan_hash: self.hash_hex(),
        }
    }

    /// The coverage proof, checked independently of how the plan was built: every op lies
    /// inside its source and destination with a dtype that casts, and the ops' blocks tile
    /// every destination exactly (pairwise disjoint, volumes adding up to the whole).
    pub fn verify(&self) -> Result<(), PlanError> {
        let mut problems = self.scaled_problems();
        let scales = if problems.is_empty() { self.scale_tensors() } else { vec![false; self.destinations.len()] };
        let mut blocks: Vec<Vec<(&[u64], &[u64])>> = vec![Vec::new(); self.destinations.len()];
        let mut ops_of: Vec<Vec<&CopyOp>> = vec![Vec::new(); self.destinations.len()];
        for (i, op) in self.ops.iter().enumerate() {
            let (Some(src), Some(dst)) = (self.sources.get(op.src as usize), self.destinations.get(op.dst as usize))
            else {
                problems
                    .push(Problem::Coverage { destination: format!("op {i}"), detail: "refers to no tensor".into() });
                continue;
            };
            if scales[op.dst as usize] {
                problems.push(Problem::Quant(QuantError::ScaleWritten { scale: dst.name.clone() }));
                continue;
            }
            if let Err(detail) = check_op(op, &src.spec, dst, self.scaled_of(op.dst).is_some()) {
                problems.push(Problem::Coverage { destination: dst.name.clone(), detail: format!("op {i}: {detail}") });
                continue;
            }
            blocks[op.dst as usize].push((&op.dst_start, &op.extent));
            ops_of[op.dst as usize].push(op);
        }
        if problems.is_empty() {
            for s in &self.scaled {
                let (weight, scale) = (&self.destinations[s.weight as usize], &self.destinations[s.scale as usize]);
                let channel = s.block == [1, weight.shape[weight.shape.len() - 1].max(1)];
                let errors = check_scaled(weight, scale, s.block, channel, &ops_of[s.weight as usize], &self.sources);
                problems.extend(errors.into_iter().map(Problem::Quant));
            }
        }
        for ((dst, mut list), scale) in self.destinations.iter().zip(blocks).zip(scales) {
            if scale {
                continue;
            }
            let written: u64 = list.iter().map(|(_, e)| e.iter().product::<u64>()).sum();
            if let Some(detail) = overlap(&mut list) {
                problems.push(Problem::Coverage { destination: dst.name.clone(), detail });
            } else if written != dst.numel() {
                problems.push(Problem::Coverage {
                    destination: dst.name.clone(),
                    detail: format!("{written} of {} elements written", dst.numel()),
                });
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PlanError { problems })
        }
    }

    /// What is wrong with the plan's list of quantized weights itself: indices out of range,
    /// not sorted by weight, a tensor both a weight and a scale, a weight not F8_E4M3 or of
    /// fewer than two dims, a scale not F32 or not of the block grid's shape.
    fn scaled_problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let count = self.destinations.len() as u32;
        let mut seen = vec![false; self.destinations.len()];
        let bad = |detail: String| Problem::Coverage { destination: "<quantized weights>".into(), detail };
        for (i, s) in self.scaled.iter().enumerate() {
            if s.weight >= count || s.scale >= count || s.weight == s.scale {
                problems.push(bad(format!("entry {i} refers to no weight and scale pair")));
                continue;
            }
            if i > 0 && self.scaled[i - 1].weight >= s.weight {
                problems.push(bad(format!("entry {i} is out of order")));
            }
            for d in [s.weight, s.scale] {
                if std::mem::replace(&mut seen[d as usize], true) {
                    problems.push(bad(format!("`{}` is in two entries", self.destinations[d as usize].name)));
                }
            }
            let (weight, scale) = (&self.destinations[s.weight as usize], &self.destinations[s.scale as usize]);
            if weight.shape.len() < 2 || weight.dtype != DType::F8E4M3 || s.block.contains(&0) {
                problems
                    .push(Problem::Quant(QuantError::Rank { weight: weight.name.clone(), rank: weight.shape.len() }));
                continue;
            }
            if scale.dtype != DType::F32 {
                problems.push(Problem::Quant(QuantError::ScaleDtype { scale: scale.name.clone(), dtype: scale.dtype }));
            }
            let expected = crate::quant::scale_shape(&weight.shape, s.block);
            if scale.shape != expected {
                problems.push(Problem::Quant(QuantError::ScaleShape {
                    scale: scale.name.clone(),
                    weight: weight.name.clone(),
                    shape: scale.shape.clone(),
                    weight_shape: weight.shape.clone(),
                    expected,
                    block_rows: s.block[0],
                    block_cols: s.block[1],
                }));
            }
        }
        problems
    }

    /// Reads a plan from JSON and verifies it: a stored plan is trusted no more than a new one.
    pub fn from_json(text: &str) -> Result<Plan, StoredPlanError> {
        let plan: Plan = serde_json::from_str(text)?;
        plan.verify()?;
        Ok(plan)
    }
}

fn check_op(op: &CopyOp, src: &TensorSpec, dst: &TensorSpec, quantized: bool) -> Result<(), String> {
    if !casts(src.dtype, dst.dtype, quantized) {
        return Err(format!("`{}` is {}, which cannot be cast to {}", src.name, src.dtype, dst.dtype));
    }
    let nd = dst.shape.len();
    if op.extent.len() != nd
        || op.dst_start.len() != nd
        || op.src_start.len() != src.shape.len()
        || src.shape.len() > nd
    {
        return Err(format!(
            "ranks of block {:?} do not fit `{}` {:?} -> {:?}",
            op.extent, src.name, src.shape, dst.shape
        ));
    }
    let lead = nd - src.shape.len();
    let inside = |start: &[u64], shape: &[u64], extent: &[u64]| {
        start.iter().zip(extent).zip(shape).all(|((s, e), n)| s.checked_add(*e).is_some_and(|end| end <= *n))
    };
    if op.extent[..lead].iter().any(|&e| e != 1)
        || !inside(&op.dst_start, &dst.shape, &op.extent)
        || !inside(&op.src_start, &src.shape, &op.extent[lead..])
    {
        return Err(format!(
            "block {:?} at {:?} of `{}` {:?} -> at {:?} of {:?} lies outside a tensor",
            op.extent, op.src_start, src.name, src.shape, op.dst_start, dst.shape
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;

/// Finds two overlapping blocks, if any: sorted by their first-dim start, each block is only
/// compared with those that start before it ends along dim 0.
fn overlap(blocks: &mut [(&[u64], &[u64])]) -> Option<String> {
    blocks.sort_unstable_by_key(|(start, _)| start.first().copied().unwrap_or(0));
    for i in 0..blocks.len() {
        let (a_start, a_ext) = blocks[i];
        if a_ext.contains(&0) {
            continue;
        }
        for &(b_start, b_ext) in &blocks[i + 1..] {
            if let (Some(&b0), Some(&a0), Some(&ae)) = (b_start.first(), a_start.first(), a_ext.first()) {
                if b0 >= a0 + ae {
                    break;
                }
            }
            let disjoint = b_ext.contains(&0)
                || (0..a_start.len())
                    .any(|d| b_start[d] >= a_start[d] + a_ext[d] || a_start[d] >= b_start[d] + b_ext[d]);
            if !disjoint {
                return Some(format!("blocks at {a_start:?} {a_ext:?} and {b_start:?} {b_ext:?} overlap"));
            }
        }
    }
    None
}
