//! Rule presets per model family, in the parameter layout vLLM and SGLang use.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::Split;
use crate::rules::{Part, Rule, RuleError, RuleSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Names and layouts unchanged; every tensor replicated on every rank.
    Identity,
    /// Llama, Mistral, Qwen2/2.5 (with q/k/v bias when present): fused qkv_proj and gate_up_proj.
    Llama,
    /// Qwen3 dense: Llama plus per-head q_norm and k_norm.
    Qwen3,
    /// Qwen3-MoE: Qwen3 attention, a replicated router and experts stacked into
    /// w13_weight `[experts, 2 * moe_intermediate, hidden]` (gate then up) and w2_weight
    /// `[experts, hidden, moe_intermediate]`, as vLLM's FusedMoE holds them; from per-expert
    /// tensors (checkpoints) or from transformers 5's stacked `experts.gate_up_proj` and
    /// `experts.down_proj`.
    Qwen3Moe,
}

/// What a preset needs to know beyond names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetOptions {
    /// Rows of one attention head in q/k/v: heads are never split across ranks, and KV heads
    /// fewer than ranks are replicated. Needed only when the TP size is above 1.
    pub head_dim: Option<u64>,
    /// Whole experts per rank (vLLM's enable_expert_parallel) instead of slices of every expert.
    pub expert_parallel: bool,
}

/// Attention head counts, from a model's config. With them (and a head dim) the presets give q
/// exactly `heads * head_dim` rows and k and v `kv_heads * head_dim`, so a q with a head too
/// many beside a k with one too few is refused, not fused into a `qkv_proj` of the right size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadCounts {
    pub heads: u64,
    pub kv_heads: u64,
}

impl Preset {
    pub const ALL: [Preset; 4] = [Preset::Identity, Preset::Llama, Preset::Qwen3, Preset::Qwen3Moe];

