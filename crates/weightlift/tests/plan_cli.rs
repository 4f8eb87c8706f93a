//! `weightlift plan` end to end, through the built binary.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use weightlift::core::{synthetic, DType, TensorSpec};

mod common;
use common::{stderr, temp_dir, write_checkpoint};

fn weightlift(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weightlift")).args(args).output().expect("runs the binary")
}

/// Runs the binary, killing it (and failing) if it takes more than 20 s: a regression that
/// waits on a FIFO must not hang the suite.
fn weightlift_within_20s(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weightlift"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs the binary");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("`weightlift {}` did not finish within 20 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn tiny_specs() -> Vec<TensorSpec> {
    synthetic("qwen3-tiny").unwrap().source_manifest().specs().to_vec()
}

#[test]
fn qwen3_8b_at_tp2_sends_each_rank_its_half() {
    let mut total = 0;
    for rank in ["0", "1"] {
        let out = weightlift(&["plan", "--synthetic", "qwen3-8b", "--tp-size", "2", "--tp-rank", rank, "--json"]);
        let v = json_of(&out);
        let (source, dest, send) = (
            v["source_bytes"].as_u64().unwrap(),
            v["destination_bytes"].as_u64().unwrap(),
            v["bytes_to_send"].as_u64().unwrap(),
        );
        assert_eq!(v["covered"], true);
        assert_eq!(source, 16_381_470_720);
        assert_eq!(send, dest);
        let ratio = send as f64 / source as f64;
        assert!((0.4999..0.5001).contains(&ratio), "rank {rank} sends {ratio} of the model");
        assert!(v["ops"].as_u64().unwrap() > 0 && v["buckets"].as_u64().unwrap() > 0);
        assert_eq!(v["plan_hash"].as_str().unwrap().len(), 16);
        total += send;
    }
    // Both halves together are the model plus one extra copy of the replicated norms.
    assert!(total > 16_381_470_720 && total < 16_381_470_720 + 2_000_000);
}

