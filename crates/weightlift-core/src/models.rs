//! Model shapes: the synthetic models used by tests, demos and benchmarks (real shapes of
//! public checkpoints, Hugging Face tensor names), and reading the same facts from a config.json.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::presets::{HeadCounts, Preset};
use crate::spec::{Manifest, TensorSpec};

/// The shape facts of a decoder-only transformer that planning needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub preset: Preset,
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Dense MLP width (unused by MoE layers).
    pub intermediate: u64,
    pub vocab: u64,
    pub tie_word_embeddings: bool,
    /// Qwen2-style biases on q, k and v.
    pub qkv_bias: bool,
    /// Routed experts per MoE layer; 0 for dense models.
    pub experts: u64,
    pub moe_intermediate: u64,
    /// Decoder layers of a multi-token-prediction module beside the model (Qwen3-Next's
    /// `mtp.*`, config `num_nextn_predict_layers`); 0 for none.
    #[serde(default)]
    pub mtp_layers: u64,
    /// DeepSeek-style shared experts (config `n_shared_experts`): one dense MLP of
    /// `shared_experts * moe_intermediate` beside the routed experts (`mlp.shared_experts`).
    #[serde(default)]
    pub shared_experts: u64,
    /// Leading layers with a dense MLP of `intermediate` in an MoE model (DeepSeek's
    /// `first_k_dense_replace`).
    #[serde(default)]
    pub first_dense_layers: u64,
    pub dtype: DType,
}

/// Names accepted by [`synthetic`].
pub const SYNTHETIC_MODELS: &[&str] = &[
    "qwen3-0.6b",
    "qwen3-8b",
    "qwen3-30b-a3b",
    "llama3-8b",
    "qwen3-tiny",
    "qwen3-moe-tiny",
    "llama-tiny",
    "qwen2-tiny",
    "qwen3-tiny-mtp",
    "qwen3-moe-tiny-mtp",
    "kimi-k2-shape",
    "deepseek-v3-shape",
    "deepseek-moe-tiny",
];

