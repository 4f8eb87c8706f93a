//! Declarative mapping from source (trainer) tensor names to destination (engine) parameters.
//!
//! A rule set is an ordered list; each source tensor is claimed by the first rule that matches
//! it. Nothing is implied: a source tensor no rule claims fails planning, and dropping one
//! takes an explicit `ignore`.

use serde::{Deserialize, Serialize};

use crate::layout::Split;
use crate::pattern::{Pattern, PatternError};

/// One ordered part of a destination parameter, with the tensor-parallel split applied to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub from: Pattern,
    pub split: Split,
    /// Only one of `count` equal segments of the source along a dimension is this part (a
    /// source that is itself fused, such as transformers' `gate_up_proj` of stacked experts);
    /// the split then applies to that segment. Several parts of one rule may take segments of
    /// the same source tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segment: Option<Segment>,
    /// The length along the rule's `dim` that the layout gives this part (of its segment, before
    /// the split): `heads * head_dim` rows of q. A source of any other length is refused, even
    /// where the fused total would still fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
}

/// Segment `index` of `count` equal segments of a source along `dim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub dim: usize,
    pub index: u64,
    pub count: u64,
}

impl Part {
    pub fn new(from: &str, split: Split) -> Result<Part, PatternError> {
        Ok(Part { from: from.parse()?, split, segment: None, len: None })
    }

    /// Segment `index` of `count` along `dim` of the source `from`, then split.
    pub fn segment(from: &str, dim: usize, index: u64, count: u64, split: Split) -> Result<Part, PatternError> {
        Ok(Part { from: from.parse()?, split, segment: Some(Segment { dim, index, count }), len: None })
    }
}

/// Stacks per-expert source tensors into one destination with a leading expert dimension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stack {
    /// The variable of the parts' patterns that holds the expert index (a decimal integer).
    pub var: String,
    /// Expert parallelism: each rank holds a contiguous range of whole experts (experts split
    /// evenly over the TP ranks) instead of a slice of every expert.
    #[serde(default)]
    pub expert_parallel: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rule {
    /// Destination `to` is the concatenation of `parts` (in order) along `dim`, each part split
    /// for the receiver's rank first; with `stack`, one such concatenation per expert, stacked
    /// along a new leading dimension. A rename is a map with one part.
    Map {
        to: Pattern,
        parts: Vec<Part>,
        #[serde(default)]
        dim: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        stack: Option<Stack>,
        /// The parts are equal halves (thirds, ...) of the destination, such as gate and up:
        /// sources of different shapes are refused rather than concatenated off-centre.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        equal_parts: bool,
    },
    /// Source tensors that are deliberately not sent (e.g. rotary `inv_freq` buffers).
    Ignore { from: Pattern },
    /// Tied weights: when the engine has a parameter `to` that no other rule writes, fill it
    /// from source `from` too (an untied `lm_head` in the engine, tied embeddings in the source).
    Tie { from: Pattern, to: Pattern, split: Split },
}

impl Rule {
    pub fn rename(from: &str, to: &str, split: Split) -> Result<Rule, PatternError> {
        Ok(Rule::Map { to: to.parse()?, parts: vec![Part::new(from, split)?], dim: 0, stack: None, equal_parts: false })
    }

    pub fn fuse(to: &str, dim: usize, parts: &[(&str, Split)]) -> Result<Rule, PatternError> {
        Ok(Rule::Map { to: to.parse()?, parts: parse_parts(parts)?, dim, stack: None, equal_parts: false })
    }

    /// A map from parts built with [`Part::new`] or [`Part::segment`].
    pub fn map(to: &str, dim: usize, parts: Vec<Part>) -> Result<Rule, PatternError> {
        Ok(Rule::Map { to: to.parse()?, parts, dim, stack: None, equal_parts: false })
    }