    pub fn name(self) -> &'static str {
        match self {
            Preset::Identity => "identity",
            Preset::Llama => "llama",
            Preset::Qwen3 => "qwen3",
            Preset::Qwen3Moe => "qwen3-moe",
        }
    }

    /// The preset for a Hugging Face `model_type`.
    pub fn for_model_type(model_type: &str) -> Option<Preset> {
        Some(match model_type {
            "llama" | "mistral" | "qwen2" => Preset::Llama,
            "qwen3" => Preset::Qwen3,
            "qwen3_moe" => Preset::Qwen3Moe,
            _ => return None,
        })
    }

    /// The rule set. Without `head_dim`, q/k/v are split by rows: right at TP 1 only, since
    /// nothing then keeps heads whole or replicates KV heads; callers planning TP > 1 pass it.
    /// Gate and up are always equal parts; q, k and v have fixed lengths only with
    /// [`Preset::rules_with_heads`].
    pub fn rules(self, options: PresetOptions) -> Result<RuleSet, RuleError> {
        self.rules_with_heads(options, None)
    }

    /// [`Preset::rules`] where the head counts are known too (a config.json): with a head dim,
    /// each of q, k and v (weight and bias) must be exactly its heads' rows.
    pub fn rules_with_heads(self, options: PresetOptions, counts: Option<HeadCounts>) -> Result<RuleSet, RuleError> {
        let head_dim = options.head_dim.unwrap_or(1);
        let (heads, kv_heads) = (Split::heads(head_dim), Split::kv_heads(head_dim));
        let (cols, rows, rep) = (Split::columns(), Split::rows(), Split::Replicated);
        let layer = "model.layers.{layer}";
        let attn = format!("{layer}.self_attn");
        let mlp = format!("{layer}.mlp");
        // Saturating: absurd counts from a config.json give a length no source has, not a panic.
        let lens = options.head_dim.zip(counts).map(|(d, c)| (c.heads.saturating_mul(d), c.kv_heads.saturating_mul(d)));
        let qkv = |kind: &str| -> Result<Rule, RuleError> {
            let part = |proj: &str, split, len| -> Result<Part, RuleError> {
                Ok(Part { len, ..Part::new(&format!("{attn}.{proj}.{kind}"), split)? })
            };
            let parts = vec![
                part("q_proj", heads, lens.map(|(q, _)| q))?,
                part("k_proj", kv_heads, lens.map(|(_, kv)| kv))?,
                part("v_proj", kv_heads, lens.map(|(_, kv)| kv))?,
            ];
            Ok(Rule::map(&format!("{attn}.qkv_proj.{kind}"), 0, parts)?)
        };
        let mut rules = match self {
            Preset::Identity => return RuleSet::new(vec![Rule::rename("{name*}", "{name*}", rep)?]),
            Preset::Llama | Preset::Qwen3 | Preset::Qwen3Moe => vec![
                Rule::rename("model.embed_tokens.weight", "model.embed_tokens.weight", cols)?,
                Rule::rename("model.norm.weight", "model.norm.weight", rep)?,
                Rule::rename("lm_head.weight", "lm_head.weight", cols)?,
                Rule::rename(
                    &format!("{layer}.input_layernorm.weight"),
                    &format!("{layer}.input_layernorm.weight"),
                    rep,
                )?,
                Rule::rename(
                    &format!("{layer}.post_attention_layernorm.weight"),
                    &format!("{layer}.post_attention_layernorm.weight"),
                    rep,
                )?,
                qkv("weight")?,
                qkv("bias")?,
                Rule::rename(&format!("{attn}.o_proj.weight"), &format!("{attn}.o_proj.weight"), rows)?,
                Rule::fuse(
                    &format!("{mlp}.gate_up_proj.weight"),
                    0,
                    &[(&format!("{mlp}.gate_proj.weight"), cols), (&format!("{mlp}.up_proj.weight"), cols)],
                )?
                .with_equal_parts(),
                Rule::rename(&format!("{mlp}.down_proj.weight"), &format!("{mlp}.down_proj.weight"), rows)?,
                Rule::ignore(&format!("{attn}.rotary_emb.inv_freq"))?,
                Rule::tie("model.embed_tokens.weight", "lm_head.weight", cols)?,
            ],
        };
        if matches!(self, Preset::Qwen3 | Preset::Qwen3Moe) {
            rules.push(Rule::rename(&format!("{attn}.q_norm.weight"), &format!("{attn}.q_norm.weight"), rep)?);
            rules.push(Rule::rename(&format!("{attn}.k_norm.weight"), &format!("{attn}.k_norm.weight"), rep)?);
        }
        if self == Preset::Qwen3Moe {
            let ep = options.expert_parallel;
            let (expert_cols, expert_rows) = if ep { (rep, rep) } else { (cols, rows) };
            rules.push(Rule::rename(&format!("{mlp}.gate.weight"), &format!("{mlp}.gate.weight"), rep)?);
            rules.push(
                Rule::stack(
                    &format!("{mlp}.experts.w13_weight"),
                    "expert",
                    ep,
                    0,
                    &[
                        (&format!("{mlp}.experts.{{expert}}.gate_proj.weight"), expert_cols),
                        (&format!("{mlp}.experts.{{expert}}.up_proj.weight"), expert_cols),
                    ],
                )?
                .with_equal_parts(),
            );
            rules.push(Rule::stack(
                &format!("{mlp}.experts.w2_weight"),
                "expert",
                ep,
                0,
                &[(&format!("{mlp}.experts.{{expert}}.down_proj.weight"), expert_rows)],
            )?);
            // transformers >= 5 holds the experts stacked already: gate_up_proj
            // [experts, 2 * moe_intermediate, hidden] (gate then up) and down_proj
            // [experts, hidden, moe_intermediate]. Each rank takes its slice of the gate half
            // and of the up half, or its whole experts with expert parallelism.
            let experts = Split::Dim { dim: 0, granule: 1 };
            let (gate_up_split, down_split) =
                if ep { (experts, experts) } else { (Split::rows(), Split::Dim { dim: 2, granule: 1 }) };
            let gate_up = format!("{mlp}.experts.gate_up_proj");
            rules.push(Rule::map(
                &format!("{mlp}.experts.w13_weight"),
                1,
                vec![
                    Part::segment(&gate_up, 1, 0, 2, gate_up_split)?,
                    Part::segment(&gate_up, 1, 1, 2, gate_up_split)?,
                ],
            )?);
            rules.push(Rule::rename(
                &format!("{mlp}.experts.down_proj"),
                &format!("{mlp}.experts.w2_weight"),
                down_split,
            )?);
        }
        RuleSet::new(rules)
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        match s.as_str() {
            "identity" => Ok(Preset::Identity),
            "llama" | "qwen2" | "mistral" => Ok(Preset::Llama),
            "qwen3" => Ok(Preset::Qwen3),
            "qwen3-moe" => Ok(Preset::Qwen3Moe),
            _ => Err(format!("unknown preset `{s}` (expected identity, llama, qwen3 or qwen3-moe)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_builds_with_and_without_expert_parallelism() {
        for preset in Preset::ALL {
            for expert_parallel in [false, true] {
                let options = PresetOptions { head_dim: Some(128), expert_parallel };
                assert!(preset.rules(options).is_ok(), "{preset}");
            }
            assert_eq!(preset.name().parse::<Preset>().unwrap(), preset);
        }
        assert!("gpt".parse::<Preset>().unwrap_err().contains("gpt"));
    }
}
