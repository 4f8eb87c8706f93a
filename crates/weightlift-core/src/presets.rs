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
        self.module_rules(Module::Whole, options, counts)
    }

    /// The rules of one [`Module`] of an update carrying a main model and its draft: what an
    /// engine holding only that module takes, every other source ignored by name.
    pub fn module_rules(
        self,
        module: Module,
        options: PresetOptions,
        counts: Option<HeadCounts>,
    ) -> Result<RuleSet, RuleError> {
        let rep = Split::Replicated;
        let mut rules = Vec::new();
        if module == Module::Main {
            rules.push(Rule::ignore(&format!("{MTP}.{{rest*}}"))?);
            rules.push(Rule::ignore(&format!("{DRAFT}.{{rest*}}"))?);
        }
        if self == Preset::Identity {
            match module {
                Module::Whole | Module::Main => rules.push(Rule::rename("{name*}", "{name*}", rep)?),
                Module::Draft => {
                    rules.push(Rule::rename(&module.trainer_name("{name*}"), "{name*}", rep)?);
                    rules.push(Rule::ignore("{name*}")?);
                }
                Module::Mtp => {
                    // As the checkpoint names them: the draft's loader renames them itself.
                    rules.push(Rule::rename(&format!("{MTP}.{{rest*}}"), &format!("{MTP}.{{rest*}}"), rep)?);
                    rules.push(Rule::rename(EMBED, EMBED, rep)?);
                    rules.push(Rule::rename(LM_HEAD, LM_HEAD, rep)?);
                    rules.push(Rule::tie(EMBED, LM_HEAD, rep)?);
                    rules.push(Rule::ignore("{name*}")?);
                }
            }
            return RuleSet::new(rules);
        }
        let cols = Split::columns();
        match module {
            Module::Whole | Module::Main | Module::Draft => {
                // A separate draft model's tensors are the trainer's under `draft.`.
                let from = |name: &str| module.trainer_name(name);
                rules.push(Rule::rename(&from(EMBED), EMBED, cols)?);
                rules.push(Rule::rename(&from("model.norm.weight"), "model.norm.weight", rep)?);
                rules.push(Rule::rename(&from(LM_HEAD), LM_HEAD, cols)?);
                self.layer_rules(&from("model.layers.{layer}"), "model.layers.{layer}", options, counts, &mut rules)?;
                rules.push(Rule::tie(&from(EMBED), LM_HEAD, cols)?);
                if module == Module::Draft {
                    rules.push(Rule::ignore("{name*}")?);
                }
            }
            Module::Mtp => {
                // vLLM's Qwen3NextMTP: the module under `model.`, the embedding and the head
                // shared with the main model, as the main model names them.
                rules.push(Rule::rename(EMBED, EMBED, cols)?);
                rules.push(Rule::rename(LM_HEAD, LM_HEAD, cols)?);
                rules.push(Rule::rename(&format!("{MTP}.fc.weight"), "model.fc.weight", cols)?);
                for norm in ["norm", "pre_fc_norm_hidden", "pre_fc_norm_embedding"] {
                    rules.push(Rule::rename(&format!("{MTP}.{norm}.weight"), &format!("model.{norm}.weight"), rep)?);
                }
                self.layer_rules(
                    &format!("{MTP}.layers.{{layer}}"),
                    "model.layers.{layer}",
                    options,
                    counts,
                    &mut rules,
                )?;
                rules.push(Rule::tie(EMBED, LM_HEAD, cols)?);
                rules.push(Rule::ignore("{name*}")?);
            }
        }
        RuleSet::new(rules)
    }

    /// The rules of the decoder layers named `from` in the trainer (`model.layers.{layer}`)
    /// and `to` in the engine.
    fn layer_rules(
        self,
        from: &str,
        to: &str,
        options: PresetOptions,
        counts: Option<HeadCounts>,
        rules: &mut Vec<Rule>,
    ) -> Result<(), RuleError> {
        let head_dim = options.head_dim.unwrap_or(1);
        let (heads, kv_heads) = (Split::heads(head_dim), Split::kv_heads(head_dim));
        let (cols, rows, rep) = (Split::columns(), Split::rows(), Split::Replicated);
        let (attn, to_attn) = (format!("{from}.self_attn"), format!("{to}.self_attn"));
        let (mlp, to_mlp) = (format!("{from}.mlp"), format!("{to}.mlp"));
        let rename = |name: &str, split| Rule::rename(&format!("{from}.{name}"), &format!("{to}.{name}"), split);
        // Gate and up of the dense MLP named `mlp` (under `from` and `to`), fused as vLLM's
        // MergedColumnParallelLinear holds them.
        let gate_up = |mlp: &str| -> Result<Rule, RuleError> {
            let (src, dst) = (format!("{from}.{mlp}"), format!("{to}.{mlp}"));
            Ok(Rule::fuse(
                &format!("{dst}.gate_up_proj.weight"),
                0,
                &[(&format!("{src}.gate_proj.weight"), cols), (&format!("{src}.up_proj.weight"), cols)],
            )?
            .with_equal_parts())
        };
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
            Ok(Rule::map(&format!("{to_attn}.qkv_proj.{kind}"), 0, parts)?)
        };
        rules.extend([
            rename("input_layernorm.weight", rep)?,
            rename("post_attention_layernorm.weight", rep)?,
            qkv("weight")?,
            qkv("bias")?,
            rename("self_attn.o_proj.weight", rows)?,
            gate_up("mlp")?,
            rename("mlp.down_proj.weight", rows)?,
            Rule::ignore(&format!("{attn}.rotary_emb.inv_freq"))?,
        ]);
        if matches!(self, Preset::Qwen3 | Preset::Qwen3Moe) {
            rules.push(rename("self_attn.q_norm.weight", rep)?);
            rules.push(rename("self_attn.k_norm.weight", rep)?);
        }
        if self == Preset::Qwen3Moe {
            let ep = options.expert_parallel;
            let (expert_cols, expert_rows) = if ep { (rep, rep) } else { (cols, rows) };
            rules.push(rename("mlp.gate.weight", rep)?);
            // Qwen2-MoE / Qwen3-Next shared experts (absent from Qwen3-MoE): one dense MLP
            // beside the routed experts, as vLLM's Qwen2MoeMLP holds it, and its scalar gate
            // replicated.
            rules.push(gate_up("mlp.shared_expert")?);
            rules.push(rename("mlp.shared_expert.down_proj.weight", rows)?);
            rules.push(rename("mlp.shared_expert_gate.weight", rep)?);
            // DeepSeek-V2 / V3 shared experts: one dense MLP of all of them, ungated, as
            // vLLM's DeepseekV2MoE holds it (`mlp.shared_experts`).
            rules.push(gate_up("mlp.shared_experts")?);
            rules.push(rename("mlp.shared_experts.down_proj.weight", rows)?);
            rules.push(
                Rule::stack(
                    &format!("{to_mlp}.experts.w13_weight"),
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
                &format!("{to_mlp}.experts.w2_weight"),
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
                &format!("{to_mlp}.experts.w13_weight"),
                1,
                vec![
                    Part::segment(&gate_up, 1, 0, 2, gate_up_split)?,
                    Part::segment(&gate_up, 1, 1, 2, gate_up_split)?,
                ],
            )?);
            rules.push(Rule::rename(
                &format!("{mlp}.experts.down_proj"),
                &format!("{to_mlp}.experts.w2_weight"),
                down_split,
            )?);
        }
        Ok(())
    }
}