/// The configuration of a synthetic model by name (see [`SYNTHETIC_MODELS`]).
pub fn synthetic(name: &str) -> Option<ModelConfig> {
    let dense = |preset, hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tie| ModelConfig {
        name: name.to_string(),
        preset,
        hidden,
        layers,
        heads,
        kv_heads,
        head_dim,
        intermediate,
        vocab,
        tie_word_embeddings: tie,
        qkv_bias: false,
        experts: 0,
        moe_intermediate: 0,
        mtp_layers: 0,
        shared_experts: 0,
        first_dense_layers: 0,
        dtype: DType::BF16,
    };
    let config = match name {
        // Shapes from the public config.json files of the Hugging Face checkpoints.
        "qwen3-0.6b" => dense(Preset::Qwen3, 1024, 28, 16, 8, 128, 3072, 151_936, true),
        "qwen3-8b" => dense(Preset::Qwen3, 4096, 36, 32, 8, 128, 12_288, 151_936, false),
        "qwen3-30b-a3b" => ModelConfig {
            experts: 128,
            moe_intermediate: 768,
            ..dense(Preset::Qwen3Moe, 2048, 48, 32, 4, 128, 6144, 151_936, false)
        },
        // Kimi-K2's sizes (1.03 T parameters: 61 layers, 384 experts of 2048, hidden 7168,
        // vocab 163,840) in Qwen3-MoE's layout: its MLA attention and shared expert are not
        // modelled (under 2% of the bytes). For `weightlift plan --placement` at 1 T scale.
        "kimi-k2-shape" => ModelConfig {
            experts: 384,
            moe_intermediate: 2048,
            ..dense(Preset::Qwen3Moe, 7168, 61, 64, 8, 128, 18_432, 163_840, false)
        },
        // DeepSeek-V3's MoE shape (61 layers, the first 3 dense of 18,432, then 256 routed
        // experts of 2048 and one shared expert; hidden 7168, vocab 129,280) with GQA
        // attention in Qwen3-MoE's layout instead of MLA: for FP8 planning at its real sizes.
        "deepseek-v3-shape" => ModelConfig {
            experts: 256,
            moe_intermediate: 2048,
            shared_experts: 1,
            first_dense_layers: 3,
            ..dense(Preset::Qwen3Moe, 7168, 61, 64, 8, 128, 18_432, 129_280, false)
        },
        "llama3-8b" => dense(Preset::Llama, 4096, 32, 32, 8, 128, 14_336, 128_256, false),
        // Same structure, a few layers, small sizes: 2 KV heads so TP 4 and 8 replicate them.
        "qwen3-tiny" => dense(Preset::Qwen3, 64, 2, 4, 2, 16, 128, 256, true),
        "qwen3-moe-tiny" => ModelConfig {
            experts: 8,
            moe_intermediate: 32,
            ..dense(Preset::Qwen3Moe, 64, 2, 4, 2, 16, 128, 256, false)
        },
        // The same structure, small: a dense first layer, then 8 routed and 2 shared experts.
        "deepseek-moe-tiny" => ModelConfig {
            experts: 8,
            moe_intermediate: 32,
            shared_experts: 2,
            first_dense_layers: 1,
            ..dense(Preset::Qwen3Moe, 64, 3, 4, 2, 16, 128, 256, false)
        },
        "llama-tiny" => dense(Preset::Llama, 64, 2, 4, 2, 16, 128, 256, false),
        "qwen2-tiny" => ModelConfig { qkv_bias: true, ..dense(Preset::Llama, 64, 2, 4, 2, 16, 128, 256, true) },
        // With a Qwen3-Next-style MTP module of one layer (`mtp.*`), for main + draft updates.
        "qwen3-tiny-mtp" => ModelConfig { mtp_layers: 1, ..dense(Preset::Qwen3, 64, 2, 4, 2, 16, 128, 256, false) },
        "qwen3-moe-tiny-mtp" => ModelConfig {
            experts: 8,
            moe_intermediate: 32,
            mtp_layers: 1,
            ..dense(Preset::Qwen3Moe, 64, 2, 4, 2, 16, 128, 256, false)
        },
        _ => return None,
    };
    Some(config)
}

/// A config.json that lacks what planning needs; names the file's missing key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config.json: {0}")]
pub struct ConfigError(pub String);

