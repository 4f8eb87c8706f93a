//! Updates between processes on loopback, through the real binary: `weightlift serve` as the
//! engine side, `weightlift push` as the trainer side, and faults a real deployment sees.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use weightlift::core::{synthetic, DType, TensorSpec};
use weightlift::write_file;

mod common;
use common::{stderr, temp_dir, Serve, EXE};

fn push(to: &[&Serve], args: &[&str]) -> Output {
    let mut cmd = Command::new(EXE);
    cmd.arg("push");
    for s in to {
        cmd.args(["--to", &s.endpoint]);
    }
    cmd.args(args).output().unwrap()
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "push failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn dense_and_moe_at_tp1_and_tp2_over_shm_and_tcp() {
    let dir = temp_dir("matrix");
    for model in ["qwen3-tiny", "qwen3-moe-tiny"] {
        for tp in [1u32, 2] {
            for transport in ["shm", "tcp"] {
                let servers: Vec<Serve> = (0..tp)
                    .map(|rank| {
                        let listen = match transport {
                            "shm" => format!("unix:{}", dir.join(format!("{model}-{tp}-{rank}.sock")).display()),
                            _ => "tcp://127.0.0.1:0".to_string(),
                        };
                        Serve::rank(model, &listen, tp, rank, &["--timeout-s", "5"])
                    })
                    .collect();
                let refs: Vec<&Serve> = servers.iter().collect();
                let args = [
                    "--synthetic",
                    model,
                    "--steps",
                    "3",
                    "--transport",
                    transport,
                    "--bucket-bytes",
                    "8192",
                    "--json",
                ];
                let v = json(&push(&refs, &args));
                let steps = v["steps"].as_array().unwrap();
                assert_eq!(steps.len(), 3);
                for (i, step) in steps.iter().enumerate() {
                    let label = format!("{model} tp {tp} {transport} step {i}");
                    assert_eq!(step["version"], (i + 1) as u64, "{label}");
                    assert_eq!(step["verified"], true, "{label}: {step}");
                    let ranks = step["ranks"].as_array().unwrap();
                    assert_eq!(ranks.len(), tp as usize);
                    assert!(ranks.iter().all(|r| r["buckets"].as_u64().unwrap() > 1), "{label}");
                }
                // A second trainer sees what the first committed, clean.
                let again =
                    json(&push(&refs, &["--synthetic", model, "--version", "4", "--transport", transport, "--json"]));
                for r in again["receivers"].as_array().unwrap() {
                    assert_eq!(r["committed"], 3);
                    assert_eq!(r["dirty"].as_array().unwrap().len(), 0);
                }
            }
        }
    }
}

/// A checkpoint of qwen3-tiny with one tensor's dtype changed and one unknown tensor added.
fn write_bad_checkpoint(dir: &Path) {
    let mut specs: Vec<TensorSpec> = synthetic("qwen3-tiny").unwrap().source_manifest().specs().to_vec();
    specs[5].dtype = DType::I64;
    specs.push(TensorSpec::new("model.layers.0.mlp.unknown_proj.weight", DType::BF16, vec![4, 4]));
    let data: Vec<Vec<u8>> = specs.iter().map(|s| vec![0u8; s.byte_len() as usize]).collect();
    let tensors: Vec<(&TensorSpec, &[u8])> = specs.iter().zip(data.iter().map(Vec::as_slice)).collect();
    write_file(&dir.join("model.safetensors"), &tensors).unwrap();
}

