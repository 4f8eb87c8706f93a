//! Updates between a sender and a receiver on loopback (receiver on a thread of this process),
//! with the receiver's bytes compared against the reference executor.

use std::time::Duration;

use weightlift::core::{Manifest, TpRank, Version};
use weightlift::{Fault, HostTensors, ReceiverOptions, Sender, SenderOptions, TransportKind};

mod common;
use common::{assert_bit_exact, setup, Setup, Truncated};

fn sender(s: &Setup, transport: TransportKind, fault: Option<Fault>) -> Sender {
    let options = SenderOptions { transport, bucket_bytes: 4096, fault, ..SenderOptions::default() };
    Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, options).unwrap()
}

#[test]
fn three_updates_over_each_transport_arrive_bit_exact() {
    for (model, tp_size) in [("qwen3-tiny", 1), ("qwen3-moe-tiny", 2)] {
        for transport in [TransportKind::Shm, TransportKind::Tcp] {
            for rank in 0..tp_size {
                let label = format!("three-{model}-{transport}-{rank}");
                let mut s = setup(model, TpRank::new(rank, tp_size).unwrap(), &label, ReceiverOptions::default());
                let mut tx = sender(&s, transport, None);
                for v in 1..=3 {
                    s.trainer.perturb();
                    let report = tx.push(Version(v), &s.trainer).unwrap();
                    assert!(report.verified, "{label} v{v}: {report:?}");
                    assert_eq!(report.committed, Version(v));
                    assert!(report.buckets > 1, "small buckets make several");
                    assert_bit_exact(&s, &tx);
                }
                assert_eq!(s.receiver.committed(), Version(3));
            }
        }
    }
}

#[test]
fn version_order_is_enforced() {
    let mut s = setup("llama-tiny", TpRank::SINGLE, "order", ReceiverOptions::default());
    let mut tx = sender(&s, TransportKind::Shm, None);
    s.trainer.perturb();
    assert!(tx.push(Version(5), &s.trainer).unwrap().verified);
    for stale in [4, 5] {
        let err = tx.push(Version(stale), &s.trainer).unwrap_err().to_string();
        assert!(err.contains(&format!("refused version {stale}")), "{err}");
    }
    assert_eq!(s.receiver.committed(), Version(5));
    assert!(tx.push(Version(6), &s.trainer).unwrap().verified);
}

#[test]
fn a_flipped_byte_fails_verification_then_a_retry_succeeds() {
    let mut s = setup("qwen3-tiny", TpRank::SINGLE, "flip", ReceiverOptions::default());
    s.trainer.perturb();
    assert!(sender(&s, TransportKind::Shm, None).push(Version(1), &s.trainer).unwrap().verified);
    s.trainer.perturb();
    let report = sender(&s, TransportKind::Shm, Some(Fault::FlipByteInBucket(2))).push(Version(2), &s.trainer).unwrap();
    assert!(!report.verified);
    assert_eq!(report.committed, Version(1));
    assert_eq!(report.mismatched.len(), 1, "{report:?}");
    assert!(report.error.as_deref().unwrap().contains(&report.mismatched[0]));
    assert!(report.dirty.contains(&report.mismatched[0]));
    assert_eq!(s.receiver.committed(), Version(1));
    assert!(!s.receiver.dirty().is_empty());

    let mut tx = sender(&s, TransportKind::Tcp, None);
    let report = tx.push(Version(2), &s.trainer).unwrap();
    assert!(report.verified, "{report:?}");
    assert!(s.receiver.dirty().is_empty());
    assert_bit_exact(&s, &tx);
}

#[test]
fn a_sender_that_hangs_up_mid_update_leaves_the_receiver_dirty_on_its_version() {
    let mut s = setup("qwen3-moe-tiny", TpRank::SINGLE, "hangup", ReceiverOptions::default());
    s.trainer.perturb();
    assert!(sender(&s, TransportKind::Tcp, None).push(Version(1), &s.trainer).unwrap().verified);
    s.trainer.perturb();
    let err = sender(&s, TransportKind::Tcp, Some(Fault::HangUpAfterBuckets(3))).push(Version(2), &s.trainer);
    assert!(err.is_err());
    // The receiver notices at once (EOF), not after its timeout; it marks the tensors dirty,
    // then records its report: wait for both.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let settled =
        |s: &Setup| !s.receiver.dirty().is_empty() && s.receiver.last_report().is_some_and(|r| r.version == Version(2));
    while !settled(&s) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.receiver.committed(), Version(1));
    let report = s.receiver.last_report().unwrap();
    assert!(!report.verified && report.error.as_deref().unwrap().contains("bucket 3"), "{report:?}");
    assert!(!s.receiver.dirty().is_empty());

    let mut tx = sender(&s, TransportKind::Shm, None);
    assert!(tx.push(Version(2), &s.trainer).unwrap().verified);
    assert!(s.receiver.dirty().is_empty());
    assert_bit_exact(&s, &tx);
}

