//! GPU updates between processes over CUDA IPC, and from host memory and disk into GPU
//! receivers through device staging (ignored without a GPU: run `scripts/gpu-tests.sh` on a
//! GPU machine). The receiver side runs in this test process so
//! its bytes can be read back; the sender is `weightlift push --device cuda:0`, or the other
//! way round where the test must control the sender's memory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use serde_json::Value;
use weightlift::core::{destination_manifest, exec, plan, synthetic, PresetOptions, SourceSet, TpRank, Version};
use weightlift::{
    Endpoint, GpuTensors, HostTensors, Receiver, ReceiverOptions, SendError, Sender, SenderOptions, TransportKind,
};
use weightlift_cuda::{device_count, Gpu};

mod common;
use common::Truncated;

fn exe() -> String {
    std::env::var("WEIGHTLIFT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_weightlift").to_string())
}

fn gpu(ordinal: usize) -> Arc<Gpu> {
    Arc::new(Gpu::open(ordinal).unwrap_or_else(|e| panic!("needs a GPU: {e}")))
}

fn socket(label: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("wl-gpu-{}-{label}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn ipc_updates_are_bit_exact_for_dense_and_moe_at_tp1_and_tp2_on_the_same_and_another_gpu() {
    let gpus = device_count().expect("needs a GPU");
    let receiver_devices: Vec<usize> = if gpus >= 2 { vec![0, 1] } else { vec![0] };
    for (model, tp_size, vmm) in [("qwen3-tiny", 1, false), ("qwen3-moe-tiny", 2, true), ("qwen2-tiny", 2, false)] {
        for &device in &receiver_devices {
            let ranks = gpu_ranks(model, tp_size, device, &format!("{model}-{device}"), ReceiverOptions::default());
            // The sender: another process, 5 versions, each with every weight changed.
            let mut push = Command::new(exe());
            push.args(["push", "--synthetic", model, "--device", "cuda:0", "--steps", "5", "--json"]);
            if vmm {
                push.arg("--vmm");
            }
            for e in &ranks.endpoints {
                push.args(["--to", e]);
            }
            let out = push.output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{model} -> cuda:{device}: push failed: {stderr}");
            let json: Value = serde_json::from_slice(&out.stdout).unwrap();
            let steps = json["steps"].as_array().unwrap();
            assert_eq!(steps.len(), 5);
            for (k, step) in steps.iter().enumerate() {
                assert_eq!(step["verified"], true, "{model} -> cuda:{device} step {k}");
                let ranks = step["ranks"].as_array().unwrap();
                // Mapped once, on the first update (by one rank: ranks in one process share a
                // legacy mapping); reused by every later one.
                let opens: u64 = ranks.iter().map(|r| r["ipc_opens"].as_u64().unwrap()).sum();
                if k == 0 {
                    assert!(opens >= 1, "{model}: first update opened nothing");
                } else {
                    assert_eq!(opens, 0, "{model} step {k}: mappings were not reused");
                }
                for rank in ranks {
                    assert_eq!(rank["same_gpu"], device == 0);
                    assert!(rank["device_extra_bytes"].as_u64().unwrap() < 64 << 20);
                }
            }
            // Byte compare with the host reference of the last version.
            let mut trainer = HostTensors::synthetic(&ranks.config, 7);
            for _ in 0..5 {
                trainer.perturb();
            }
            ranks.assert_hold(&trainer, 5);
        }
    }
}

/// Updates over NCCL from a trainer process on cuda:0. With a second GPU, into receivers on
/// it: three versions, verified, bit exact. On one GPU, NCCL refuses two ranks of one
/// communicator on the same GPU: the update fails on both sides with NCCL's error named, soon
/// (no rank waits out a deadline), and the receivers stay on their version.
#[test]
#[ignore = "needs a GPU and NCCL: run scripts/gpu-tests.sh on a GPU machine"]
fn nccl_updates_reach_another_gpu_and_on_one_gpu_fail_cleanly_by_name() {
    let gpus = device_count().expect("needs a GPU");
    let device = if gpus >= 2 { 1 } else { 0 };
    let options = ReceiverOptions { timeout: std::time::Duration::from_secs(20), ..ReceiverOptions::default() };
    let ranks = gpu_ranks("qwen3-moe-tiny", 2, device, "nccl", options);
    let mut push = Command::new(exe());
    push.args(["push", "--synthetic", "qwen3-moe-tiny", "--device", "cuda:0", "--transport", "nccl"]);
    push.args(["--steps", "3", "--json"]);
    for e in &ranks.endpoints {
        push.args(["--to", e]);
    }
    let started = std::time::Instant::now();
    let out = push.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if gpus >= 2 {
        assert!(out.status.success(), "push over nccl failed: {stderr}");
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        for step in json["steps"].as_array().unwrap() {
            assert_eq!(step["verified"], true, "{step}");
        }
        let mut trainer = HostTensors::synthetic(&ranks.config, 7);
        for _ in 0..3 {
            trainer.perturb();
        }
        ranks.assert_hold(&trainer, 3);
    } else {
        assert!(!out.status.success(), "two NCCL ranks on one GPU cannot work: {stderr}");
        assert!(stderr.contains("NCCL"), "the error should name NCCL: {stderr}");
        assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
        for (tp, _, _, receiver) in &ranks.ranks {
            assert_eq!(receiver.committed(), Version(0), "{tp}");
        }
    }
}

/// Fan-out over NCCL from a trainer process on cuda:0 into `weightlift serve` processes (needs
/// 4 GPUs; with fewer it says so and checks nothing, the multi-GPU issues run it): three TP 1
/// replicas on cuda:1-3 and two TP 2 replicas (rank 0 on cuda:1 and cuda:2, rank 1 on cuda:2
/// and cuda:3) take three versions in one push, every rank verified, the TP 1 replicas fed
/// through one communicator of 4 ranks (one broadcast for the three) and each TP 2 rank through
/// one of 3. Then faults: the trainer dies mid-update (abort:1), and a replica is killed while
/// the trainer stalls mid-update; each time no rank commits, and the next push (a new
/// communicator) commits everywhere it can reach.
#[test]
#[ignore = "needs 4 GPUs and NCCL: run scripts/gpu-tests.sh on a GPU machine"]
fn nccl_fan_out_feeds_replicas_in_one_broadcast_and_a_dead_rank_commits_nothing() {
    let gpus = device_count().expect("needs a GPU");
    if gpus < 4 {
        eprintln!("skipped: fan-out over NCCL needs 4 GPUs, this machine has {gpus}");
        return;
    }
    let model = "qwen3-moe-tiny";
    // (TP size, TP rank, GPU) of every receiver.
    let layout = [(1, 0, 1), (1, 0, 2), (1, 0, 3), (2, 0, 1), (2, 1, 2), (2, 0, 2), (2, 1, 3)];
    let mut servers: Vec<Option<(Killed, Endpoint)>> = layout
        .iter()
        .enumerate()
        .map(|(i, &(size, rank, device))| {
            let tp = ["--tp-size".to_string(), size.to_string(), "--tp-rank".to_string(), rank.to_string()];
            let tp: Vec<&str> = tp.iter().map(String::as_str).collect();
            let (server, endpoint, _) = serve_on_gpu(model, device, &format!("fan-out-{i}"), false, &tp);
            Some((server, endpoint))
        })
        .collect();
    let push = |servers: &[Option<(Killed, Endpoint)>], extra: &[&str]| {
        let mut push = Command::new(exe());
        push.args(["push", "--synthetic", model, "--device", "cuda:0", "--transport", "nccl", "--json"]);
        push.args(extra);
        for (_, endpoint) in servers.iter().flatten() {
            push.args(["--to", &endpoint.to_string()]);
        }
        push.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let steps = |out: &std::process::Output| -> Vec<Value> {
        let json: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        json["steps"].as_array().cloned().unwrap_or_default()
    };
    let out = push(&servers, &["--steps", "3"]).wait_with_output().unwrap();
    assert!(out.status.success(), "fan-out push failed: {}", String::from_utf8_lossy(&out.stderr));
    for step in steps(&out) {
        assert_eq!(step["verified"], true, "{step}");
        let ranks: Vec<u64> =
            step["ranks"].as_array().unwrap().iter().map(|r| r["nccl_ranks"].as_u64().unwrap()).collect();
        assert_eq!(ranks, [4, 4, 4, 3, 3, 3, 3], "one communicator per class of the same bytes: {step}");
    }

    // The trainer dies after its first bucket: every receiver fails by its deadline, on v3.
    let out = push(&servers, &["--version", "4", "--fault", "abort:1"]).wait_with_output().unwrap();
    assert!(!out.status.success(), "the trainer was to abort");
    let out = push(&servers, &["--version", "4"]).wait_with_output().unwrap();
    assert!(out.status.success(), "after a dead trainer: {}", String::from_utf8_lossy(&out.stderr));
    let step = &steps(&out)[0];
    let committed: Vec<u64> =
        step["ranks"].as_array().unwrap().iter().map(|r| r["committed"].as_u64().unwrap()).collect();
    assert_eq!(committed, [4; 7], "{step}");

    // A TP 1 replica killed while the trainer stalls mid-update: nobody commits version 5.
    let child = push(&servers, &["--version", "5", "--fault", "stall:1"]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    drop(servers[1].take());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a replica died: the version cannot commit");
    for step in steps(&out) {
        for rank in step["ranks"].as_array().unwrap() {
            assert_eq!(rank["committed"].as_u64(), Some(4), "{rank}");
        }
    }
    let out = push(&servers, &["--version", "6"]).wait_with_output().unwrap();
    assert!(out.status.success(), "the survivors take the next version: {}", String::from_utf8_lossy(&out.stderr));
    let step = &steps(&out)[0];
    assert_eq!(step["verified"], true, "{step}");
    let ranks: Vec<u64> = step["ranks"].as_array().unwrap().iter().map(|r| r["nccl_ranks"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [3, 3, 3, 3, 3, 3], "{step}");
}

/// A `weightlift serve --device cuda:N` process and where senders connect; with `http`, also
/// serving its HTTP API on a free loopback port, and that address.
fn serve_on_gpu(
    model: &str,
    device: usize,
    label: &str,
    http: bool,
    extra: &[&str],
) -> (Killed, Endpoint, Option<String>) {
    let path = socket(label);
    let mut child = Command::new(exe())
        .args(["serve", "--synthetic", model, "--device", &format!("cuda:{device}")])
        .args(["--listen", &format!("unix:{}", path.display()), "--timeout-s", "10"])
        .args(if http { &["--http", "127.0.0.1:0"][..] } else { &[] })
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("serve says where it listens").unwrap();
    let endpoint = next().strip_prefix("listening on ").expect("the socket first").parse().unwrap();
    let http = http.then(|| next().strip_prefix("http on http://").expect("then the HTTP API").to_string());
    (Killed(child), endpoint, http)
}

/// POSTs a JSON body; the status and the response body.
fn post(addr: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body.as_bytes())).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn serve_on_a_gpu_releases_and_resumes_its_weights_over_http() {
    let gpu = gpu(0);
    let model = "qwen3-tiny";
    let config = synthetic(model).unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let trainer = HostTensors::synthetic(&config, 3);
    let mut tensors = GpuTensors::alloc(&gpu, &config.source_manifest()).unwrap();
    tensors.upload(&trainer).unwrap();
    for backup in [false, true] {
        let extra: &[&str] = if backup { &["--weights-backup"] } else { &[] };
        let (_server, endpoint, http) = serve_on_gpu(model, 0, &format!("release-{backup}"), true, extra);
        let http = http.expect("serving HTTP");
        let options = SenderOptions { transport: TransportKind::CudaIpc, ..SenderOptions::default() };
        let mut sender = Sender::connect(&endpoint, &config.source_manifest(), &rules, options).unwrap();
        let first = sender.push_device(Version(1), &gpu, &tensors).unwrap();
        assert!(first.verified, "{first:?}");
        let (status, body) = post(&http, "/weights_checker", r#"{"action": "snapshot"}"#);
        assert_eq!(status, 200, "{body}");
        let (free_before, _) = gpu.memory_info().unwrap();
        let (status, body) = post(&http, "/release_memory_occupation", r#"{"tags": ["weights"]}"#);
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(r#""weights":"#) && !body.contains(r#""weights":0"#), "weights paused: {body}");
        // The engine's pool maps 256 MiB chunks: the weights' chunk went back to the driver.
        let (free_released, _) = gpu.memory_info().unwrap();
        assert!(free_released >= free_before + (128 << 20), "{free_before} -> {free_released} bytes free");
        // Updates into released memory are refused by name, over IPC and over HTTP.
        let refused = sender.push_device(Version(2), &gpu, &tensors).unwrap_err().to_string();
        assert!(refused.contains("`weights`") && refused.contains("paused"), "{refused}");
        let (status, body) = post(&http, "/update_weights", r#"{"version": "2", "source": {"disk": "/nonexistent"}}"#);
        assert!(status == 409 && body.contains("released"), "{status} {body}");
        let (status, body) = post(&http, "/resume_memory_occupation", r#"{"tags": []}"#);
        assert_eq!(status, 200, "{body}");
        // With a backup the bytes came back; without one they are gone until the next update
        // rewrites them (the same weights again: the engine's copy was lost).
        let (status, body) = post(&http, "/weights_checker", r#"{"action": "compare"}"#);
        assert_eq!((status, body.contains(r#""success":true"#)), (200, backup), "{body}");
        let second = sender.push_device(Version(2), &gpu, &tensors).unwrap();
        assert!(second.verified && second.ipc_opens == 0, "{second:?}");
        let (status, body) = post(&http, "/weights_checker", r#"{"action": "compare"}"#);
        assert!(status == 200 && body.contains(r#""success":true"#), "{body}");
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_sender_that_reallocates_its_tensors_is_detected_and_reimported_not_read_stale() {
    let gpu = gpu(0);
    // cudaMalloc memory (legacy IPC), weightlift's VMM allocation, and VMM pieces of 2 MiB side
    // by side with tensors spanning them (torch's expandable segments, in small: ~570 pieces
    // for Qwen3-0.6B, so also ~570 descriptors passed).
    for kind in ["legacy", "vmm", "pieces"] {
        let model = if kind == "pieces" { "qwen3-0.6b" } else { "qwen3-tiny" };
        let config = synthetic(model).unwrap();
        let preset = PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false };
        let rules = config.preset.rules(preset).unwrap();
        let (_server, endpoint, _) = serve_on_gpu(model, 0, &format!("realloc-{kind}"), false, &[]);
        let options = SenderOptions { transport: TransportKind::CudaIpc, ..SenderOptions::default() };
        let mut sender = Sender::connect(&endpoint, &config.source_manifest(), &rules, options).unwrap();
        let alloc = |gpu: &Gpu| match kind {
            "legacy" => GpuTensors::alloc(gpu, &config.source_manifest()).unwrap(),
            "vmm" => GpuTensors::alloc_shareable(gpu, &config.source_manifest()).unwrap(),
            _ => GpuTensors::alloc_pieces(gpu, &config.source_manifest(), 2 << 20).unwrap(),
        };
        let mut trainer = HostTensors::synthetic(&config, 3);
        let mut tensors = alloc(&gpu);
        tensors.upload(&trainer).unwrap();
        let first = sender.push_device(Version(1), &gpu, &tensors).unwrap();
        assert!(first.verified && first.ipc_opens >= 1, "{first:?}");
        let second = sender.push_device(Version(2), &gpu, &tensors).unwrap();
        assert!(second.verified && second.ipc_opens == 0, "{second:?}");
        // Free and allocate again (the driver tends to hand back the same address), with new
        // weights: the receiver must map the new allocation, not read the old mapping.
        let old = tensors.ptrs()[0];
        drop(tensors);
        let mut tensors = alloc(&gpu);
        trainer.perturb();
        tensors.upload(&trainer).unwrap();
        // Refused after the sender described the new memory (version 2 is committed): that
        // description never reached the receiver, so it must not be taken as known there.
        let refused = sender.push_device(Version(2), &gpu, &tensors).unwrap_err();
        assert!(matches!(refused, SendError::Refused { .. }), "{kind}: {refused}");
        let third = sender.push_device(Version(3), &gpu, &tensors).unwrap();
        assert!(third.verified, "{kind}: {third:?}");
        assert!(third.ipc_opens >= 1, "{kind}: reallocated memory was not re-imported: {third:?}");
        if kind == "pieces" {
            assert!(first.ipc_opens > 1 && third.ipc_opens == first.ipc_opens, "one open per piece: {third:?}");
        }
        eprintln!("{kind}: reallocated at the same address: {}", old == tensors.ptrs()[0]);
        let fourth = sender.push_device(Version(4), &gpu, &tensors).unwrap();
        assert!(fourth.verified && fourth.ipc_opens == 0, "{fourth:?}");
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn gpu_ranks_commit_a_version_all_or_none_and_an_update_without_sender_digests_is_not_verified() {
    use weightlift::{Trainer, UpdateOutcome};
    let gpu = gpu(0);
    let model = "qwen3-tiny";
    let config = synthetic(model).unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let trainer = HostTensors::synthetic(&config, 3);
    let mut tensors = GpuTensors::alloc(&gpu, &config.source_manifest()).unwrap();
    tensors.upload(&trainer).unwrap();
    let ranks: Vec<(Killed, Endpoint)> = (0..2)
        .map(|rank| {
            let tp = ["--tp-size", "2", "--tp-rank", if rank == 0 { "0" } else { "1" }];
            let (server, endpoint, _) = serve_on_gpu(model, 0, &format!("group-{rank}"), false, &tp);
            (server, endpoint)
        })
        .collect();
    let connect = |digests: bool| {
        let options =
            SenderOptions { transport: TransportKind::CudaIpc, sender_digests: digests, ..SenderOptions::default() };
        let endpoints: Vec<Endpoint> = ranks.iter().map(|(_, e)| e.clone()).collect();
        Trainer::connect(&endpoints, &config.source_manifest(), &rules, &options).unwrap()
    };
    // Rank 0 alone goes ahead to version 5.
    let options = SenderOptions { transport: TransportKind::CudaIpc, ..SenderOptions::default() };
    let mut alone = Sender::connect(&ranks[0].1, &config.source_manifest(), &rules, options).unwrap();
    assert!(alone.push_device(Version(5), &gpu, &tensors).unwrap().is_committed());
    let step = connect(true).push_device(Version(3), &gpu, &tensors).unwrap();
    assert!(!step.committed, "{step:?}");
    let outcomes: Vec<UpdateOutcome> = step.ranks.iter().map(|r| r.outcome).collect();
    assert_eq!(outcomes, [UpdateOutcome::Refused, UpdateOutcome::Aborted], "{:?}", step.failure());
    let states = connect(true).receivers_at_connect();
    assert_eq!((states[1].committed, states[1].dirty.len()), (Version(0), 0), "rank 1 was not written");
    // Without the sender's digests: committed on both, reported not verified.
    let step = connect(false).push_device(Version(6), &gpu, &tensors).unwrap();
    assert!(step.committed && !step.verified, "{step:?}");
    assert!(step.ranks.iter().all(|r| r.is_committed() && !r.verified && !r.sender_digests), "{step:?}");
    let step = connect(true).push_device(Version(7), &gpu, &tensors).unwrap();
    assert!(step.committed && step.verified, "{step:?}");
}

/// Receivers on GPU `device` for every rank of `model` at `tp_size`, serving from this process,
/// with what each holds and where it listens.
struct GpuRanks {
    config: weightlift::core::ModelConfig,
    rules: weightlift::core::RuleSet,
    ranks: Vec<(TpRank, weightlift::core::Manifest, Arc<GpuTensors>, Receiver)>,
    endpoints: Vec<String>,
}

fn gpu_ranks(model: &str, tp_size: u32, device: usize, label: &str, options: ReceiverOptions) -> GpuRanks {
    let config = synthetic(model).unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let source = SourceSet::single(config.source_manifest());
    let gpu = gpu(device);
    let (mut ranks, mut endpoints) = (Vec::new(), Vec::new());
    for tp in TpRank::all(tp_size) {
        let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
        let mut tensors = GpuTensors::alloc(&gpu, &dest).unwrap();
        tensors.fill(&gpu, 0).unwrap();
        let tensors = Arc::new(tensors);
        let receiver =
            Receiver::on_gpu(gpu.clone(), tensors.clone(), ReceiverOptions { tp, ..options.clone() }).unwrap();
        let path = socket(&format!("{label}-{}", tp.rank));
        let listener = Endpoint::Unix(path.clone()).bind().unwrap();
        let serving = receiver.clone();
        std::thread::spawn(move || serving.serve(&listener));
        endpoints.push(format!("unix:{}", path.display()));
        ranks.push((tp, dest, tensors, receiver));
    }
    GpuRanks { config, rules, ranks, endpoints }
}

impl GpuRanks {
    /// Every rank holds exactly what the plan makes of `trainer`, and says so by digest.
    fn assert_hold(&self, trainer: &HostTensors, version: u64) {
        let source = SourceSet::single(self.config.source_manifest());
        let (_, data) = trainer.clone().into_parts();
        let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        for (tp, dest, tensors, receiver) in &self.ranks {
            let plan = plan(&source, dest, &self.rules, *tp).unwrap();
            let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
            exec::execute(&plan, &refs, &mut expected).unwrap();
            let (_, got) = tensors.download().unwrap().into_parts();
            for (i, want) in expected.iter().enumerate() {
                assert!(&got[i] == want, "{tp}: `{}` differs", dest.specs()[i].name);
            }
            assert_eq!(receiver.committed(), Version(version), "{tp}");
            assert!(receiver.dirty().is_empty(), "{tp}");
            let digests: Vec<u64> = expected.iter().map(|b| weightlift::core::digest::digest(b)).collect();
            assert_eq!(receiver.current_digests().unwrap(), digests);
        }
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn host_tensors_reach_gpu_receivers_over_shm_tcp_and_in_process_bit_exact() {
    for (model, tp_size) in [("qwen3-tiny", 1), ("qwen3-moe-tiny", 2)] {
        // shm: buckets copied into the receivers' device slots by the trainer's process (digested
        // there on the GPU, or from the sources on the CPU); through the ring when asked; tcp
        // cannot map them.
        for (transport, ring, host_digests) in
            [("shm", false, false), ("shm", false, true), ("shm", true, false), ("tcp", false, false)]
        {
            let label = format!("staged-{model}-{transport}-{ring}-{host_digests}");
            let ranks = gpu_ranks(model, tp_size, 0, &label, ReceiverOptions::default());
            let mut push = Command::new(exe());
            push.args(["push", "--synthetic", model, "--device", "host", "--transport", transport]);
            push.args(["--steps", "3", "--bucket-bytes", "65536", "--json"]);
            if ring {
                push.arg("--no-device-writes");
            }
            if host_digests {
                push.arg("--host-digests");
            }
            for e in &ranks.endpoints {
                push.args(["--to", e]);
            }
            let out = push.output().unwrap();
            assert!(out.status.success(), "{model} {transport}: {}", String::from_utf8_lossy(&out.stderr));
            let json: Value = serde_json::from_slice(&out.stdout).unwrap();
            let slots = transport == "shm" && !ring;
            for writes in json["device_writes"].as_array().unwrap() {
                assert_eq!(writes.as_bool(), Some(slots), "{model} {transport} ring {ring}: {json}");
            }
            // One staging buffer, or two device slots, of one bucket each, rounded to 2 MiB.
            let most = if slots { 2 * (2 << 20) } else { 2 << 20 };
            for step in json["steps"].as_array().unwrap() {
                assert_eq!(step["verified"], true, "{model} {transport}: {step}");
                for rank in step["ranks"].as_array().unwrap() {
                    assert!(rank["buckets"].as_u64().unwrap() > 1, "{rank}");
                    assert!(rank["device_extra_bytes"].as_u64().unwrap() <= most, "{rank}");
                }
            }
            let mut trainer = HostTensors::synthetic(&ranks.config, 7);
            (0..3).for_each(|_| trainer.perturb());
            ranks.assert_hold(&trainer, 3);
        }
    }
    // A GPU trainer over a socket (the path between hosts without NCCL): copied down from its
    // GPU bucket by bucket, digested there; a corrupted bucket is caught, nothing committed.
    let ranks = gpu_ranks("qwen3-moe-tiny", 2, 0, "gpu-over-tcp", ReceiverOptions::default());
    let push = |extra: &[&str]| {
        let mut push = Command::new(exe());
        push.args(["push", "--synthetic", "qwen3-moe-tiny", "--device", "cuda:0", "--transport", "tcp"]);
        push.args(["--bucket-bytes", "65536", "--json"]).args(extra);
        for e in &ranks.endpoints {
            push.args(["--to", e]);
        }
        push.output().unwrap()
    };
    let out = push(&["--steps", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{json}");
    let mut trainer = HostTensors::synthetic(&ranks.config, 7);
    (0..2).for_each(|_| trainer.perturb());
    ranks.assert_hold(&trainer, 2);
    let out = push(&["--version", "3", "--fault", "flip:1"]);
    assert!(!out.status.success());
    for (_, _, _, receiver) in &ranks.ranks {
        assert_eq!(receiver.committed(), Version(2));
    }

    // In one process, with a delta update that skips what did not change.
    let ranks = gpu_ranks("qwen3-tiny", 1, 0, "staged-inproc", ReceiverOptions::default());
    let receiver = &ranks.ranks[0].3;
    let options = SenderOptions { bucket_bytes: 8192, delta: true, ..SenderOptions::default() };
    let mut sender = receiver.connect_in_process(&ranks.config.source_manifest(), &ranks.rules, options).unwrap();
    let mut trainer = HostTensors::synthetic(&ranks.config, 5);
    assert!(sender.push(Version(1), &trainer).unwrap().verified);
    ranks.assert_hold(&trainer, 1);
    assert!(sender.writes_device_slots(), "an in-process sender copies into the device slots");
    let same = sender.push(Version(2), &trainer).unwrap();
    assert!(same.verified && same.tensors == 0 && same.skipped_tensors > 0, "{same:?}");
    trainer.perturb();
    assert!(sender.push(Version(3), &trainer).unwrap().verified);
    ranks.assert_hold(&trainer, 3);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_gpu_receiver_fed_from_host_memory_survives_faults_and_disk_updates_reach_it() {
    let options = ReceiverOptions { timeout: std::time::Duration::from_secs(2), ..ReceiverOptions::default() };
    let ranks = gpu_ranks("qwen3-tiny", 1, 0, "staged-faults", options);
    let push = |extra: &[&str]| {
        Command::new(exe())
            .args(["push", "--synthetic", "qwen3-tiny", "--to", &ranks.endpoints[0], "--bucket-bytes", "8192"])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(push(&["--version", "1"]).status.success());
    let receiver = &ranks.ranks[0].3;
    // Through the device slots (the default on one host; digested on the GPU or from host
    // memory) and through the ring.
    for path in [None, Some("--host-digests"), Some("--no-device-writes")] {
        for fault in ["flip:2", "abort:3", "hangup:1", "stall:2"] {
            let mut args = vec!["--version", "2", "--fault", fault];
            args.extend(path);
            let out = push(&args);
            assert!(!out.status.success(), "{fault} {path:?}");
            let status = receiver.status();
            assert_eq!((status.committed, status.in_flight), (Version(1), None), "{fault} {path:?}");
            assert!(!status.dirty.is_empty(), "{fault} {path:?}: what was written is dirty");
        }
    }
    let out = push(&["--version", "2", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut trainer = HostTensors::synthetic(&ranks.config, 7);
    trainer.perturb();
    ranks.assert_hold(&trainer, 2);

    // A checkpoint on disk pushed into a GPU engine: from its maps while in the page cache,
    // read from the file (O_DIRECT where the file system takes it) once evicted.
    let disk = std::env::current_dir().unwrap().join(format!("wl-gpu-{}-cold", std::process::id()));
    let _ = std::fs::remove_dir_all(&disk);
    std::fs::create_dir_all(&disk).unwrap();
    trainer.perturb();
    let (manifest, data) = trainer.clone().into_parts();
    let tensors: Vec<_> = manifest.iter().zip(data.iter().map(Vec::as_slice)).collect();
    let file = disk.join("model.safetensors");
    weightlift::write_file(&file, &tensors).unwrap();
    for (version, evict) in [("3", false), ("4", true)] {
        if evict {
            weightlift_cuda::drop_cached(&file).unwrap();
        }
        let cold = weightlift_cuda::resident_bytes(&file).unwrap() * 2 < std::fs::metadata(&file).unwrap().len();
        let out = Command::new(exe())
            .args(["push", "--model", disk.to_str().unwrap(), "--to", &ranks.endpoints[0], "--bucket-bytes", "8192"])
            .args(["--preset", "qwen3", "--version", version, "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let json: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json["device_writes"][0], true, "{json}");
        if evict && !cold {
            eprintln!("the page cache kept {} (a memory file system?): the cold read is not tested", file.display());
        }
        assert_eq!(json["reads_from_disk"][0], evict && cold, "{json}");
        assert!(json["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{json}");
        ranks.assert_hold(&trainer, version.parse().unwrap());
    }
    let _ = std::fs::remove_dir_all(&disk);

    // A checkpoint on disk into a GPU engine, through its HTTP API.
    let dir = std::env::temp_dir().join(format!("wl-gpu-{}-ckpt", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    trainer.perturb();
    let (manifest, data) = trainer.clone().into_parts();
    let tensors: Vec<_> = manifest.iter().zip(data.iter().map(Vec::as_slice)).collect();
    weightlift::write_file(&dir.join("model.safetensors"), &tensors).unwrap();
    let (_server, _endpoint, http) = serve_on_gpu("qwen3-tiny", 0, "staged-disk", true, &[]);
    let http = http.unwrap();
    let body = format!(r#"{{"version": "5", "source": {{"disk": "{}"}}}}"#, dir.display());
    let (status, body) = post(&http, "/update_weights", &body);
    assert_eq!(status, 200, "{body}");
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((report["verified"].as_bool(), report["committed"].as_u64()), (Some(true), Some(5)), "{body}");
    let (status, body) = post(&http, "/weights_checker", r#"{"action": "checksum"}"#);
    assert_eq!(status, 200, "{body}");
    let source = SourceSet::single(ranks.config.source_manifest());
    let dest = &ranks.ranks[0].1;
    let plan = plan(&source, dest, &ranks.rules, TpRank::SINGLE).unwrap();
    let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    exec::execute(&plan, &refs, &mut expected).unwrap();
    let checksums: Value = serde_json::from_str(&body).unwrap();
    for (spec, bytes) in dest.iter().zip(&expected) {
        let want = format!("{:016x}", weightlift::core::digest::digest(bytes));
        assert_eq!(checksums["checksums"][&spec.name], want, "`{}`", spec.name);
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_gpu_receiver_applies_a_checkpoint_itself_warm_cold_and_broken_off() {
    // Small buckets, so each update goes through both device slots many times; TP 2 of a MoE,
    // so pieces are sliced and stacked.
    for pin in [false, true] {
        let options = ReceiverOptions { max_bucket_bytes: 8192, pin_local_sources: pin, ..ReceiverOptions::default() };
        let ranks = gpu_ranks("qwen3-moe-tiny", 2, 0, &format!("local-{pin}"), options);
        let disk = std::env::current_dir().unwrap().join(format!("wl-gpu-{}-local-{pin}", std::process::id()));
        let _ = std::fs::remove_dir_all(&disk);
        std::fs::create_dir_all(&disk).unwrap();
        let file = disk.join("model.safetensors");
        let mut trainer = HostTensors::synthetic(&ranks.config, 7);
        for (version, evict) in [(1, false), (2, true)] {
            trainer.perturb();
            let (manifest, data) = trainer.clone().into_parts();
            let tensors: Vec<_> = manifest.iter().zip(data.iter().map(Vec::as_slice)).collect();
            weightlift::write_file(&file, &tensors).unwrap();
            if evict {
                weightlift_cuda::drop_cached(&file).unwrap();
            }
            let checkpoint = weightlift::CheckpointTensors::open(&disk).unwrap();
            for (tp, _, _, receiver) in &ranks.ranks {
                let report = receiver.apply_local(Version(version), &checkpoint, &ranks.rules).unwrap();
                assert!(report.verified && report.is_committed(), "{tp} v{version} pin {pin}: {report:?}");
                assert!(report.buckets > 4, "{tp}: {report:?}");
                // Two device slots of one bucket (rounded up to the allocation granularity) and
                // the digest batch: nothing near the model's size.
                assert!((1..=8 << 20).contains(&report.device_extra_bytes), "{tp}: {report:?}");
            }
            ranks.assert_hold(&trainer, version);
        }
        // A source that breaks while it is read: the version stays, what was written is dirty,
        // and the next update rewrites it.
        trainer.perturb();
        let short = trainer.manifest().len() - 1;
        // A quarter: less than either TP rank of two reads.
        let source = Truncated { tensors: trainer.clone(), short, divisor: 4 };
        for (tp, _, _, receiver) in &ranks.ranks {
            let report = receiver.apply_local(Version(3), &source, &ranks.rules).unwrap();
            assert!(!report.is_committed() && !report.verified, "{tp}: {report:?}");
            assert!(report.error.as_deref().unwrap().starts_with("reading the source"), "{tp}: {report:?}");
            assert_eq!(receiver.committed(), Version(2), "{tp}");
            assert!(!receiver.dirty().is_empty() && report.dirty == receiver.dirty(), "{tp}: {report:?}");
            let report = receiver.apply_local(Version(3), &trainer, &ranks.rules).unwrap();
            assert!(report.verified, "{tp}: {report:?}");
        }
        ranks.assert_hold(&trainer, 3);
        let _ = std::fs::remove_dir_all(&disk);
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn demo_runs_every_source_into_a_gpu_engine() {
    for source in ["host", "disk", "tcp", "gpu"] {
        let out = Command::new(exe())
            .args(["demo", "--synthetic", "qwen3-tiny", "--device", "cuda", "--source", source])
            .args(["--tp-size", "2", "--steps", "2", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{source}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(v["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{source}: {v}");
    }
}

/// A streaming receiver on a GPU: its engine (a thread here) takes each bucket from the ring
/// as it is handed over, slowly, and copies the tensors out; over CUDA IPC from a GPU trainer
/// in another process, from host memory over shm and tcp (staged), and from a source applied
/// locally, every version it loaded equals the trainer's, and the device memory weightlift
/// holds is the ring's (two buckets and the largest tensor above one), not the model's.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_streaming_receiver_on_a_gpu_hands_its_engine_every_tensor_over_ipc_and_staged_paths() {
    use weightlift::core::{DType, Manifest, Preset, TensorSpec};
    use weightlift::{StreamOptions, StreamPlan};
    let gpu = gpu(0);
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let specs = config.source_manifest();
    let stream = StreamOptions { depth: 2, bucket_bytes: 64 << 10, ..StreamOptions::default() };
    let plan = StreamPlan::new(&specs, stream).unwrap();
    let sizes = plan.buffer_sizes();
    let ring_specs = sizes.iter().enumerate().map(|(i, &n)| TensorSpec::new(format!("ring{i}"), DType::U8, vec![n]));
    let ring = GpuTensors::alloc(&gpu, &Manifest::new(ring_specs.collect()).unwrap()).unwrap();
    let bases = ring.ptrs();
    let options = ReceiverOptions { timeout: std::time::Duration::from_secs(10), ..ReceiverOptions::default() };
    let receiver = Receiver::streaming_on_gpu(gpu.clone(), &specs, ring, stream, options).unwrap();
    let path = socket("streaming");
    let listener = Endpoint::Unix(path.clone()).bind().unwrap();
    let serving = receiver.clone();
    std::thread::spawn(move || serving.serve(&listener));
    let to = format!("unix:{}", path.display());

    // The engine: takes `count` versions after `after`, each bucket with a pause, copying
    // every tensor out of the ring as it is handed over.
    let engine = |after: u64, count: u64| {
        let (handoff, plan, gpu) = (receiver.handoff().unwrap(), plan.clone(), gpu.clone());
        let bases = bases.clone();
        std::thread::spawn(move || {
            let mut versions = Vec::new();
            let mut after = Version(after);
            for _ in 0..count {
                let version = handoff.next_update(after, std::time::Duration::from_secs(60)).expect("an update");
                let mut loaded: Vec<Vec<u8>> = plan.plan.destinations.iter().map(|_| Vec::new()).collect();
                while let Some(k) = handoff.next_bucket(version, std::time::Duration::from_secs(60)).unwrap() {
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    for &d in &plan.layout.complete_after[k] {
                        let (buffer, offset) = plan.places()[d as usize].unwrap();
                        let mut bytes = vec![0u8; plan.plan.destinations[d as usize].byte_len() as usize];
                        gpu.download_regions(&mut [(bases[buffer] + offset, &mut bytes[..])]).unwrap();
                        loaded[d as usize] = bytes;
                    }
                }
                handoff.settled(version, std::time::Duration::from_secs(60)).unwrap();
                versions.push((version, loaded));
                after = version;
            }
            versions
        })
    };
    let check = |versions: Vec<(Version, Vec<Vec<u8>>)>, first_perturbs: usize, label: &str| {
        let mut trainer = HostTensors::synthetic(&config, 7);
        (0..first_perturbs).for_each(|_| trainer.perturb());
        for (i, (version, loaded)) in versions.iter().enumerate() {
            for (d, bytes) in loaded.iter().enumerate() {
                assert!(bytes == &trainer.data()[d], "{label} {version}: `{}` differs", specs.specs()[d].name);
            }
            if i + 1 < versions.len() {
                trainer.perturb();
            }
        }
    };
    let push = |extra: &[&str]| {
        let out = Command::new(exe())
            .args(["push", "--synthetic", "qwen3-moe-tiny", "--preset", "identity", "--to", &to, "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let ring_bytes = plan.layout.bytes();
    let model_bytes: u64 = specs.iter().map(|s| s.byte_len()).sum();
    assert!(ring_bytes * 2 < model_bytes, "the ring ({ring_bytes} B) is not the model ({model_bytes} B)");

    // CUDA IPC from a GPU trainer: versions 1..=3.
    let loading = engine(0, 3);
    let json = push(&["--device", "cuda:0", "--steps", "3"]);
    for step in json["steps"].as_array().unwrap() {
        assert_eq!(step["verified"], true, "{step}");
        for rank in step["ranks"].as_array().unwrap() {
            assert!(rank["device_extra_bytes"].as_u64().unwrap() < 16 << 20, "{rank}");
        }
    }
    check(loading.join().unwrap(), 1, "ipc");
    // Host memory, staged, over shm and tcp: versions 4..=5 and 6..=7.
    for (transport, first) in [("shm", 4u64), ("tcp", 6)] {
        let loading = engine(first - 1, 2);
        let json =
            push(&["--device", "host", "--transport", transport, "--steps", "2", "--version", &first.to_string()]);
        assert!(json["steps"].as_array().unwrap().iter().all(|s| s["verified"] == true), "{transport}: {json}");
        check(loading.join().unwrap(), 1, transport);
    }
    // A source applied locally (a checkpoint in memory, say).
    let loading = engine(7, 1);
    let trainer = {
        let mut t = HostTensors::synthetic(&config, 7);
        t.perturb();
        t
    };
    let rules = Preset::Identity.rules(PresetOptions::default()).unwrap();
    assert!(receiver.apply_local(Version(8), &trainer, &rules).unwrap().is_committed());
    check(loading.join().unwrap(), 1, "local");
    // A corrupted bucket over tcp, and over IPC a sender's digest that differs from what the
    // receiver read (its digests come in parts: bucket 5's is not in the first), fail the
    // update in the engine.
    for (transport, bucket) in [("tcp", "flip:2"), ("cuda-ipc", "flip:5")] {
        let loading = engine(8, 1);
        let device = if transport == "tcp" { "host" } else { "cuda:0" };
        let out = Command::new(exe())
            .args(["push", "--synthetic", "qwen3-moe-tiny", "--preset", "identity", "--to", &to])
            .args(["--transport", transport, "--device", device, "--version", "9", "--fault", bucket])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{transport}");
        assert!(loading.join().is_err(), "{transport}: the engine's loop fails (its next bucket is an error)");
        assert_eq!(receiver.committed(), Version(8), "{transport}");
    }
}

/// A sharded trainer's ranks, each a process holding FSDP shards of the model (on the GPU over
/// CUDA IPC; in host memory over shm, through device slots, and over tcp, staged), update GPU
/// receivers at TP 1 and 2: every version lands bit for bit (over CUDA IPC each rank's memory
/// mapped once); a rank whose share differs from what the receivers got fails the version on
/// every receiver, naming the rank.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_sharded_trainers_ranks_update_gpu_receivers_over_cuda_ipc_and_staged_paths() {
    let cases = [
        ("qwen3-moe-tiny", 4u32, 1, "cuda-ipc"),
        ("qwen3-tiny", 3, 2, "cuda-ipc"),
        ("qwen3-moe-tiny", 3, 2, "shm"),
        ("qwen3-tiny", 2, 1, "tcp"),
    ];
    for (model, world, tp_size, transport) in cases {
        let label = format!("{model} {world} ranks TP {tp_size} {transport}");
        let options = ReceiverOptions { timeout: std::time::Duration::from_secs(20), ..ReceiverOptions::default() };
        let ranks = gpu_ranks(model, tp_size, 0, &format!("sharded-{model}-{transport}"), options);
        let device = if transport == "cuda-ipc" { "cuda:0" } else { "host" };
        let push = |rank: u32, version: &str, steps: &str, fault: Option<&str>| {
            let (rank, world) = (rank.to_string(), world.to_string());
            let mut cmd = Command::new(exe());
            cmd.args(["push", "--synthetic", model, "--device", device, "--transport", transport, "--json"]);
            cmd.args(["--rank", &rank, "--world", &world, "--version", version, "--steps", steps]);
            cmd.args(["--bucket-bytes", "65536"]);
            for e in &ranks.endpoints {
                cmd.args(["--to", e]);
            }
            if let Some(fault) = fault {
                cmd.args(["--fault", fault]);
            }
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
        };
        let children: Vec<Child> = (0..world).map(|r| push(r, "1", "3", None)).collect();
        for (r, child) in children.into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{label} rank {r}: {}", String::from_utf8_lossy(&out.stderr));
            let json: Value = serde_json::from_slice(&out.stdout).unwrap();
            let steps = json["steps"].as_array().unwrap();
            assert_eq!(steps.len(), 3, "{label} rank {r}");
            for (k, step) in steps.iter().enumerate() {
                assert_eq!(step["verified"], true, "{label} rank {r} step {k}: {step}");
                for receiver in step["ranks"].as_array().unwrap() {
                    if k > 0 && transport == "cuda-ipc" {
                        assert_eq!(receiver["ipc_opens"].as_u64().unwrap(), 0, "{label} rank {r} step {k}");
                    }
                }
            }
        }
        let mut trainer = HostTensors::synthetic(&ranks.config, 7);
        (0..3).for_each(|_| trainer.perturb());
        ranks.assert_hold(&trainer, 3);
        // Rank 1's share differs from what the receivers got: version 4 fails on every
        // receiver, naming it, and they stay on version 3.
        let children: Vec<Child> = (0..world).map(|r| push(r, "4", "1", (r == 1).then_some("flip:0"))).collect();
        let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
        assert!(outs.iter().all(|o| !o.status.success()), "{label}: version 4 committed somewhere");
        let said = String::from_utf8_lossy(&outs[0].stderr).to_string() + &String::from_utf8_lossy(&outs[0].stdout);
        assert!(said.contains("trainer rank 1"), "{label}: {said}");
        for (tp, _, _, receiver) in &ranks.ranks {
            assert_eq!(receiver.committed(), Version(3), "{label} {tp}");
            assert!(!receiver.dirty().is_empty(), "{label} {tp}: the failed version left nothing dirty");
        }
    }
}