#[test]
fn human_summary_names_the_model_and_coverage() {
    let out = weightlift(&["plan", "--synthetic", "qwen3-moe-tiny", "--tp-size", "2", "--expert-parallel"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("qwen3-moe-tiny (qwen3-moe), tp rank 0/2"), "{text}");
    assert!(text.contains("every destination byte written exactly once"), "{text}");
}

#[test]
fn checkpoint_directory_plans_from_headers_and_config() {
    let dir = temp_dir("ckpt");
    write_checkpoint(&dir, &tiny_specs());
    // No config.json: the preset must be named, and the head dim comes from q_norm.
    let out = weightlift(&["plan", "--model", dir.to_str().unwrap(), "--tp-size", "2", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--preset"), "{}", stderr(&out));
    let v = json_of(&weightlift(&[
        "plan",
        "--model",
        dir.to_str().unwrap(),
        "--preset",
        "qwen3",
        "--tp-size",
        "2",
        "--json",
    ]));
    let expected = json_of(&weightlift(&["plan", "--synthetic", "qwen3-tiny", "--tp-size", "2", "--json"]));
    assert_eq!(v["bytes_to_send"], expected["bytes_to_send"]);
    assert_eq!(v["ops"], expected["ops"]);
}

#[test]
fn extra_and_missing_tensors_fail_with_exit_2_naming_them() {
    let dir = temp_dir("extra");
    let mut specs = tiny_specs();
    specs.push(TensorSpec::new("model.layers.0.mlp.shared_expert.up_proj.weight", DType::BF16, vec![8, 64]));
    specs.retain(|s| s.name != "model.layers.1.self_attn.v_proj.weight");
    write_checkpoint(&dir, &specs);
    let out = weightlift(&["plan", "--model", dir.to_str().unwrap(), "--preset", "qwen3"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`model.layers.0.mlp.shared_expert.up_proj.weight`"), "{err}");
    assert!(err.contains("`model.layers.1.self_attn.v_proj.weight`"), "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
}

#[test]
fn an_engine_manifest_with_a_wrong_shape_is_named() {
    let dir = temp_dir("engine");
    let saved = dir.join("plan.json");
    let ok = weightlift(&["plan", "--synthetic", "llama-tiny", "--save", saved.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let plan: serde_json::Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    let mut specs = plan["destinations"].as_array().unwrap().clone();
    specs[3]["shape"][0] = serde_json::json!(7);
    let name = specs[3]["name"].as_str().unwrap().to_string();
    let engine = dir.join("engine.json");
    std::fs::write(&engine, serde_json::json!({ "specs": specs }).to_string()).unwrap();
    let out = weightlift(&["plan", "--synthetic", "llama-tiny", "--engine", engine.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(&format!("shape mismatch: `{name}`")), "{}", stderr(&out));
}

#[test]
fn malformed_safetensors_is_a_clear_error_not_a_panic() {
    let dir = temp_dir("malformed");
    std::fs::write(dir.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}").unwrap();
    let out = weightlift(&["plan", "--model", dir.to_str().unwrap(), "--preset", "qwen3"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("model.safetensors") && err.contains("not a valid safetensors file"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn plan_and_push_refuse_what_is_not_a_regular_file_or_repeats_a_name_alike() {
    let fifo = temp_dir("fifo");
    let path = fifo.join("model.safetensors");
    rustix::fs::mkfifoat(rustix::fs::CWD, &path, rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR).unwrap();
    let fifo_message = format!("{} is a FIFO, not a regular file", path.display());
    let directory = temp_dir("directory");
    std::fs::create_dir(directory.join("model.safetensors")).unwrap();
    let directory_message =
        format!("{} is a directory, not a regular file", directory.join("model.safetensors").display());
    let repeated = temp_dir("repeated");
    let h = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#
    )
    .as_bytes();
    let path = repeated.join("model.safetensors");
    std::fs::write(&path, [(h.len() as u64).to_le_bytes().to_vec(), h.to_vec(), vec![0; 8]].concat()).unwrap();
    let repeated_message = format!("duplicate tensor name `w` in the header of {}", path.display());
    let nobody = format!("unix:{}", temp_dir("nobody").join("r.sock").display());
    for (dir, message) in [(fifo, fifo_message), (directory, directory_message), (repeated, repeated_message)] {
        let dir = dir.to_str().unwrap();
        let plan = weightlift_within_20s(&["plan", "--model", dir, "--preset", "qwen3"]);
        let push = weightlift_within_20s(&["push", "--model", dir, "--preset", "qwen3", "--to", &nobody]);
        for out in [&plan, &push] {
            assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
            assert_eq!(stderr(out), format!("error: {message}\n"));
        }
    }
}

#[test]
fn bad_options_are_usage_errors() {
    let out = weightlift(&["plan", "--synthetic", "qwen3-8b", "--tp-size", "2", "--tp-rank", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("rank 2 of 2"), "{}", stderr(&out));
    let out = weightlift(&["plan", "--synthetic", "gpt-9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("gpt-9") && stderr(&out).contains("qwen3-8b"), "{}", stderr(&out));
    let out = weightlift(&["plan", "--synthetic", "qwen3-8b", "--tp-size", "3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("q_proj.weight"), "{}", stderr(&out));
}

/// `--placement`: the cluster model over every rank of every engine. Three TP 1 replicas of
/// Qwen3-30B-A3B on one host: with fan-out the trainer's GPU sends the model once (each
/// replica forwards it), without it three times, and the time is that at NVLink's rate. Four
/// trainer ranks into two TP 2 replicas over the network: each trainer rank sends a quarter
/// of each class's bytes. A placement with a field it does not know is refused by name.
#[test]
fn a_placement_gets_the_bytes_of_every_link_and_the_time_of_one_update() {
    let placements = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/placements");
    let fan_out = placements.join("one-host-fan-out-3.json");
    let json = json_of(&weightlift(&[
        "plan",
        "--synthetic",
        "qwen3-30b-a3b",
        "--placement",
        fan_out.to_str().unwrap(),
        "--json",
    ]));
    let model = 61_064_245_248u64;
    assert_eq!(json["model_bytes"], model);
    assert_eq!(json["fan_out"]["trainer_egress_bytes"], model);
    assert_eq!(json["fan_out"]["engine_forward_bytes"], model);
    assert_eq!(json["per_replica"]["trainer_egress_bytes"], 3 * model);
    let seconds = json["fan_out"]["seconds"].as_f64().unwrap();
    assert!((seconds - model as f64 / 330e9).abs() < 1e-9, "{seconds}");
    assert_eq!(json["engines"][0]["classes"], 1);
    assert_eq!(json["engines"][0]["receivers_per_class"], 3);

    let dir = temp_dir("placement");
    let sharded = dir.join("sharded.json");
    std::fs::write(
        &sharded,
        r#"{"trainer": {"ranks": 4}, "engines": [{"replicas": 2, "tp": 2}],
            "links": {"nvlink_gbps": 450, "network_gbps": 50}}"#,
    )
    .unwrap();
    let json = json_of(&weightlift(&[
        "plan",
        "--synthetic",
        "qwen3-30b-a3b",
        "--placement",
        sharded.to_str().unwrap(),
        "--json",
    ]));
    let ranks: Vec<u64> =
        json["engines"][0]["rank_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert_eq!(ranks.len(), 2);
    let egress = json["fan_out"]["trainer_egress_bytes"].as_u64().unwrap();
    let sum: u64 = ranks.iter().sum();
    assert!(egress >= sum / 4 && egress < sum / 4 + sum / 100, "{egress} of {sum}");
    assert!(json["fan_out"]["bottleneck"].as_str().unwrap().starts_with("engine GPU ingress (network)"), "{json}");
    assert_eq!(json["communicators_per_trainer_rank"], 2);

    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"trainer": {"ranks": 4, "gpus": 8}, "engines": [], "links": {"nvlink_gbps": 1, "network_gbps": 1}}"#,
    )
    .unwrap();
    let out = weightlift(&["plan", "--synthetic", "qwen3-tiny", "--placement", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("bad.json") && err.contains("unknown field `gpus`"), "{err}");
}

/// `--dtype F8_E4M3 --quant block:128`: the linear weights quantized, each with its block
/// scales among the engine's covered parameters (fused qkv: the three projections' rows
/// together; stacked experts: a grid per expert); at TP 4 Qwen3-30B-A3B's expert slices of 192
/// rows split blocks, which is refused naming the tensor.
#[test]
fn fp8_block_quantization_reports_every_scale_covered() {
    let json = json_of(&weightlift(&[
        "plan",
        "--synthetic",
        "qwen3-30b-a3b",
        "--dtype",
        "F8_E4M3",
        "--quant",
        "block:128",
        "--json",
    ]));
    let quant = &json["quant"];
    assert_eq!(quant["scheme"], "block:128");
    assert_eq!(quant["dtype"], "F8_E4M3");
    assert_eq!(quant["scales_covered"], true);
    let scales = quant["scales"].as_array().unwrap();
    let shape_of = |name: &str| scales.iter().find(|s| s["name"] == name).map(|s| s["shape"].clone());
    let qkv = shape_of("model.layers.0.self_attn.qkv_proj.weight_scale_inv");
    assert_eq!(qkv, Some(serde_json::json!([40, 16])), "(4096 + 2 x 512) / 128 rows, 2048 / 128 columns");
    let experts = shape_of("model.layers.0.mlp.experts.w13_weight_scale_inv");
    assert_eq!(experts, Some(serde_json::json!([128, 12, 16])));
    assert!(
        shape_of("model.embed_tokens.weight_scale_inv").is_none() && shape_of("lm_head.weight_scale_inv").is_none()
    );
    // The plan is of the FP8 engine itself: its destinations are the engine's parameters,
    // scales included, and the quantized blocks travel in bf16.
    assert_eq!(quant["engine_tensors"], json["destination_tensors"]);
    assert_eq!(json["covered"], true);
    let (sent, held) = (json["bytes_to_send"].as_u64().unwrap(), json["destination_bytes"].as_u64().unwrap());
    assert!(sent > held, "bf16 blocks for FP8 weights: {sent} sent for {held} held");

    let out = weightlift(&["plan", "--synthetic", "qwen3-30b-a3b", "--quant", "block:128", "--tp-size", "4"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("experts.w13_weight") && err.contains("rows (0, 192)") && err.contains("more"), "{err}");
}