    pub fn stack(
        to: &str,
        var: &str,
        expert_parallel: bool,
        dim: usize,
        parts: &[(&str, Split)],
    ) -> Result<Rule, PatternError> {
        Ok(Rule::Map {
            to: to.parse()?,
            parts: parse_parts(parts)?,
            dim,
            stack: Some(Stack { var: var.to_string(), expert_parallel }),
            equal_parts: false,
        })
    }

    /// The same rule with its parts declared equal (`equal_parts`); only maps have parts, so
    /// other rules come back unchanged.
    pub fn with_equal_parts(self) -> Rule {
        match self {
            Rule::Map { to, parts, dim, stack, .. } => Rule::Map { to, parts, dim, stack, equal_parts: true },
            other => other,
        }
    }

    pub fn ignore(from: &str) -> Result<Rule, PatternError> {
        Ok(Rule::Ignore { from: from.parse()? })
    }

    pub fn tie(from: &str, to: &str, split: Split) -> Result<Rule, PatternError> {
        Ok(Rule::Tie { from: from.parse()?, to: to.parse()?, split })
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        match self {
            Rule::Map { to, parts, stack, .. } => {
                let from: Vec<&str> = parts.iter().map(|p| p.from.as_str()).collect();
                let verb = if stack.is_some() {
                    "stack"
                } else if parts.len() > 1 {
                    "fuse"
                } else {
                    "map"
                };
                format!("{verb} [{}] -> {to}", from.join(", "))
            }
            Rule::Ignore { from } => format!("ignore {from}"),
            Rule::Tie { from, to, .. } => format!("tie {from} -> {to}"),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match self {
            Rule::Map { to, parts, stack, .. } => {
                if parts.is_empty() {
                    return Err("a map needs at least one part".into());
                }
                let mut want: Vec<&str> = to.variables();
                if let Some(stack) = stack {
                    if want.contains(&stack.var.as_str()) {
                        return Err(format!("the expert variable `{}` must not appear in `{to}`", stack.var));
                    }
                    want.push(&stack.var);
                    if stack.expert_parallel && parts.iter().any(|p| p.split != Split::Replicated) {
                        return Err(
                            "with expert parallelism each rank holds whole experts: parts must be replicated".into()
                        );
                    }
                }
                want.sort_unstable();
                for part in parts {
                    if let Some(Segment { index, count, .. }) = part.segment {
                        if index >= count {
                            return Err(format!("part `{}`: segment {index} of {count} does not exist", part.from));
                        }
                    }
                    if part.len == Some(0) {
                        return Err(format!("part `{}`: a len of 0 leaves nothing to copy", part.from));
                    }
                    let mut got = part.from.variables();
                    got.sort_unstable();
                    if got != want {
                        return Err(format!(
                            "part `{}` has variables {got:?} but the destination needs exactly {want:?}",
                            part.from
                        ));
                    }
                }
                Ok(())
            }
            Rule::Ignore { .. } => Ok(()),
            Rule::Tie { from, to, .. } => {
                let (mut a, mut b) = (from.variables(), to.variables());
                a.sort_unstable();
                b.sort_unstable();
                if a != b {
                    return Err(format!("`{from}` and `{to}` must use the same variables"));
                }
                Ok(())
            }
        }
    }
}

fn parse_parts(parts: &[(&str, Split)]) -> Result<Vec<Part>, PatternError> {
    parts.iter().map(|(from, split)| Part::new(from, *split)).collect()
}

/// A rule that cannot work; names the rule and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("rule {index} ({rule}): {reason}")]
    Invalid { index: usize, rule: String, reason: String },
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// Not a JSON array of rules (bad patterns are reported here too, by serde).
    #[error("not a rule set: {0}")]
    Json(String),
}

/// An ordered, validated list of rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