#[test]
fn delta_mode_skips_unchanged_tensors_and_reports_the_saving() {
    let mut s = setup("qwen3-tiny", TpRank::SINGLE, "delta", ReceiverOptions::default());
    let options = SenderOptions { delta: true, bucket_bytes: 4096, ..SenderOptions::default() };
    let mut tx = Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, options).unwrap();
    s.trainer.perturb();
    let first = tx.push(Version(1), &s.trainer).unwrap();
    assert!(first.verified && first.skipped_tensors == 0 && first.bytes_saved == 0);
    // Nothing changed: everything is skipped.
    let second = tx.push(Version(2), &s.trainer).unwrap();
    assert!(second.verified, "{second:?}");
    assert_eq!(second.skipped_tensors, tx.plan().destinations.len());
    assert_eq!(second.bytes, 0);
    assert_eq!(second.bytes_saved, tx.plan().summary().destination_bytes);
    assert_eq!(s.receiver.committed(), Version(2));
    s.trainer.perturb();
    let third = tx.push(Version(3), &s.trainer).unwrap();
    assert!(third.verified && third.skipped_tensors == 0);
    assert_bit_exact(&s, &tx);
}

#[test]
fn a_sender_whose_manifest_does_not_fit_is_rejected_by_name() {
    let s = setup("qwen3-tiny", TpRank::SINGLE, "reject", ReceiverOptions::default());
    let mut specs = s.trainer.manifest().specs().to_vec();
    specs[3].dtype = weightlift::core::DType::I64;
    specs.push(weightlift::core::TensorSpec::new("model.extra.weight", weightlift::core::DType::BF16, vec![2]));
    let bad = Manifest::new(specs).unwrap();
    let err = Sender::connect(&s.endpoint, &bad, &s.rules, SenderOptions::default()).err().unwrap().to_string();
    assert!(err.contains("rejected") && err.contains("`model.extra.weight`") && err.contains("I64"), "{err}");
    assert_eq!(s.receiver.committed(), Version(0));
}

#[test]
fn in_process_updates_arrive_bit_exact_and_remote_senders_cannot_ask_for_them() {
    let mut s = setup("qwen3-moe-tiny", TpRank::new(1, 2).unwrap(), "inproc", ReceiverOptions::default());
    let options = SenderOptions { bucket_bytes: 4096, threads: 3, ..SenderOptions::default() };
    let mut tx = s.receiver.connect_in_process(s.trainer.manifest(), &s.rules, options).unwrap();
    for v in 1..=3 {
        s.trainer.perturb();
        let report = tx.push(Version(v), &s.trainer).unwrap();
        assert!(report.verified && report.buckets > 1, "{report:?}");
        assert_bit_exact(&s, &tx);
    }
    let remote = SenderOptions { transport: TransportKind::InProcess, ..SenderOptions::default() };
    let err = Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, remote).err().unwrap().to_string();
    assert!(err.contains("connect_in_process"), "{err}");
}