/// The prefix of a checkpoint's multi-token-prediction module (Qwen3-Next: `mtp.fc`,
/// `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`, `mtp.layers.{i}`, `mtp.norm`).
const MTP: &str = "mtp";
/// The prefix under which a trainer sends a separate draft model beside the main one.
const DRAFT: &str = "draft";
const EMBED: &str = "model.embed_tokens.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Which part of an update carrying a main model and its draft an engine's receiver holds:
/// the draft is a multi-token-prediction (MTP) module in the same checkpoint, or a separate
/// small model sent under `draft.`. One update reaches both in one version, each receiver
/// taking its module (two receivers of one group: [`Module::Main`] and [`Module::Mtp`] or
/// [`Module::Draft`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Module {
    /// Every source tensor (a checkpoint with an MTP module needs an engine holding it too).
    #[default]
    Whole,
    /// The main model: the MTP module's and a separate draft's tensors are ignored, as vLLM's
    /// main model skips `mtp.` weights.
    Main,
    /// The MTP module as a draft model holds it (vLLM's `Qwen3NextMTP`: `mtp.*` under
    /// `model.*`, with the main model's `model.embed_tokens` and `lm_head`); every other
    /// tensor is ignored. With the identity preset, the names stay as the checkpoint's.
    Mtp,
    /// A separate draft model the trainer sends beside the main one, its names under
    /// `draft.` (`draft.model.layers.0...`): the draft's engine holds them without the prefix;
    /// every other tensor is ignored. The main model ignores `draft.*`.
    Draft,
}

