//! Updates of FP8 engines (e4m3 weights with scales beside them) from bf16 trainers, in host
//! memory: over shm and tcp, in process and from a local source. The receiver's bytes are
//! compared with a reference that quantizes each whole bf16 tensor (as the torch reference
//! does), not with the plan's own executor.

use weightlift::core::quant::{quantize, Quant, QuantPlan};
use weightlift::core::{
    destination_manifest, exec, plan, synthetic, Manifest, Plan, PresetOptions, RuleSet, SourceSet, TpRank, Version,
};
use weightlift::{
    Endpoint, Fault, HostTensors, Receiver, ReceiverOptions, Sender, SenderOptions, Shard, Trainer, TransportKind,
};

mod common;
use common::socket_path;

struct Fp8 {
    rules: RuleSet,
    receiver: Receiver,
    endpoint: Endpoint,
    trainer: HostTensors,
    /// The bf16 engine's plan (what the reference quantizes) and the FP8 engine's.
    bf16: Plan,
    fp8: Plan,
}

/// `model`'s FP8 engine at `tp` in host memory, its weights in `quant`, zero-filled, serving on
/// a Unix socket named after `label`.
fn fp8_setup(model: &str, tp: TpRank, quant: Quant, label: &str) -> Fp8 {
    let config = synthetic(model).unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let source = SourceSet::single(config.source_manifest());
    let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
    let bf16 = plan(&source, &dest, &rules, tp).unwrap();
    let engine: Manifest = QuantPlan::new(&bf16, quant).unwrap().engine_manifest(&bf16);
    let fp8 = plan(&source, &engine, &rules, tp).unwrap();
    assert!(!fp8.scaled.is_empty());
    // Three threads (not the default of one here): blocks are quantized on several at once.
    let options = ReceiverOptions { tp, threads: 3, ..ReceiverOptions::default() };
    let receiver = Receiver::new(HostTensors::filled(engine, 0), options);
    let listener = Endpoint::Unix(socket_path(label)).bind().unwrap();
    let endpoint = listener.endpoint().unwrap();
    let serving = receiver.clone();
    std::thread::spawn(move || serving.serve(&listener));
    Fp8 { rules, receiver, endpoint, trainer: HostTensors::synthetic(&config, 11), bf16, fp8 }
}