#[test]
fn a_closed_write_gate_refuses_updates_and_tensors_the_receiver_lost_are_sent_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let mut s = setup("qwen3-tiny", TpRank::SINGLE, "gate", ReceiverOptions::default());
    let options = SenderOptions { delta: true, bucket_bytes: 4096, ..SenderOptions::default() };
    let mut tx = Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, options).unwrap();
    s.trainer.perturb();
    assert!(tx.push(Version(1), &s.trainer).unwrap().verified);
    let count = tx.plan().destinations.len();

    // The engine's memory is released: nothing may touch the tensors.
    let open = Arc::new(AtomicBool::new(false));
    let gate = open.clone();
    s.receiver.set_write_gate(Arc::new(move || {
        if gate.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the weights' memory is released".into())
        }
    }));
    let err = tx.push(Version(2), &s.trainer).unwrap_err().to_string();
    assert!(err.contains("released"), "{err}");
    assert_eq!(s.receiver.committed(), Version(1));
    assert!(s.receiver.current_digests().unwrap_err().to_string().contains("released"));
    assert!(s.receiver.poison(0).is_err());
    open.store(true, Ordering::SeqCst);

    // Two tensors came back without their bytes: a delta sender must send them though the
    // trainer did not change them (it skips the rest).
    let lost: Vec<String> = tx.plan().destinations[..2].iter().map(|d| d.name.clone()).collect();
    s.receiver.forget(&lost);
    assert_eq!(s.receiver.dirty(), lost);
    let report = tx.push(Version(2), &s.trainer).unwrap();
    assert!(report.verified, "{report:?}");
    assert_eq!((report.tensors, report.skipped_tensors), (2, count - 2));
    assert!(s.receiver.dirty().is_empty());

    // A checker's reset overwrites everything: the next update rewrites everything.
    s.receiver.poison(0xAB).unwrap();
    let report = tx.push(Version(3), &s.trainer).unwrap();
    assert!(report.verified && report.skipped_tensors == 0, "{report:?}");
    assert_bit_exact(&s, &tx);
}

#[test]
fn pushes_of_other_tensors_than_announced_are_refused_by_name_and_change_nothing() {
    let mut s = setup("qwen3-tiny", TpRank::SINGLE, "wrong-tensors", ReceiverOptions::default());
    let mut tx = sender(&s, TransportKind::Shm, None);
    let specs = s.trainer.manifest().specs().to_vec();
    let first = specs[0].name.clone();
    let mut renamed = specs.clone();
    renamed[0].name.push_str("_x");
    let mut reshaped = specs.clone();
    reshaped[0].shape.reverse();
    reshaped[0].shape.push(1);
    let mut reordered = specs.clone();
    reordered.swap(0, specs.len() - 1);
    let cases = [
        (renamed, format!("`{first}` is missing")),
        (reshaped, format!("`{first}` is")),
        (reordered, "same tensors in a different order".to_string()),
        (specs[1..].to_vec(), format!("`{first}` is missing")),
    ];
    for (specs, expected) in cases {
        let wrong = HostTensors::filled(Manifest::new(specs).unwrap(), 3);
        let err = tx.push(Version(1), &wrong).unwrap_err().to_string();
        assert!(err.contains(&expected), "{err}");
        assert_eq!(s.receiver.committed(), Version(0));
    }
    s.trainer.perturb();
    let report = tx.push(Version(1), &s.trainer).unwrap();
    assert!(report.verified, "{report:?}");
    assert_bit_exact(&s, &tx);
}

#[test]
fn a_receiver_in_host_memory_refuses_cuda_ipc_and_nccl_by_name() {
    let s = setup("qwen3-tiny", TpRank::SINGLE, "no-ipc", ReceiverOptions::default());
    for (transport, name) in [(TransportKind::CudaIpc, "cuda-ipc"), (TransportKind::Nccl, "nccl")] {
        let options = SenderOptions { transport, ..SenderOptions::default() };
        let err = Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, options).err().expect("refused");
        let err = err.to_string();
        assert!(err.contains("in host memory") && err.contains(name), "{err}");
    }
    assert_eq!(s.receiver.committed(), Version(0));
}

fn host_bytes(receiver: &weightlift::Receiver) -> Vec<Vec<u8>> {
    receiver.with_host_tensors(|t| (0..t.manifest().len()).map(|i| t.bytes(i).to_vec()).collect()).unwrap()
}