impl Module {
    pub const ALL: [Module; 4] = [Module::Whole, Module::Main, Module::Mtp, Module::Draft];

    /// The trainer's name of a tensor this module's engine names `name` under the identity
    /// preset (`draft.` before a separate draft model's names; the others' are unchanged).
    pub fn trainer_name(self, name: &str) -> String {
        match self {
            Module::Draft => format!("{DRAFT}.{name}"),
            _ => name.to_string(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Module::Whole => "whole",
            Module::Main => "main",
            Module::Mtp => "mtp",
            Module::Draft => "draft",
        }
    }
}

impl fmt::Display for Module {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Module {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Module::ALL
            .into_iter()
            .find(|m| m.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("unknown module `{s}` (expected whole, main, mtp or draft)"))
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

    use crate::models::synthetic;
    use crate::plan::{destination_manifest, plan, Problem};
    use crate::spec::Manifest;
    use crate::{SourceSet, TpRank};

    fn names(m: &Manifest) -> Vec<String> {
        m.iter().map(|s| s.name.clone()).collect()
    }

    /// A checkpoint with a Qwen3-Next-style MTP module: the main model's rules take all but
    /// `mtp.*`, the draft's take `mtp.*` (as vLLM's Qwen3NextMTP names it) and the shared
    /// embedding and head, and together they read every source tensor.
    #[test]
    fn a_checkpoint_with_mtp_reaches_the_main_model_and_its_draft_each_its_module() {
        for model in ["qwen3-tiny-mtp", "qwen3-moe-tiny-mtp"] {
            let config = synthetic(model).unwrap();
            let source = SourceSet::single(config.source_manifest());
            let without = crate::models::ModelConfig { mtp_layers: 0, ..config.clone() };
            let options = PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false };
            let rules = |module| config.preset.module_rules(module, options, Some(config.head_counts())).unwrap();
            for size in [1, 2] {
                let tp = TpRank::new(0, size).unwrap();
                let main = destination_manifest(&source, &rules(Module::Main), tp, None, false).unwrap();
                let plain = destination_manifest(
                    &SourceSet::single(without.source_manifest()),
                    &rules(Module::Whole),
                    tp,
                    None,
                    false,
                )
                .unwrap();
                assert_eq!(main, plain, "{model}: the main module is the model without MTP");
                let draft = destination_manifest(&source, &rules(Module::Mtp), tp, None, false).unwrap();
                let mut expected = vec![
                    "model.embed_tokens.weight",
                    "lm_head.weight",
                    "model.fc.weight",
                    "model.norm.weight",
                    "model.pre_fc_norm_hidden.weight",
                    "model.pre_fc_norm_embedding.weight",
                    "model.layers.0.self_attn.qkv_proj.weight",
                    "model.layers.0.self_attn.o_proj.weight",
                ];
                expected.push(if config.experts > 0 {
                    "model.layers.0.mlp.experts.w13_weight"
                } else {
                    "model.layers.0.mlp.gate_up_proj.weight"
                });
                let drafted = names(&draft);
                for name in expected {
                    assert!(drafted.iter().any(|n| n == name), "{model}: the draft lacks {name}: {drafted:?}");
                }
                assert!(!drafted.iter().any(|n| n.starts_with("model.layers.1")), "{model}: {drafted:?}");

                let main_plan = plan(&source, &main, &rules(Module::Main), tp).unwrap();
                let draft_plan = plan(&source, &draft, &rules(Module::Mtp), tp).unwrap();
                let read = |p: &crate::Plan| -> Vec<String> {
                    p.ops.iter().map(|op| p.sources[op.src as usize].spec.name.clone()).collect()
                };
                let (main_read, draft_read) = (read(&main_plan), read(&draft_plan));
                assert!(main_read.iter().all(|n| !n.starts_with("mtp.")));
                let qkv = draft.position("model.layers.0.self_attn.qkv_proj.weight").unwrap() as u32;
                let qkv_sources: Vec<&str> = draft_plan
                    .ops
                    .iter()
                    .filter(|op| op.dst == qkv)
                    .map(|op| draft_plan.sources[op.src as usize].spec.name.as_str())
                    .collect();
                assert_eq!(
                    qkv_sources,
                    [
                        "mtp.layers.0.self_attn.q_proj.weight",
                        "mtp.layers.0.self_attn.k_proj.weight",
                        "mtp.layers.0.self_attn.v_proj.weight"
                    ]
                );
                for spec in config.source_manifest().iter() {
                    assert!(
                        main_read.contains(&spec.name) || draft_read.contains(&spec.name),
                        "{model}: `{}` reaches neither module",
                        spec.name
                    );
                }
                // The whole rule set has nowhere to put the MTP module in the main model alone.
                let err = plan(&source, &main, &rules(Module::Whole), tp).unwrap_err();
                assert!(
                    err.problems.iter().any(|p| matches!(p, Problem::Unmapped { source } if source == "mtp.fc.weight")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn identity_modules_split_the_checkpoint_by_name() {
        let config = synthetic("qwen3-tiny-mtp").unwrap();
        let source = config.source_manifest();
        let pick = |keep: &dyn Fn(&str) -> bool| {
            Manifest::new(source.iter().filter(|s| keep(&s.name)).cloned().collect()).unwrap()
        };
        let main = pick(&|n| !n.starts_with("mtp."));
        let draft = pick(&|n| n.starts_with("mtp.") || n == "model.embed_tokens.weight" || n == "lm_head.weight");
        let set = SourceSet::single(source.clone());
        let rules = |module| Preset::Identity.module_rules(module, PresetOptions::default(), None).unwrap();
        let main_plan = plan(&set, &main, &rules(Module::Main), TpRank::SINGLE).unwrap();
        assert_eq!(main_plan.ignored.len(), source.len() - main.len());
        let draft_plan = plan(&set, &draft, &rules(Module::Mtp), TpRank::SINGLE).unwrap();
        assert_eq!(draft_plan.ignored.len(), source.len() - draft.len());
        assert!(plan(&set, &main, &rules(Module::Whole), TpRank::SINGLE).is_err());
        for module in Module::ALL {
            assert_eq!(module.name().parse::<Module>().unwrap(), module);
        }
        assert!("drafter".parse::<Module>().unwrap_err().contains("drafter"));
    }

    /// A separate draft model (a small Qwen3) sent under `draft.` beside the main model: the
    /// main model's rules ignore it, the draft's take it without the prefix, fused as the
    /// preset fuses, at TP 1 and 2.
    #[test]
    fn a_separate_draft_model_under_its_prefix_reaches_its_own_receiver() {
        let (main_config, draft_config) = (synthetic("qwen3-8b").unwrap(), synthetic("qwen3-tiny").unwrap());
        let mut specs: Vec<_> = main_config.source_manifest().iter().cloned().collect();
        let draft_source = draft_config.source_manifest();
        specs.extend(draft_source.iter().map(|s| crate::TensorSpec { name: format!("draft.{}", s.name), ..s.clone() }));
        let source = SourceSet::single(Manifest::new(specs).unwrap());
        for size in [1, 2] {
            let tp = TpRank::new(size - 1, size).unwrap();
            let rules = |config: &crate::models::ModelConfig, module| {
                let options = PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false };
                config.preset.module_rules(module, options, Some(config.head_counts())).unwrap()
            };
            let engine = |config: &crate::models::ModelConfig| {
                let own = SourceSet::single(config.source_manifest());
                destination_manifest(&own, &rules(config, Module::Whole), tp, None, false).unwrap()
            };
            let main_plan = plan(&source, &engine(&main_config), &rules(&main_config, Module::Main), tp).unwrap();
            assert_eq!(main_plan.ignored.len(), draft_source.len());
            let draft = engine(&draft_config);
            let draft_plan = plan(&source, &draft, &rules(&draft_config, Module::Draft), tp).unwrap();
            assert_eq!(draft_plan.ignored.len(), main_config.source_manifest().len());
            assert!(draft_plan
                .ops
                .iter()
                .all(|op| draft_plan.sources[op.src as usize].spec.name.starts_with("draft.")));
            // Tied embeddings: the draft's head, where its engine has one, comes from its own.
            assert!(draft.get("lm_head.weight").is_none() || draft_config.tie_word_embeddings);
        }
        let identity = |module| Preset::Identity.module_rules(module, PresetOptions::default(), None).unwrap();
        let draft_plan = plan(&source, &draft_source, &identity(Module::Draft), TpRank::SINGLE).unwrap();
        assert_eq!(draft_plan.destinations.len(), draft_source.len());
        assert_eq!(draft_plan.ignored.len(), main_config.source_manifest().len());
    }

    /// Qwen3-Next's MTP layer carries shared experts beside the routed ones: the MoE preset
    /// fuses their gate and up, slices them per TP rank and replicates the shared gate.
    #[test]
    fn shared_experts_of_an_mtp_layer_are_fused_and_sliced() {
        let config = synthetic("qwen3-moe-tiny-mtp").unwrap();
        let mut specs: Vec<crate::TensorSpec> = config.source_manifest().iter().cloned().collect();
        let (h, i) = (config.hidden, 48);
        for (name, shape) in [("gate_proj", vec![i, h]), ("up_proj", vec![i, h]), ("down_proj", vec![h, i])] {
            specs.push(crate::TensorSpec::new(
                format!("mtp.layers.0.mlp.shared_expert.{name}.weight"),
                config.dtype,
                shape,
            ));
        }
        specs.push(crate::TensorSpec::new("mtp.layers.0.mlp.shared_expert_gate.weight", config.dtype, vec![1, h]));
        let source = SourceSet::single(Manifest::new(specs).unwrap());
        let options = PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false };
        let rules = Preset::Qwen3Moe.module_rules(Module::Mtp, options, Some(config.head_counts())).unwrap();
        let tp = TpRank::new(1, 2).unwrap();
        let draft = destination_manifest(&source, &rules, tp, None, false).unwrap();
        let shape = |n: &str| draft.get(n).map(|s| s.shape.clone());
        assert_eq!(shape("model.layers.0.mlp.shared_expert.gate_up_proj.weight"), Some(vec![i, h]));
        assert_eq!(shape("model.layers.0.mlp.shared_expert.down_proj.weight"), Some(vec![h, i / 2]));
        assert_eq!(shape("model.layers.0.mlp.shared_expert_gate.weight"), Some(vec![1, h]));
        assert!(plan(&source, &draft, &rules, tp).is_ok());
    }
}