impl ModelConfig {
    /// Reads a Hugging Face `config.json` (llama, mistral, qwen2, qwen3, qwen3_moe).
    pub fn from_hf_json(name: &str, text: &str) -> Result<ModelConfig, ConfigError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        let int = |key: &str| v.get(key).and_then(serde_json::Value::as_u64);
        let need = |key: &str| int(key).ok_or_else(|| ConfigError(format!("missing integer `{key}`")));
        let model_type = v.get("model_type").and_then(|t| t.as_str()).unwrap_or("");
        let preset = Preset::for_model_type(model_type)
            .ok_or_else(|| ConfigError(format!("unsupported model_type `{model_type}`; pass --preset")))?;
        let hidden = need("hidden_size")?;
        let heads = need("num_attention_heads")?;
        if heads == 0 {
            return Err(ConfigError("`num_attention_heads` is 0".into()));
        }
        let dtype = match v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(|t| t.as_str()) {
            Some(t) => t.parse().map_err(|e| ConfigError(format!("torch_dtype: {e}")))?,
            None => DType::BF16,
        };
        Ok(ModelConfig {
            name: name.to_string(),
            preset,
            hidden,
            layers: need("num_hidden_layers")?,
            heads,
            kv_heads: int("num_key_value_heads").unwrap_or(heads),
            head_dim: int("head_dim").unwrap_or(hidden / heads),
            intermediate: int("intermediate_size").unwrap_or(0),
            vocab: need("vocab_size")?,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false),
            qkv_bias: model_type == "qwen2" || v.get("attention_bias").and_then(|t| t.as_bool()).unwrap_or(false),
            experts: int("num_experts").unwrap_or(0),
            moe_intermediate: int("moe_intermediate_size").unwrap_or(0),
            mtp_layers: int("num_nextn_predict_layers").unwrap_or(0),
            shared_experts: int("n_shared_experts").unwrap_or(0),
            first_dense_layers: int("first_k_dense_replace").unwrap_or(0),
            dtype,
        })
    }

    /// The head counts that fix the lengths of q, k and v in the presets' rules.
    pub fn head_counts(&self) -> HeadCounts {
        HeadCounts { heads: self.heads, kv_heads: self.kv_heads }
    }

    /// The tensors a trainer holds for this model, with Hugging Face names, in module order;
    /// experts one tensor each, as checkpoints store them.
    pub fn source_manifest(&self) -> Manifest {
        self.source_manifest_with(false)
    }

    /// [`ModelConfig::source_manifest`] with each layer's experts stacked as transformers 5
    /// holds them in memory: `mlp.experts.gate_up_proj` `[experts, 2 * moe_intermediate,
    /// hidden]` (gate then up) and `mlp.experts.down_proj` `[experts, hidden,
    /// moe_intermediate]`. The same as `source_manifest` for dense models.
    pub fn stacked_experts_manifest(&self) -> Manifest {
        self.source_manifest_with(true)
    }

    fn source_manifest_with(&self, stacked_experts: bool) -> Manifest {
        let h = self.hidden;
        let mut specs = Vec::new();
        let mut add = |name: String, shape: Vec<u64>| specs.push(TensorSpec::new(name, self.dtype, shape));
        add("model.embed_tokens.weight".into(), vec![self.vocab, h]);
        for l in 0..self.layers {
            self.add_layer(&format!("model.layers.{l}"), l < self.first_dense_layers, stacked_experts, &mut add);
        }
        add("model.norm.weight".into(), vec![h]);
        if !self.tie_word_embeddings {
            add("lm_head.weight".into(), vec![self.vocab, h]);
        }
        // Qwen3-Next's MTP module: the next token's embedding and the last hidden state, each
        // normed, concatenated and projected (`fc`), then decoder layers and a norm.
        if self.mtp_layers > 0 {
            add("mtp.fc.weight".into(), vec![h, 2 * h]);
            add("mtp.pre_fc_norm_embedding.weight".into(), vec![h]);
            add("mtp.pre_fc_norm_hidden.weight".into(), vec![h]);
            for l in 0..self.mtp_layers {
                self.add_layer(&format!("mtp.layers.{l}"), false, stacked_experts, &mut add);
            }
            add("mtp.norm.weight".into(), vec![h]);
        }
        Manifest::new(specs).expect("generated names are unique and well formed")
    }

    /// One decoder layer's tensors, named under `p` (with a dense MLP when `dense`, or when the
    /// model has no experts).
    fn add_layer(&self, p: &str, dense: bool, stacked_experts: bool, add: &mut impl FnMut(String, Vec<u64>)) {
        let (h, q, kv) = (self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim);
        add(format!("{p}.input_layernorm.weight"), vec![h]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![q, h]);
        add(format!("{p}.self_attn.k_proj.weight"), vec![kv, h]);
        add(format!("{p}.self_attn.v_proj.weight"), vec![kv, h]);
        if self.qkv_bias {
            add(format!("{p}.self_attn.q_proj.bias"), vec![q]);
            add(format!("{p}.self_attn.k_proj.bias"), vec![kv]);
            add(format!("{p}.self_attn.v_proj.bias"), vec![kv]);
        }
        add(format!("{p}.self_attn.o_proj.weight"), vec![h, q]);
        if matches!(self.preset, Preset::Qwen3 | Preset::Qwen3Moe) {
            add(format!("{p}.self_attn.q_norm.weight"), vec![self.head_dim]);
            add(format!("{p}.self_attn.k_norm.weight"), vec![self.head_dim]);
        }
        add(format!("{p}.post_attention_layernorm.weight"), vec![h]);
        if self.experts > 0 && !dense {
            let i = self.moe_intermediate;
            add(format!("{p}.mlp.gate.weight"), vec![self.experts, h]);
            if self.shared_experts > 0 {
                let shared = self.shared_experts * i;
                add(format!("{p}.mlp.shared_experts.gate_proj.weight"), vec![shared, h]);
                add(format!("{p}.mlp.shared_experts.up_proj.weight"), vec![shared, h]);
                add(format!("{p}.mlp.shared_experts.down_proj.weight"), vec![h, shared]);
            }
            if stacked_experts {
                add(format!("{p}.mlp.experts.gate_up_proj"), vec![self.experts, 2 * i, h]);
                add(format!("{p}.mlp.experts.down_proj"), vec![self.experts, h, i]);
            }
            for e in (0..self.experts).filter(|_| !stacked_experts) {
                add(format!("{p}.mlp.experts.{e}.gate_proj.weight"), vec![i, h]);
                add(format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![i, h]);
                add(format!("{p}.mlp.experts.{e}.down_proj.weight"), vec![h, i]);
            }
        } else {
            let i = self.intermediate;
            add(format!("{p}.mlp.gate_proj.weight"), vec![i, h]);
            add(format!("{p}.mlp.up_proj.weight"), vec![i, h]);
            add(format!("{p}.mlp.down_proj.weight"), vec![h, i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_shapes_have_the_known_tensor_counts_and_sizes() {
        let count = |n: &str| synthetic(n).unwrap().source_manifest().len();
        assert_eq!(count("qwen3-8b"), 399);
        assert_eq!(count("qwen3-30b-a3b"), 18_867);
        assert_eq!(count("qwen3-0.6b"), 310);
        assert_eq!(count("llama3-8b"), 291);
        let bytes = |n: &str| synthetic(n).unwrap().source_manifest().total_bytes();
        assert_eq!(bytes("qwen3-8b"), 16_381_470_720);
        assert_eq!(bytes("llama3-8b"), 16_060_522_496);
        // ~61 GB (30.5 B parameters in bf16), the figure DESIGN.md quotes.
        assert_eq!(bytes("qwen3-30b-a3b"), 61_064_245_248);
        // 1.04 T parameters in bf16, 1.03 T of them in the routed experts.
        assert_eq!(count("kimi-k2-shape"), 1 + 61 * (3 * 384 + 9) + 2);
        assert_eq!(bytes("kimi-k2-shape"), 2_084_348_846_592);
    }

    #[test]
    fn every_listed_synthetic_model_builds() {
        for name in SYNTHETIC_MODELS {
            let m = synthetic(name).unwrap().source_manifest();
            assert!(m.len() > 10, "{name}");
        }
        assert!(synthetic("gpt-5").is_none());
    }

    #[test]
    fn hf_config_round_trips_the_known_fields() {
        let text = r#"{"model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "intermediate_size": 6144, "vocab_size": 151936, "tie_word_embeddings": false,
            "num_experts": 128, "moe_intermediate_size": 768, "torch_dtype": "bfloat16"}"#;
        let mut cfg = ModelConfig::from_hf_json("qwen3-30b-a3b", text).unwrap();
        assert_eq!(cfg, synthetic("qwen3-30b-a3b").unwrap());
        cfg = ModelConfig::from_hf_json(
            "x",
            r#"{"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256,
            "tie_word_embeddings": true}"#,
        )
        .unwrap();
        assert_eq!(cfg, ModelConfig { name: "x".into(), ..synthetic("qwen2-tiny").unwrap() });
        let err = ModelConfig::from_hf_json("x", r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads"), "{err}");
        let err = ModelConfig::from_hf_json("x", r#"{"model_type": "mamba"}"#).unwrap_err();
        assert!(err.to_string().contains("mamba"));
    }
}