#[test]
fn a_local_update_commits_bit_exact_like_one_from_a_sender() {
    let mut local = setup("qwen3-moe-tiny", TpRank::new(1, 2).unwrap(), "local", ReceiverOptions::default());
    let mut pushed = setup("qwen3-moe-tiny", TpRank::new(1, 2).unwrap(), "local-ref", ReceiverOptions::default());
    let observed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = observed.clone();
    local.receiver.observe(std::sync::Arc::new(move |r| seen.lock().unwrap().push(r.version)));
    let mut tx =
        pushed.receiver.connect_in_process(pushed.trainer.manifest(), &pushed.rules, SenderOptions::default()).unwrap();
    for v in 1..=2 {
        local.trainer.perturb();
        pushed.trainer.perturb();
        let report = local.receiver.apply_local(Version(v), &local.trainer, &local.rules).unwrap();
        assert!(report.verified && report.is_committed(), "{report:?}");
        assert_eq!((report.committed, local.receiver.committed()), (Version(v), Version(v)));
        assert!(tx.push(Version(v), &pushed.trainer).unwrap().verified);
        assert!(host_bytes(&local.receiver) == host_bytes(&pushed.receiver), "v{v}: the tensors differ");
        assert_eq!(local.receiver.current_digests().unwrap(), pushed.receiver.current_digests().unwrap());
        assert_eq!(local.receiver.last_report().unwrap().version, Version(v));
    }
    assert_eq!(*observed.lock().unwrap(), vec![Version(1), Version(2)]);
    // Stale versions are refused before anything is written.
    let err = local.receiver.apply_local(Version(2), &local.trainer, &local.rules).unwrap_err();
    assert!(matches!(err, weightlift::LocalError::Version(_)), "{err}");
    assert!(local.receiver.dirty().is_empty());
}

#[test]
fn a_local_update_that_breaks_off_leaves_the_version_where_it_was_dirty() {
    // Small buckets: the short tensor, the last, is packed after others were written.
    let options = ReceiverOptions { max_bucket_bytes: 4096, ..ReceiverOptions::default() };
    let mut s = setup("qwen3-moe-tiny", TpRank::new(1, 2).unwrap(), "local-fail", options);
    s.trainer.perturb();
    assert!(s.receiver.apply_local(Version(1), &s.trainer, &s.rules).unwrap().verified);
    s.trainer.perturb();
    let short = s.trainer.manifest().len() - 1;
    let source = Truncated { tensors: s.trainer.clone(), short, divisor: 2 };
    let report = s.receiver.apply_local(Version(2), &source, &s.rules).unwrap();
    assert!(!report.is_committed() && !report.verified, "{report:?}");
    assert!(report.error.as_deref().unwrap().starts_with("reading the source"), "{report:?}");
    assert_eq!((report.committed, s.receiver.committed()), (Version(1), Version(1)));
    assert!(!report.dirty.is_empty() && report.dirty == s.receiver.dirty(), "{report:?}");
    assert_eq!(s.receiver.status().in_flight, None);
    assert_eq!(s.receiver.last_report().unwrap().version, Version(2));
    // The next update rewrites what is dirty.
    let report = s.receiver.apply_local(Version(2), &s.trainer, &s.rules).unwrap();
    assert!(report.verified, "{report:?}");
    assert!(s.receiver.dirty().is_empty());
}

#[test]
fn a_receiver_that_cannot_plan_a_sender_says_every_problem_typed() {
    let s = setup("qwen3-tiny", TpRank::SINGLE, "unplannable", ReceiverOptions::default());
    // One tensor no rule maps, and one the engine needs left out.
    let mut specs: Vec<_> = s.trainer.manifest().specs().to_vec();
    let dropped = specs.iter().position(|t| t.name.contains("mlp.up_proj")).unwrap();
    let missing = specs.remove(dropped).name;
    specs.push(weightlift::core::TensorSpec::new("model.layers.0.mlp.mystery.weight", specs[0].dtype, [3]));
    let manifest = Manifest::new(specs).unwrap();
    let Err(err) = Sender::connect(&s.endpoint, &manifest, &s.rules, SenderOptions::default()) else {
        panic!("a receiver that cannot plan the sender accepted it")
    };
    let weightlift::SendError::Unplannable { reason, problems } = &err else { panic!("{err}") };
    assert!(reason.contains("mystery") && reason.contains(&missing), "{reason}");
    let unmapped = problems.iter().find(|p| p.kind == "unmapped").expect("the unmapped tensor");
    assert_eq!(unmapped.tensors, ["model.layers.0.mlp.mystery.weight"]);
    let lacking = problems.iter().find(|p| p.kind == "missing_source").expect("the missing tensor");
    assert!(lacking.tensors.contains(&missing), "{lacking:?}");
    assert!(problems.iter().all(|p| reason.contains(&p.message)), "{problems:?}");
    assert_eq!(s.receiver.committed(), Version(0));
}