/// What the FP8 engine should hold for the trainer's tensors: the bf16 engine's tensors, each
/// quantized weight quantized whole, its scales beside it.
fn reference(s: &Fp8) -> Vec<Vec<u8>> {
    let (_, data) = s.trainer.clone().into_parts();
    let sources: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut wide: Vec<Vec<u8>> = s.bf16.destinations.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
    exec::execute(&s.bf16, &sources, &mut wide).unwrap();
    let position = |name: &str| s.bf16.destinations.iter().position(|d| d.name == name);
    let mut out: Vec<Vec<u8>> = s.fp8.destinations.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
    for (d, spec) in s.fp8.destinations.iter().enumerate() {
        if let (Some(b), None) = (position(&spec.name), s.fp8.scaled_of(d as u32)) {
            out[d] = wide[b].clone();
        }
    }
    for q in &s.fp8.scaled {
        let w = &s.fp8.destinations[q.weight as usize];
        let bf16 = &wide[position(&w.name).unwrap()];
        // bf16 is the top half of an f32.
        let x: Vec<f32> =
            bf16.chunks(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect();
        let mut scales = vec![0f32; s.fp8.destinations[q.scale as usize].numel() as usize];
        quantize(&x, &w.shape, q.block, &mut out[q.weight as usize], &mut scales);
        out[q.scale as usize] = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
    }
    out
}

/// The first tensor the receiver holds other than the reference.
fn first_difference(s: &Fp8) -> Option<String> {
    let want = reference(s);
    s.receiver
        .with_host_tensors(|t| (0..want.len()).find(|&d| t.bytes(d) != want[d].as_slice()))
        .unwrap()
        .map(|d| s.fp8.destinations[d].name.clone())
}

fn sender(s: &Fp8, transport: TransportKind, fault: Option<Fault>, delta: bool) -> Sender {
    let options = SenderOptions { transport, bucket_bytes: 4096, fault, delta, ..SenderOptions::default() };
    Sender::connect(&s.endpoint, s.trainer.manifest(), &s.rules, options).unwrap()
}

/// Three versions over shm and tcp, at TP 1 and 2, dense and MoE, block and channel scales:
/// each verified (the sender digests the quantized bytes it expects) and bit-exact with the
/// whole-tensor quantization.
#[test]
fn fp8_engines_take_bf16_updates_over_each_transport_bit_exact() {
    for (model, tp_size, quant) in [
        ("qwen3-tiny", 1, Quant::Block { rows: 16, cols: 16 }),
        ("qwen3-moe-tiny", 2, Quant::Block { rows: 16, cols: 16 }),
        ("qwen3-moe-tiny", 2, Quant::Channel),
    ] {
        for transport in [TransportKind::Shm, TransportKind::Tcp] {
            let tp = TpRank::new(tp_size - 1, tp_size).unwrap();
            let label = format!("fp8-{model}-{transport}-{quant}").replace(':', "");
            let mut s = fp8_setup(model, tp, quant, &label);
            let mut tx = sender(&s, transport, None, false);
            assert_eq!(tx.plan().scaled, s.fp8.scaled, "both sides plan the same scales");
            for v in 1..=3 {
                s.trainer.perturb();
                let report = tx.push(Version(v), &s.trainer).unwrap();
                assert!(report.verified && report.is_committed(), "{label} v{v}: {report:?}");
                assert!(report.buckets > 1, "small buckets make several");
                assert_eq!(first_difference(&s), None, "{label} v{v}");
            }
        }
    }
}

/// A byte flipped on the way fails the update naming the tensor it landed in, dirty with its
/// scales; the retry verifies.
#[test]
fn a_flipped_byte_in_a_quantized_block_is_named_and_the_retry_verifies() {
    let mut s = fp8_setup("qwen3-tiny", TpRank::SINGLE, Quant::Block { rows: 16, cols: 16 }, "fp8-flip");
    s.trainer.perturb();
    assert!(sender(&s, TransportKind::Shm, None, false).push(Version(1), &s.trainer).unwrap().verified);
    s.trainer.perturb();
    // Every bucket of this plan holds quantized blocks (the 4 KiB buckets of a bf16 weight).
    let mut flipped = sender(&s, TransportKind::Shm, Some(Fault::FlipByteInBucket(3)), false);
    let report = flipped.push(Version(2), &s.trainer).unwrap();
    assert!(!report.verified, "{report:?}");
    assert_eq!(s.receiver.committed(), Version(1));
    assert!(!report.mismatched.is_empty(), "{report:?}");
    assert!(report.error.as_deref().unwrap().contains(&report.mismatched[0]));
    for name in &report.mismatched {
        let d = s.fp8.destinations.iter().position(|t| &t.name == name).unwrap() as u32;
        let weight = s.fp8.scaled.iter().find(|q| q.weight == d || q.scale == d);
        if let Some(q) = weight {
            let scale = &s.fp8.destinations[q.scale as usize].name;
            assert!(report.dirty.contains(scale), "`{scale}` is dirty with its weight: {report:?}");
        }
    }
    let report = sender(&s, TransportKind::Tcp, None, false).push(Version(2), &s.trainer).unwrap();
    assert!(report.verified, "{report:?}");
    assert!(s.receiver.dirty().is_empty());
    assert_eq!(first_difference(&s), None);
}

/// A delta update of unchanged tensors skips each weight with its scales, and still verifies.
#[test]
fn delta_updates_skip_a_weight_with_its_scales() {
    let mut s = fp8_setup("qwen3-moe-tiny", TpRank::SINGLE, Quant::Block { rows: 16, cols: 16 }, "fp8-delta");
    let mut tx = sender(&s, TransportKind::Shm, None, true);
    s.trainer.perturb();
    assert!(tx.push(Version(1), &s.trainer).unwrap().verified);
    let report = tx.push(Version(2), &s.trainer).unwrap();
    assert!(report.verified && report.is_committed(), "{report:?}");
    assert!(report.skipped_tensors > 0, "nothing changed: {report:?}");
    assert_eq!(first_difference(&s), None);
}

/// The same update applied from a local source (a checkpoint read in the receiver's process)
/// and pushed in process: both verified, both the reference's bytes.
#[test]
fn local_and_in_process_updates_of_an_fp8_engine_agree_with_the_reference() {
    let quant = Quant::Block { rows: 16, cols: 16 };
    let tp = TpRank::new(1, 2).unwrap();
    let mut local = fp8_setup("qwen3-moe-tiny", tp, quant, "fp8-local");
    let mut pushed = fp8_setup("qwen3-moe-tiny", tp, quant, "fp8-in-process");
    let mut tx =
        pushed.receiver.connect_in_process(pushed.trainer.manifest(), &pushed.rules, SenderOptions::default()).unwrap();
    for v in 1..=2 {
        local.trainer.perturb();
        pushed.trainer.perturb();
        let report = local.receiver.apply_local(Version(v), &local.trainer, &local.rules).unwrap();
        assert!(report.verified && report.is_committed(), "{report:?}");
        assert_eq!(first_difference(&local), None, "local v{v}");
        assert!(tx.push(Version(v), &pushed.trainer).unwrap().verified);
        assert_eq!(first_difference(&pushed), None, "in process v{v}");
    }
}

/// A sharded trainer's ranks do not quantize their shares yet: each is refused naming the
/// weight, and the engine stays where it was.
#[test]
fn a_sharded_trainer_is_refused_by_name_and_changes_nothing() {
    let s = fp8_setup("qwen3-tiny", TpRank::SINGLE, Quant::Block { rows: 16, cols: 16 }, "fp8-sharded");
    let endpoints = vec![s.endpoint.clone()];
    let errors: Vec<String> = std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                let (endpoints, s) = (&endpoints, &s);
                scope.spawn(move || {
                    let (mine, placements) = s.trainer.fsdp_shard(rank, 2);
                    let shard = Shard { rank, world: 2, placements };
                    let options =
                        SenderOptions { timeout: std::time::Duration::from_secs(5), ..SenderOptions::default() };
                    match Trainer::connect_shard(endpoints, mine.manifest(), &s.rules, &options, &shard) {
                        Ok(_) => String::new(),
                        Err(e) => e.to_string(),
                    }
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for e in &errors {
        assert!(
            e.contains("`model.layers.0.self_attn.qkv_proj.weight` is FP8") && e.contains("sharded trainer"),
            "{errors:?}"
        );
    }
    assert_eq!(s.receiver.committed(), Version(0));
    assert!(s.receiver.dirty().is_empty());
}
