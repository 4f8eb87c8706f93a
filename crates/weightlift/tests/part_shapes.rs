//! `weightlift plan` on checkpoints whose fused parts have the wrong shapes, through the built
//! binary: each is refused with exit 2, naming the part, where the fused total would fit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use weightlift::core::{synthetic, DType, TensorSpec};

mod common;
use common::{stderr, temp_dir, write_checkpoint};

/// The binary under test (WEIGHTLIFT_BIN runs these checks against another build).
fn weightlift(args: &[&str]) -> Output {
    let exe = std::env::var("WEIGHTLIFT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_weightlift").to_string());
    Command::new(exe).args(args).output().expect("runs the binary")
}

/// qwen3-tiny's config.json: 4 query heads and 2 KV heads of 16, hidden 64, intermediate 128.
const QWEN3_TINY_CONFIG: &str = r#"{"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 128,
    "vocab_size": 256, "tie_word_embeddings": true, "torch_dtype": "bfloat16"}"#;

/// A checkpoint directory of qwen3-tiny's tensors (zero-filled), with the shapes of `changes`
/// instead, the tensors of `extra` added, and config.json when `config` is set.
fn checkpoint(label: &str, changes: &[(&str, &[u64])], extra: &[TensorSpec], config: bool) -> PathBuf {
    let dir = temp_dir(label);
    let mut specs: Vec<TensorSpec> = synthetic("qwen3-tiny").unwrap().source_manifest().specs().to_vec();
    for spec in &mut specs {
        if let Some((_, shape)) = changes.iter().find(|(name, _)| *name == spec.name) {
            spec.shape = shape.to_vec();
        }
    }
    specs.extend_from_slice(extra);
    write_checkpoint(&dir, &specs);
    if config {
        std::fs::write(dir.join("config.json"), QWEN3_TINY_CONFIG).unwrap();
    }
    dir
}

/// `weightlift plan --model DIR` with `args`, which must fail with exit 2; its stderr.
fn refused(dir: &Path, args: &[&str]) -> String {
    let mut all = vec!["plan", "--model", dir.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = weightlift(&all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{all:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn gate_and_up_of_unequal_sizes_are_refused_naming_both() {
    // gate [I+2, H] and up [I-2, H]: a gate_up_proj of the right size, two gate rows in the up
    // half. No config.json: the parts are equal whatever the model's sizes.
    let (gate, up) = ("model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight");
    let dir = checkpoint("gate-up", &[(gate, &[130, 64]), (up, &[126, 64])], &[], false);
    for tp in ["1", "2"] {
        let err = refused(&dir, &["--preset", "qwen3", "--tp-size", tp]);
        let want = format!(
            "unequal parts: `model.layers.1.mlp.gate_up_proj.weight` is made of equal parts along dim 0, \
             but `{gate}` is [130, 64], `{up}` is [126, 64]"
        );
        assert!(err.contains(&want), "tp {tp}: {err}");
        assert!(err.contains("1 problem(s)"), "tp {tp}: {err}");
    }
}

#[test]
fn q_with_a_head_too_many_and_k_with_one_too_few_are_refused_naming_both() {
    // config.json gives 4 query and 2 KV heads of 16: q [80, 64] and k [16, 64] fit the fused
    // total at TP 1, and k's one head would be replicated at TP 2.
    let (q, k) = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight");
    let dir = checkpoint("q-k", &[(q, &[80, 64]), (k, &[16, 64])], &[], true);
    let qkv = "model.layers.0.self_attn.qkv_proj.weight";
    for tp in ["1", "2"] {
        let err = refused(&dir, &["--tp-size", tp, "--tp-rank", "0"]);
        assert!(err.contains(&format!("part shape: `{q}` is [80, 64], but `{qkv}` needs it to be [64, 64]")), "{err}");
        assert!(err.contains(&format!("part shape: `{k}` is [16, 64], but `{qkv}` needs it to be [32, 64]")), "{err}");
        assert!(err.contains("2 problem(s)"), "tp {tp}: {err}");
    }
}

#[test]
fn a_tensor_of_a_layer_the_engine_lacks_is_reported_as_itself() {
    // The 2-layer engine's manifest, saved from a plan of the right checkpoint.
    let good = checkpoint("engine", &[], &[], true);
    let saved = good.join("plan.json");
    let out = weightlift(&["plan", "--model", good.to_str().unwrap(), "--save", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    let engine = good.join("engine.json");
    std::fs::write(&engine, serde_json::json!({ "specs": plan["destinations"] }).to_string()).unwrap();

    let up = "model.layers.2.mlp.up_proj.weight";
    let extra = TensorSpec::new(up, DType::BF16, vec![128, 64]);
    let dir = checkpoint("extra-layer", &[], &[extra], true);
    let err = refused(&dir, &["--engine", engine.to_str().unwrap()]);
    let want = format!("no destination: `model.layers.2.mlp.gate_up_proj.weight` (from `{up}`)");
    assert!(err.contains(&want), "{err}");
    assert!(!err.contains("gate_proj"), "not a missing partner: {err}");
    assert!(err.contains("1 problem(s)"), "{err}");
}