#[test]
fn every_fault_leaves_the_receiver_on_its_last_version_and_the_next_update_succeeds() {
    let dir = temp_dir("faults");
    let mut serve =
        Serve::rank("qwen3-tiny", &format!("unix:{}", dir.join("r.sock").display()), 1, 0, &["--timeout-s", "5"]);
    let to = |serve: &Serve| -> Vec<String> { vec!["--to".into(), serve.endpoint.clone()] };
    let base = ["--synthetic", "qwen3-tiny", "--bucket-bytes", "4096"];
    let run = |serve: &Serve, extra: &[&str]| -> Output {
        Command::new(EXE).arg("push").args(to(serve)).args(base).args(extra).output().unwrap()
    };
    let before = |out: &Output| -> (u64, usize) {
        let v = json(out);
        (v["receivers"][0]["committed"].as_u64().unwrap(), v["receivers"][0]["dirty"].as_array().unwrap().len())
    };

    assert_eq!(before(&run(&serve, &["--version", "1", "--json"])), (0, 0));

    // The sender dies (SIGABRT) after 3 of its buckets.
    let killed = run(&serve, &["--version", "2", "--fault", "abort:3"]);
    assert!(!killed.status.success() && killed.status.code().is_none(), "the sender must die by a signal");

    // A byte flipped in a bucket: the receiver names the tensor and keeps version 1.
    let flipped = run(&serve, &["--version", "2", "--fault", "flip:1", "--json"]);
    assert_eq!(flipped.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&flipped.stdout).unwrap();
    assert_eq!(v["receivers"][0]["committed"], 1, "still on version 1 after the killed sender");
    assert!(!v["receivers"][0]["dirty"].as_array().unwrap().is_empty(), "marked dirty by the killed sender");
    let rank = &v["steps"][0]["ranks"][0];
    assert_eq!(rank["verified"], false);
    assert_eq!(rank["committed"], 1);
    let mismatched = rank["mismatched"].as_array().unwrap();
    assert_eq!(mismatched.len(), 1, "{rank}");
    assert!(stderr(&flipped).contains("digest mismatch"), "{}", stderr(&flipped));

    // A manifest with a wrong dtype and an unknown name is refused, naming both.
    let ckpt = dir.join("bad-checkpoint");
    std::fs::create_dir_all(&ckpt).unwrap();
    write_bad_checkpoint(&ckpt);
    let bad = Command::new(EXE)
        .arg("push")
        .args(to(&serve))
        .args(["--model", ckpt.to_str().unwrap(), "--preset", "qwen3", "--head-dim", "16", "--version", "2"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let err = stderr(&bad);
    assert!(
        err.contains("rejected") && err.contains("`model.layers.0.mlp.unknown_proj.weight`") && err.contains("I64"),
        "{err}"
    );

    // A stale version, and the committed one again, are refused with the versions named.
    let stale = run(&serve, &["--version", "0"]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(
        stderr(&stale).contains("version 0 is stale: the receiver has already committed version 1"),
        "{}",
        stderr(&stale)
    );
    let duplicate = run(&serve, &["--version", "1"]);
    assert_eq!(duplicate.status.code(), Some(1));
    assert!(stderr(&duplicate).contains("already committed it"), "{}", stderr(&duplicate));

    // Random bytes on the socket: the connection is dropped, the receiver lives on.
    let path = serve.endpoint.strip_prefix("unix:").unwrap().to_string();
    let mut raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let _ = raw.write_all(&garbage);
    drop(raw);
    assert!(serve.is_alive());

    // The next good update succeeds and clears the dirty marks.
    let good = run(&serve, &["--version", "2", "--json"]);
    let v = json(&good);
    assert_eq!(v["receivers"][0]["committed"], 1);
    assert_eq!(v["steps"][0]["verified"], true);
    let after = json(&run(&serve, &["--version", "3", "--json"]));
    assert_eq!(after["receivers"][0]["committed"], 2);
    assert_eq!(after["receivers"][0]["dirty"].as_array().unwrap().len(), 0);
    assert!(serve.is_alive());
}

#[test]
fn demo_runs_three_verified_steps_as_json() {
    let out = Command::new(EXE).args(["demo", "--steps", "3", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["model"], "qwen3-0.6b");
    let steps = v["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3);
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["version"], (i + 1) as u64);
        assert_eq!(s["verified"], true);
        assert_eq!(s["bytes"], 1_192_099_840u64, "qwen3-0.6b is ~1.19 GB in bf16");
        assert!(s["seconds"].as_f64().unwrap() > 0.0 && s["gbps"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn demo_with_tensor_parallel_receivers_over_tcp() {
    let out = Command::new(EXE)
        .args([
            "demo",
            "--synthetic",
            "qwen3-moe-tiny",
            "--tp-size",
            "2",
            "--transport",
            "tcp",
            "--steps",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tp_size"], 2);
    assert!(v["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true));
}

#[test]
fn demo_from_a_checkpoint_directory() {
    let dir = temp_dir("demo-ckpt");
    let specs: Vec<TensorSpec> = synthetic("llama-tiny").unwrap().source_manifest().specs().to_vec();
    // Distinct bytes per tensor, so a mapping mistake could not pass unnoticed.
    let data: Vec<Vec<u8>> =
        specs.iter().enumerate().map(|(i, s)| vec![(i % 97) as u8 + 1; s.byte_len() as usize]).collect();
    let tensors: Vec<(&TensorSpec, &[u8])> = specs.iter().zip(data.iter().map(Vec::as_slice)).collect();
    write_file(&dir.join("model.safetensors"), &tensors).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 256}"#,
    )
    .unwrap();
    let out = Command::new(EXE)
        .args(["demo", "--model", dir.to_str().unwrap(), "--tp-size", "2", "--steps", "2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{v}");
}

#[test]
fn demo_runs_each_source_into_host_engines_and_refuses_mixed_flags() {
    // The same paths as `--device cuda --source ...` (the GPU tests run those), into engines
    // in host memory: a checkpoint the demo saves to disk, host memory over tcp, and over shm.
    for source in ["disk", "tcp", "host"] {
        let out = Command::new(EXE)
            .args(["demo", "--synthetic", "qwen3-tiny", "--source", source, "--device", "host"])
            .args(["--tp-size", "2", "--steps", "2", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{source}: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["source"], source, "{v}");
        assert_eq!(v["transport"], if source == "tcp" { "tcp" } else { "shm" }, "{v}");
        assert!(v["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{source}: {v}");
    }
    let out = Command::new(EXE).args(["demo", "--source", "host", "--transport", "tcp"]).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--source picks the path"), "{}", stderr(&out));
    let out = Command::new(EXE).args(["demo", "--source", "gpu", "--device", "host"]).output().unwrap();
    assert!(stderr(&out).contains("--source gpu needs --device cuda"), "{}", stderr(&out));
}

/// `weightlift serve --quant`: an FP8 engine of the model (linear weights in e4m3 with their
/// block scales) takes three verified updates from a bf16 `push` at TP 2, over shm and tcp.
#[test]
fn fp8_engines_served_with_quant_take_verified_pushes() {
    let dir = temp_dir("fp8");
    for transport in ["shm", "tcp"] {
        let servers: Vec<Serve> = (0..2)
            .map(|rank| {
                let listen = match transport {
                    "shm" => format!("unix:{}", dir.join(format!("fp8-{rank}.sock")).display()),
                    _ => "tcp://127.0.0.1:0".to_string(),
                };
                Serve::rank("qwen3-moe-tiny", &listen, 2, rank, &["--quant", "block:16", "--timeout-s", "5"])
            })
            .collect();
        let refs: Vec<&Serve> = servers.iter().collect();
        let args = ["--synthetic", "qwen3-moe-tiny", "--steps", "3", "--transport", transport, "--json"];
        let v = json(&push(&refs, &args));
        let steps = v["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 3);
        assert!(steps.iter().all(|s| s["verified"] == true), "{transport}: {v}");
    }
    // 64-row blocks split the 16 rows of k a rank holds: refused naming the tensor.
    let out = Command::new(EXE)
        .args(["serve", "--synthetic", "qwen3-moe-tiny", "--tp-size", "2", "--quant", "block:64", "--listen"])
        .arg(format!("unix:{}", dir.join("split.sock").display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("qkv_proj.weight") && err.contains("split its 64 x 64 blocks"), "{err}");
}