impl RuleSet {
    pub fn new(rules: Vec<Rule>) -> Result<RuleSet, RuleError> {
        for (index, rule) in rules.iter().enumerate() {
            rule.validate().map_err(|reason| RuleError::Invalid { index, rule: rule.describe(), reason })?;
        }
        Ok(RuleSet { rules })
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether both map the same names onto the same layouts, whatever part lengths either
    /// declares: lengths come from a config one side may not have, and only add checks.
    pub fn same_layout(&self, other: &RuleSet) -> bool {
        let lengthless = |rules: &RuleSet| -> Vec<Rule> {
            let mut rules = rules.rules.clone();
            for rule in &mut rules {
                if let Rule::Map { parts, .. } = rule {
                    parts.iter_mut().for_each(|p| p.len = None);
                }
            }
            rules
        };
        lengthless(self) == lengthless(other)
    }

    /// Reads a JSON array of rules, validated.
    pub fn from_json(text: &str) -> Result<RuleSet, RuleError> {
        let rules: Vec<Rule> = serde_json::from_str(text).map_err(|e| RuleError::Json(e.to_string()))?;
        RuleSet::new(rules)
    }
}

impl<'de> Deserialize<'de> for RuleSet {
    /// Deserialises an array of rules and validates it like `RuleSet::new`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        RuleSet::new(Vec::<Rule>::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_parts_must_bind_the_destination_variables() {
        let bad = Rule::fuse("l.{layer}.qkv", 0, &[("l.{layer}.q", Split::Replicated), ("l.k", Split::Replicated)]);
        let err = RuleSet::new(vec![bad.unwrap()]).unwrap_err().to_string();
        assert!(err.contains("`l.k`"), "{err}");
    }

    #[test]
    fn part_lengths_do_not_change_the_layout() {
        let fused = |len| {
            let mut rule = Rule::fuse("l.qkv", 0, &[("l.q", Split::Replicated), ("l.k", Split::Replicated)]).unwrap();
            if let Rule::Map { parts, .. } = &mut rule {
                parts[0].len = len;
            }
            RuleSet::new(vec![rule]).unwrap()
        };
        assert!(fused(Some(8)).same_layout(&fused(None)));
        assert_ne!(fused(Some(8)), fused(None));
        let other = RuleSet::new(vec![Rule::rename("l.q", "l.qkv", Split::Replicated).unwrap()]).unwrap();
        assert!(!other.same_layout(&fused(None)));
    }

    #[test]
    fn stack_variable_belongs_to_parts_only() {
        let good = Rule::stack("l.{layer}.w2", "e", false, 0, &[("l.{layer}.experts.{e}.down", Split::rows())]);
        assert!(RuleSet::new(vec![good.unwrap()]).is_ok());
        let bad = Rule::stack("l.{layer}.{e}.w2", "e", false, 0, &[("l.{layer}.experts.{e}.down", Split::rows())]);
        assert!(RuleSet::new(vec![bad.unwrap()]).unwrap_err().to_string().contains("expert variable"));
        let ep_split = Rule::stack("l.w2", "e", true, 0, &[("l.experts.{e}.down", Split::rows())]);
        assert!(RuleSet::new(vec![ep_split.unwrap()]).unwrap_err().to_string().contains("replicated"));
    }

    #[test]
    fn rules_read_from_json() {
        let text = r#"[
            {"kind": "map", "to": "model.{x}.qkv", "dim": 0, "parts": [
                {"from": "model.{x}.q", "split": {"dim": {"dim": 0, "granule": 2}}},
                {"from": "model.{x}.k", "split": "replicated"}]},
            {"kind": "ignore", "from": "{any*}.inv_freq"},
            {"kind": "tie", "from": "embed", "to": "lm_head", "split": "replicated"}
        ]"#;
        let set = RuleSet::from_json(text).unwrap();
        assert_eq!(set.rules().len(), 3);
        let back = RuleSet::from_json(&serde_json::to_string(&set).unwrap()).unwrap();
        assert_eq!(back, set);
        assert!(RuleSet::from_json(r#"[{"kind": "map", "to": "a", "parts": []}]"#)
            .unwrap_err()
            .to_string()
            .contains("at least one part"));
        assert!(RuleSet::from_json(r#"[{"kind": "ignore", "from": "a..b"}]"#)
            .unwrap_err()
            .to_string()
            .contains("a..b"));
    }
}
