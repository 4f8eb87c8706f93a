//! From "this model, this preset, this rank" to the inputs of a plan: the source tensors, the
//! rules and the parameters the engine rank holds. Shared by every command that plans.

use std::path::{Path, PathBuf};

use weightlift_core::quant::{Quant, QuantPlan};
use weightlift_core::{
    destination_manifest, plan, synthetic, DType, Manifest, ModelConfig, Module, PlanError, Preset, PresetOptions,
    RuleSet, SourceSet, TpRank, SYNTHETIC_MODELS,
};

use crate::safetensors_dir::{SafetensorsDir, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Options that do not fit together or name something unknown.
    #[error("{0}")]
    Invalid(String),
}

/// Where the trainer-side tensors come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Synthetic(ModelConfig),
    Dir(Box<SafetensorsDir>),
}

impl ModelSource {
    pub fn synthetic(name: &str) -> Result<ModelSource, SetupError> {
        synthetic(name).map(ModelSource::Synthetic).ok_or_else(|| {
            SetupError::Invalid(format!("unknown synthetic model `{name}` (known: {})", SYNTHETIC_MODELS.join(", ")))
        })
    }

    pub fn dir(path: &Path) -> Result<ModelSource, SetupError> {
        Ok(ModelSource::Dir(Box::new(SafetensorsDir::open(path)?)))
    }

    pub fn name(&self) -> String {
        match self {
            ModelSource::Synthetic(c) => c.name.clone(),
            ModelSource::Dir(d) => d.dir.display().to_string(),
        }
    }

    pub fn manifest(&self) -> Manifest {
        match self {
            ModelSource::Synthetic(c) => c.source_manifest(),
            ModelSource::Dir(d) => d.manifest.clone(),
        }
    }

    pub fn config(&self) -> Option<&ModelConfig> {
        match self {
            ModelSource::Synthetic(c) => Some(c),
            ModelSource::Dir(d) => d.config.as_ref(),
        }
    }
}

/// How to map the source onto one engine rank.
#[derive(Debug, Clone, Default)]
pub struct MappingOptions {
    /// Defaults to the model's own preset (from its config).
    pub preset: Option<Preset>,
    /// A JSON rule set used instead of a preset.
    pub rules_file: Option<PathBuf>,
    pub head_dim: Option<u64>,
    pub expert_parallel: bool,
    /// The engine's dtype; defaults to the source's.
    pub dtype: Option<DType>,
    /// The engine keeps its own lm_head although the source ties it to the embeddings.
    pub untied_lm_head: bool,
    /// The engine rank's parameters as a JSON manifest; derived from the rules when absent.
    pub engine_manifest: Option<PathBuf>,
    /// The part of a checkpoint with a draft the engine holds (main model, MTP module, ...).
    pub module: Module,
    /// A derived engine (no `engine_manifest`) in FP8: its linear weights in F8_E4M3 with a
    /// scale tensor each, as an FP8 checkpoint of the model lays them out; the other
    /// parameters in `dtype` (the source's when that is F8_E4M3 or absent).
    pub quant: Option<Quant>,
}

/// Everything `weightlift_core::plan` needs for one rank.
#[derive(Debug, Clone)]
pub struct PlanInputs {
    pub source: SourceSet,
    pub destination: Manifest,
    pub rules: RuleSet,
    pub tp: TpRank,
    /// What the rules came from, for reports: a preset name or the rules file.
    pub rules_name: String,
}

impl MappingOptions {
    pub fn rules(&self, model: &ModelSource, tp: TpRank) -> Result<(RuleSet, String), SetupError> {
        if let Some(path) = &self.rules_file {
            let text =
                std::fs::read_to_string(path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
            let rules =
                RuleSet::from_json(&text).map_err(|e| SetupError::Invalid(format!("{}: {e}", path.display())))?;
            return Ok((rules, path.display().to_string()));
        }
        let preset = self.preset.or(model.config().map(|c| c.preset)).ok_or_else(|| {
            SetupError::Invalid("no preset: the model has no config.json, so pass --preset or --rules".into())
        })?;
        let head_dim = self.head_dim.or(model.config().map(|c| c.head_dim)).or_else(|| head_dim_from_q_norm(model));
        if head_dim.is_none() && tp.size > 1 && preset != Preset::Identity {
            return Err(SetupError::Invalid(format!(
                "preset {preset} at TP {} must keep attention heads whole, but the head dim is unknown: \
                 pass --head-dim or put config.json beside the weights",
                tp.size
            )));
        }
        let options = PresetOptions { head_dim, expert_parallel: self.expert_parallel };
        // With the config's head counts, q, k and v are checked one by one, not just as a total.
        let counts = model.config().map(ModelConfig::head_counts);
        let rules =
            preset.module_rules(self.module, options, counts).map_err(|e| SetupError::Invalid(e.to_string()))?;
        let name = match self.module {
            Module::Whole => preset.name().to_string(),
            module => format!("{preset} ({module})"),
        };
        Ok((rules, name))
    }

    /// The source, rules and engine manifest for rank `tp`.
    pub fn inputs(&self, model: &ModelSource, tp: TpRank) -> Result<PlanInputs, SetupError> {
        let (rules, rules_name) = self.rules(model, tp)?;
        let source = SourceSet::single(model.manifest());
        let destination = match &self.engine_manifest {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| SourceError::Io { path: path.clone(), source })?;
                serde_json::from_str(&text).map_err(|e| SetupError::Invalid(format!("{}: {e}", path.display())))?
            }
            None => {
                let dtype = self.dtype.filter(|&d| self.quant.is_none() || d != DType::F8E4M3);
                let derived = destination_manifest(&source, &rules, tp, dtype, self.untied_lm_head)?;
                match self.quant {
                    None => derived,
                    Some(quant) => fp8_engine(&source, derived, &rules, tp, quant)?,
                }
            }
        };
        Ok(PlanInputs { source, destination, rules, tp, rules_name })
    }
}

/// The FP8 engine of `derived` (what the rules give the engine in its unquantized dtype):
/// each quantizable weight in F8_E4M3 with its scales beside it; refused, naming the weights,
/// where a TP slice splits a block.
fn fp8_engine(
    source: &SourceSet,
    derived: Manifest,
    rules: &RuleSet,
    tp: TpRank,
    quant: Quant,
) -> Result<Manifest, SetupError> {
    let unquantized = plan(source, &derived, rules, tp)?;
    let quantized = QuantPlan::new(&unquantized, quant).map_err(|errors| {
        let first: Vec<String> = errors.iter().take(3).map(ToString::to_string).collect();
        let more = match errors.len() {
            n if n > 3 => format!("; and {} more", n - 3),
            _ => String::new(),
        };
        SetupError::Invalid(format!("cannot quantize with {quant}: {}{more}", first.join("; ")))
    })?;
    Ok(quantized.engine_manifest(&unquantized))
}

/// Qwen3 checkpoints carry the head dim as the length of the per-head q_norm weight.
fn head_dim_from_q_norm(model: &ModelSource) -> Option<u64> {
    model
        .manifest()
        .iter()
        .find(|s| s.name.ends_with(".self_attn.q_norm.weight") && s.shape.len() == 1)
        .map(|s| s.shape[0])
}
