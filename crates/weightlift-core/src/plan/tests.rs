use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;
use crate::bucket::buckets;
use crate::exec;
use crate::layout::Split;
use crate::models::{synthetic, ModelConfig};
use crate::presets::{Preset, PresetOptions};

/// The preset's rules as a config gives them: head dim and head counts known.
fn rules_for(config: &ModelConfig, expert_parallel: bool) -> RuleSet {
    let options = PresetOptions { head_dim: Some(config.head_dim), expert_parallel };
    config.preset.rules_with_heads(options, Some(config.head_counts())).unwrap()
}

fn spec(name: &str, dtype: DType, shape: &[u64]) -> TensorSpec {
    TensorSpec::new(name, dtype, shape.to_vec())
}

fn manifest(specs: Vec<TensorSpec>) -> Manifest {
    Manifest::new(specs).unwrap()
}

/// Deterministic, position-dependent bytes for source tensor `t`.
fn fill_bytes(t: usize, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(t as u64 * 40_503) >> 7) as u8).collect()
}

fn source_bytes(plan: &Plan) -> Vec<Vec<u8>> {
    plan.sources.iter().enumerate().map(|(i, p)| fill_bytes(i, p.spec.byte_len())).collect()
}

/// Runs the plan bucket by bucket through pack and unpack, as a transport would.
fn run_through_buckets(plan: &Plan, sources: &[Vec<u8>], bucket_bytes: u64) -> Vec<Vec<u8>> {
    let mut dst: Vec<Vec<u8>> = plan.destinations.iter().map(|d| vec![0xAB; d.byte_len() as usize]).collect();
    for bucket in buckets(plan, bucket_bytes).unwrap() {
        assert!(bucket.bytes <= bucket_bytes);
        let mut payload = vec![0u8; bucket.bytes as usize];
        for e in &bucket.entries {
            let range = e.payload_offset as usize..(e.payload_offset + plan.op_bytes(&e.op)) as usize;
            exec::pack(plan, &e.op, &sources[e.op.src as usize], &mut payload[range]).unwrap();
        }
        for e in &bucket.entries {
            let range = e.payload_offset as usize..(e.payload_offset + plan.op_bytes(&e.op)) as usize;
            exec::unpack(plan, &e.op, &payload[range], &mut dst[e.op.dst as usize]).unwrap();
        }
    }
    dst
}

fn run_direct(plan: &Plan, sources: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut dst: Vec<Vec<u8>> = plan.destinations.iter().map(|d| vec![0xCD; d.byte_len() as usize]).collect();
    let refs: Vec<&[u8]> = sources.iter().map(Vec::as_slice).collect();
    exec::execute(plan, &refs, &mut dst).unwrap();
    dst
}

fn dest_bytes<'a>(plan: &Plan, dst: &'a [Vec<u8>], name: &str) -> &'a [u8] {
    &dst[plan.destinations.iter().position(|d| d.name == name).unwrap()]
}

/// Plans every rank of a synthetic model against the manifest it should hold.
fn plan_all(config: &ModelConfig, tp_size: u32, expert_parallel: bool) -> Vec<Plan> {
    let source = SourceSet::single(config.source_manifest());
    let rules = rules_for(config, expert_parallel);
    TpRank::all(tp_size)
        .map(|tp| {
            let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
            plan(&source, &dest, &rules, tp).unwrap()
        })
        .collect()
}

/// Rows `rows` (dim 0) of a row-major tensor with `row_bytes` bytes per row.
fn rows(bytes: &[u8], row_bytes: u64, rows: std::ops::Range<u64>) -> Vec<u8> {
    bytes[(rows.start * row_bytes) as usize..(rows.end * row_bytes) as usize].to_vec()
}

#[test]
fn qkv_is_fused_per_rank_as_q_then_k_then_v_slices() {
    // 4 query heads, 2 KV heads, head dim 2, hidden 3: q [8, 3], k and v [4, 3] in f32.
    let (h, hd) = (3u64, 2u64);
    let src = manifest(vec![
        spec("l.q", DType::F32, &[8, h]),
        spec("l.k", DType::F32, &[4, h]),
        spec("l.v", DType::F32, &[4, h]),
    ]);
    let rules = RuleSet::new(vec![Rule::fuse(
        "l.qkv",
        0,
        &[("l.q", Split::heads(hd)), ("l.k", Split::kv_heads(hd)), ("l.v", Split::kv_heads(hd))],
    )
    .unwrap()])
    .unwrap();
    let source = SourceSet::single(src);
    let row = h * 4;
    for (size, want_q, want_kv) in [(2u32, [0..4, 4..8], [0..2, 2..4]), (4, [0..2, 2..4], [0..2, 0..2])] {
        for tp in TpRank::all(size) {
            let dest = manifest(vec![spec("l.qkv", DType::F32, &[if size == 2 { 8 } else { 6 }, h])]);
            let plan = plan(&source, &dest, &rules, tp).unwrap();
            let sources = source_bytes(&plan);
            let out = run_direct(&plan, &sources);
            // Which half (TP 2) or quarter (TP 4) of the heads this rank holds.
            let r = tp.rank as usize;
            let (q_rows, kv_rows) = if size == 2 {
                (want_q[r].clone(), want_kv[r].clone())
            } else {
                // TP 4: one q head each; 2 KV heads replicated over pairs of ranks.
                let q = (r as u64 * 2)..(r as u64 * 2 + 2);
                let kv = if r < 2 { want_kv[0].clone() } else { 2..4 };
                (q, kv)
            };
            let mut expected = rows(&sources[0], row, q_rows);
            expected.extend(rows(&sources[1], row, kv_rows.clone()));
            expected.extend(rows(&sources[2], row, kv_rows));
            assert_eq!(out[0], expected, "tp {tp}");
            assert_eq!(plan.summary().strided_ops, 0, "column slices are contiguous");
        }
    }
}

#[test]
fn row_parallel_slices_are_strided_columns() {
    let src = manifest(vec![spec("o", DType::BF16, &[3, 8])]);
    let rules = RuleSet::new(vec![Rule::rename("o", "o", Split::rows()).unwrap()]).unwrap();
    let tp = TpRank::new(1, 2).unwrap();
    let dest = manifest(vec![spec("o", DType::BF16, &[3, 4])]);
    let plan = plan(&SourceSet::single(src), &dest, &rules, tp).unwrap();
    assert_eq!(plan.summary().strided_ops, 1);
    let sources = source_bytes(&plan);
    let out = run_direct(&plan, &sources);
    // Row r of the shard is columns 4..8 of row r: bytes 8..16 of each 16-byte row.
    let expected: Vec<u8> = (0..3).flat_map(|r| sources[0][r * 16 + 8..r * 16 + 16].to_vec()).collect();
    assert_eq!(out[0], expected);
}

#[test]
fn moe_experts_stack_into_w13_and_w2_with_tp_slices_or_ep_ranges() {
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let (e, i, h) = (config.experts, config.moe_intermediate, config.hidden);
    let elt = config.dtype.size();
    for (ep, size) in [(false, 2u32), (true, 2), (true, 4), (false, 1)] {
        for plan in plan_all(&config, size, ep) {
            let rank = plan.tp.rank as u64;
            let w13 = plan.destinations.iter().find(|d| d.name == "model.layers.1.mlp.experts.w13_weight").unwrap();
            let w2 = plan.destinations.iter().find(|d| d.name == "model.layers.1.mlp.experts.w2_weight").unwrap();
            let s = size as u64;
            let (experts, local_i) = if ep { (e / s, i) } else { (e, i / s) };
            assert_eq!(w13.shape, vec![experts, 2 * local_i, h], "ep {ep} tp {size}");
            assert_eq!(w2.shape, vec![experts, h, local_i]);

            let sources = source_bytes(&plan);
            let out = run_through_buckets(&plan, &sources, 1000);
            let src = |name: String| &sources[plan.sources.iter().position(|p| p.spec.name == name).unwrap()];
            let w13_bytes = dest_bytes(&plan, &out, "model.layers.1.mlp.experts.w13_weight");
            let w2_bytes = dest_bytes(&plan, &out, "model.layers.1.mlp.experts.w2_weight");
            for local in 0..experts {
                let expert = if ep { rank * experts + local } else { local };
                let proj = |p: &str| src(format!("model.layers.1.mlp.experts.{expert}.{p}.weight"));
                let i_rows = if ep { 0..i } else { rank * local_i..(rank + 1) * local_i };
                let mut want13 = rows(proj("gate_proj"), h * elt, i_rows.clone());
                want13.extend(rows(proj("up_proj"), h * elt, i_rows.clone()));
                let n13 = (2 * local_i * h * elt) as usize;
                assert_eq!(&w13_bytes[local as usize * n13..(local as usize + 1) * n13], &want13[..]);
                // down_proj [h, i]: each of the h rows contributes its slice of columns.
                let down = proj("down_proj");
                let want2: Vec<u8> = (0..h)
                    .flat_map(|r| {
                        rows(&down[(r * i * elt) as usize..((r + 1) * i * elt) as usize], elt, i_rows.clone())
                    })
                    .collect();
                let n2 = (h * local_i * elt) as usize;
                assert_eq!(&w2_bytes[local as usize * n2..(local as usize + 1) * n2], &want2[..]);
            }
        }
    }
}

#[test]
fn problems_are_all_listed_at_once_and_name_every_tensor() {
    let config = synthetic("llama-tiny").unwrap();
    let rules = rules_for(&config, false);
    let good = config.source_manifest();
    let dest = destination_manifest(&SourceSet::single(good.clone()), &rules, TpRank::SINGLE, None, false).unwrap();

    let mut specs: Vec<TensorSpec> =
        good.iter().filter(|s| s.name != "model.layers.1.self_attn.k_proj.weight").cloned().collect();
    specs.push(spec("model.layers.0.mlp.extra_proj.weight", DType::BF16, &[4, 4]));
    let down = specs.iter_mut().find(|s| s.name == "model.layers.0.mlp.down_proj.weight").unwrap();
    down.dtype = DType::I64;
    let o = specs.iter_mut().find(|s| s.name == "model.layers.1.self_attn.o_proj.weight").unwrap();
    o.shape = vec![64, 32];

    let mut engine: Vec<TensorSpec> = dest.specs().to_vec();
    engine.retain(|s| s.name != "model.norm.weight");
    engine.push(spec("model.layers.0.self_attn.sinks", DType::BF16, &[4]));

    let err = plan(&SourceSet::single(manifest(specs)), &manifest(engine), &rules, TpRank::SINGLE).unwrap_err();
    let text = err.to_string();
    let expected = [
        "unmapped: source tensor `model.layers.0.mlp.extra_proj.weight`",
        "missing: `model.layers.1.self_attn.qkv_proj.weight` needs source tensor `model.layers.1.self_attn.k_proj.weight`",
        "dtype mismatch: `model.layers.0.mlp.down_proj.weight` is I64",
        "shape mismatch: `model.layers.1.self_attn.o_proj.weight` is [64, 64] in the engine but the sources make [64, 32]",
        "no destination: `model.norm.weight`",
        "not written: engine parameter `model.layers.0.self_attn.sinks`",
    ];
    for e in expected {
        assert!(text.contains(e), "missing {e:?} in:\n{text}");
    }
    assert_eq!(err.problems.len(), expected.len(), "{text}");
    let named: BTreeSet<&str> = err.problems.iter().flat_map(Problem::names).collect();
    assert!(
        named.contains("model.layers.1.self_attn.k_proj.weight") && named.contains("model.layers.0.self_attn.sinks")
    );
}

#[test]
fn two_rules_writing_one_parameter_is_a_duplicate() {
    let src = manifest(vec![spec("a.w", DType::F32, &[2]), spec("b.w", DType::F32, &[2])]);
    let rules = RuleSet::new(vec![
        Rule::rename("a.w", "x.w", Split::Replicated).unwrap(),
        Rule::rename("b.w", "x.w", Split::Replicated).unwrap(),
    ])
    .unwrap();
    let dest = manifest(vec![spec("x.w", DType::F32, &[2])]);
    let err = plan(&SourceSet::single(src), &dest, &rules, TpRank::SINGLE).unwrap_err();
    assert!(matches!(&err.problems[0], Problem::Duplicate { destination, .. } if destination == "x.w"), "{err}");
}

#[test]
fn renames_never_produce_malformed_fused_names() {
    for name in ["llama-tiny", "qwen2-tiny", "qwen3-tiny", "qwen3-moe-tiny"] {
        let config = synthetic(name).unwrap();
        let source = SourceSet::single(config.source_manifest());
        let rules = rules_for(&config, false);
        let dest = destination_manifest(&source, &rules, TpRank::SINGLE, None, true).unwrap();
        let allowed: BTreeSet<&str> = [
            "embed_tokens",
            "norm",
            "lm_head",
            "input_layernorm",
            "post_attention_layernorm",
            "qkv_proj",
            "o_proj",
            "gate_up_proj",
            "down_proj",
            "q_norm",
            "k_norm",
            "gate",
            "w13_weight",
            "w2_weight",
        ]
        .into();
        for d in dest.iter() {
            let module = d.name.split('.').rev().find(|c| *c != "weight" && *c != "bias").unwrap();
            assert!(allowed.contains(module), "{name}: unexpected destination `{}`", d.name);
            assert!(!d.name.contains("gate_gate") && !d.name.contains("up_up"), "{}", d.name);
        }
    }
}

#[test]
fn tied_embeddings_fill_an_untied_engine_lm_head() {
    let config = synthetic("qwen3-tiny").unwrap();
    assert!(config.tie_word_embeddings);
    let source = SourceSet::single(config.source_manifest());
    let rules = rules_for(&config, false);
    for tp in TpRank::all(2) {
        // An engine that ties too has no lm_head; one that unties gets it from the embeddings.
        let tied = destination_manifest(&source, &rules, tp, None, false).unwrap();
        assert!(tied.get("lm_head.weight").is_none());
        let untied = destination_manifest(&source, &rules, tp, None, true).unwrap();
        let plan = plan(&source, &untied, &rules, tp).unwrap();
        let out = run_direct(&plan, &source_bytes(&plan));
        assert_eq!(dest_bytes(&plan, &out, "lm_head.weight"), dest_bytes(&plan, &out, "model.embed_tokens.weight"));
    }
    // A source with its own lm_head uses it, not the tie.
    let untied_src = synthetic("llama-tiny").unwrap();
    let source = SourceSet::single(untied_src.source_manifest());
    let dest = destination_manifest(&source, &rules_for(&untied_src, false), TpRank::SINGLE, None, true).unwrap();
    let plan = plan(&source, &dest, &rules_for(&untied_src, false), TpRank::SINGLE).unwrap();
    let lm = plan.destinations.iter().position(|d| d.name == "lm_head.weight").unwrap() as u32;
    let from: Vec<&str> =
        plan.ops.iter().filter(|o| o.dst == lm).map(|o| plan.sources[o.src as usize].spec.name.as_str()).collect();
    assert_eq!(from, vec!["lm_head.weight"]);
}

#[test]
fn f32_master_weights_are_cast_to_the_engine_dtype() {
    let mut config = synthetic("qwen3-tiny").unwrap();
    config.dtype = DType::F32;
    let source = SourceSet::single(config.source_manifest());
    let rules = rules_for(&config, false);
    let tp = TpRank::new(0, 2).unwrap();
    let dest = destination_manifest(&source, &rules, tp, Some(DType::BF16), false).unwrap();
    let plan = plan(&source, &dest, &rules, tp).unwrap();
    let s = plan.summary();
    assert_eq!(s.cast_ops, s.ops);
    // bf16 halves every byte; TP 2 halves all but the replicated 1-D tensors (norms).
    assert_eq!(s.bytes_to_send * 4, s.source_bytes + replicated_f32_bytes(&plan));
    let values: Vec<Vec<u8>> = plan
        .sources
        .iter()
        .map(|p| (0..p.spec.numel()).flat_map(|i| (i as f32 * 0.37 - 5.0).to_le_bytes()).collect())
        .collect();
    let out = run_through_buckets(&plan, &values, 4096);
    let norm = dest_bytes(&plan, &out, "model.norm.weight");
    let got: Vec<f32> = norm.chunks(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let want: Vec<f32> = (0..config.hidden).map(|i| half::bf16::from_f32(i as f32 * 0.37 - 5.0).to_f32()).collect();
    assert_eq!(got, want);
}

/// Bytes (in f32) of the tensors every rank holds whole; they are not halved by TP 2.
fn replicated_f32_bytes(plan: &Plan) -> u64 {
    plan.sources.iter().filter(|p| p.spec.shape.len() == 1).map(|p| p.spec.byte_len()).sum()
}

#[test]
fn qwen3_8b_at_tp2_sends_each_rank_half_the_model() {
    let config = synthetic("qwen3-8b").unwrap();
    for plan in plan_all(&config, 2, false) {
        let s = plan.summary();
        assert_eq!(s.destination_bytes, plan.destinations.iter().map(TensorSpec::byte_len).sum::<u64>());
        assert_eq!(s.bytes_to_send, s.destination_bytes);
        let half = s.source_bytes as f64 / 2.0;
        // Only norms (a few MB) are replicated.
        assert!((s.bytes_to_send as f64 - half).abs() / half < 0.001, "{s:?}");
        assert_eq!(s.source_tensors, 399);
    }
}

#[test]
fn fsdp_dim0_pieces_plan_to_the_same_bytes_as_whole_tensors() {
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let whole = config.source_manifest();
    let rules = rules_for(&config, false);
    let tp = TpRank::new(1, 2).unwrap();
    let dest = destination_manifest(&SourceSet::single(whole.clone()), &rules, tp, None, false).unwrap();
    let reference = plan(&SourceSet::single(whole.clone()), &dest, &rules, tp).unwrap();
    let expected = run_direct(&reference, &source_bytes(&reference));

    let sharded = SourceSet::sharded(chunk_dim0(&whole, 3));
    let plan = plan(&sharded, &dest, &rules, tp).unwrap();
    assert_eq!(plan.sources.len(), whole.len() * 3);
    // Each piece holds its rows of the same whole-tensor bytes the reference used.
    let pieces: Vec<Vec<u8>> = plan
        .sources
        .iter()
        .map(|p| {
            let t = whole.position(&p.spec.name).unwrap();
            let row_bytes = p.spec.byte_len() / p.spec.shape[0].max(1);
            // The reference's piece t is whole tensor t, filled with fill_bytes(t, ..).
            let full = fill_bytes(t, whole.specs()[t].byte_len());
            full[(p.offset[0] * row_bytes) as usize..((p.offset[0] + p.spec.shape[0]) * row_bytes) as usize].to_vec()
        })
        .collect();
    assert_eq!(run_through_buckets(&plan, &pieces, 777), expected);
}

/// Splits every tensor along dim 0 over `n` senders the way torch.chunk does.
fn chunk_dim0(m: &Manifest, n: u64) -> Vec<Manifest> {
    (0..n)
        .map(|k| {
            manifest(
                m.iter()
                    .map(|s| {
                        let rows = s.shape[0];
                        let chunk = rows.div_ceil(n);
                        let (a, b) = ((k * chunk).min(rows), ((k + 1) * chunk).min(rows));
                        let mut shape = s.shape.clone();
                        shape[0] = b - a;
                        TensorSpec::new(s.name.clone(), s.dtype, shape)
                    })
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn misaligned_pieces_are_named() {
    let senders = vec![
        manifest(vec![spec("w", DType::BF16, &[2, 4])]),
        manifest(vec![spec("w", DType::BF16, &[2, 5])]),
        manifest(vec![spec("w", DType::F32, &[2, 4])]),
    ];
    let rules = RuleSet::new(vec![Rule::rename("w", "w", Split::Replicated).unwrap()]).unwrap();
    let dest = manifest(vec![spec("w", DType::BF16, &[2, 4])]);
    let err = plan(&SourceSet::sharded(senders), &dest, &rules, TpRank::SINGLE).unwrap_err();
    let bad: Vec<&Problem> = err.problems.iter().filter(|p| matches!(p, Problem::BadPieces { .. })).collect();
    assert_eq!(bad.len(), 2, "{err}");
    assert!(err.to_string().contains("sender 1 holds [2, 5]"), "{err}");
}

#[test]
fn plans_are_stable_values_and_stored_plans_are_verified() {
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let a = plan_all(&config, 2, false);
    let b = plan_all(&config, 2, false);
    assert_eq!(a[0].hash(), b[0].hash());
    assert_ne!(a[0].hash(), a[1].hash());
    let json = serde_json::to_string(&a[0]).unwrap();
    let back = Plan::from_json(&json).unwrap();
    assert_eq!(back, a[0]);
    assert_eq!(back.hash(), a[0].hash());

    // A plan that writes a block twice, or leaves one out, fails verification.
    let mut twice = a[0].clone();
    twice.ops.push(twice.ops[3].clone());
    let err = Plan::from_json(&serde_json::to_string(&twice).unwrap()).unwrap_err();
    assert!(matches!(err, StoredPlanError::Invalid(_)) && err.to_string().contains("overlap"), "{err}");
    assert!(matches!(Plan::from_json("{\"tp\": 3}"), Err(StoredPlanError::Json(_))));
    let mut short = a[0].clone();
    short.ops.remove(3);
    assert!(short.verify().unwrap_err().to_string().contains("elements written"));
    let mut outside = a[0].clone();
    outside.ops[0].dst_start[0] += 1;
    assert!(outside.verify().unwrap_err().to_string().contains("outside"));
}

#[test]
fn planning_the_moe_model_at_tp8_keeps_the_kv_replication_and_names_indivisible_sizes() {
    // 4 KV heads over 8 ranks replicate; 32 query heads split; experts split by intermediate.
    let config = synthetic("qwen3-30b-a3b").unwrap();
    let plans = plan_all(&config, 8, false);
    let qkv = plans[5].destinations.iter().find(|d| d.name == "model.layers.0.self_attn.qkv_proj.weight").unwrap();
    assert_eq!(qkv.shape, vec![(4 + 1 + 1) * 128, 2048]);
    // 3 ranks cannot split 32 heads.
    let source = SourceSet::single(config.source_manifest());
    let err =
        destination_manifest(&source, &rules_for(&config, false), TpRank::new(0, 3).unwrap(), None, false).unwrap_err();
    assert!(
        err.to_string().contains("`model.layers.0.self_attn.q_proj.weight`: dim 0 of length 4096"),
        "{}",
        &err.to_string()[..300]
    );
}

fn small_config() -> impl Strategy<Value = (ModelConfig, u32, bool, u64, usize)> {
    // (config, tp size, expert parallel, bucket bytes, senders)
    let preset = prop_oneof![Just(Preset::Llama), Just(Preset::Qwen3), Just(Preset::Qwen3Moe), Just(Preset::Identity)];
    (preset, 0usize..4, 1u64..4, 1u64..3, any::<bool>(), any::<bool>(), 1u32..=8, any::<bool>(), 16u64..600, 1usize..4)
        .prop_map(|(preset, heads_pow, kv_div, head_dim, bias, tie, tp, ep, bucket, senders)| {
            let heads = 1u64 << heads_pow;
            let kv_heads = (heads / kv_div).max(1);
            let tp = tp.min(8);
            let config = ModelConfig {
                name: "random".into(),
                preset,
                hidden: 8,
                layers: 2,
                heads,
                kv_heads,
                head_dim: head_dim * 2,
                intermediate: 16,
                vocab: 32,
                tie_word_embeddings: tie,
                qkv_bias: bias && preset == Preset::Llama,
                experts: if preset == Preset::Qwen3Moe { 8 } else { 0 },
                moe_intermediate: 8,
                mtp_layers: 0,
                shared_experts: 0,
                first_dense_layers: 0,
                dtype: DType::BF16,
            };
            (config, tp, ep, bucket, senders)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// For random models (MoE experts per tensor or stacked), TP sizes and presets: every
    /// rank's plan is covered, bucketed and direct execution agree, and copying every rank's
    /// destination back reassembles every source tensor exactly (bytes compared), with each
    /// source byte reached by some rank.
    #[test]
    fn all_ranks_together_reassemble_every_source_tensor(
        (config, tp_size, ep, bucket, senders) in small_config(),
        stacked_experts in any::<bool>(),
    ) {
        let whole = if stacked_experts { config.stacked_experts_manifest() } else { config.source_manifest() };
        let rules = rules_for(&config, ep);
        let single = SourceSet::single(whole.clone());
        let probe = destination_manifest(&single, &rules, TpRank { rank: 0, size: tp_size }, None, false);
        // Sizes that do not divide are errors, not plans: nothing more to check for them.
        prop_assume!(probe.is_ok());
        let source = if senders > 1 { SourceSet::sharded(chunk_dim0(&whole, senders as u64)) } else { single.clone() };

        let mut rebuilt: Vec<Vec<u8>> = whole.iter().map(|s| vec![0; s.byte_len() as usize]).collect();
        let mut reached: Vec<Vec<bool>> = whole.iter().map(|s| vec![false; s.byte_len() as usize]).collect();
        let originals: Vec<Vec<u8>> = whole.iter().enumerate().map(|(t, s)| fill_bytes(t, s.byte_len())).collect();
        for tp in TpRank::all(tp_size) {
            let dest = destination_manifest(&single, &rules, tp, None, false).unwrap();
            let plan = plan(&source, &dest, &rules, tp).unwrap();
            prop_assert!(plan.verify().is_ok());
            let pieces: Vec<Vec<u8>> = plan.sources.iter().map(|p| {
                let t = whole.position(&p.spec.name).unwrap();
                let row_bytes = p.spec.byte_len().checked_div(p.spec.shape[0]).unwrap_or(0);
                originals[t][(p.offset[0] * row_bytes) as usize..(p.offset[0] * row_bytes + p.spec.byte_len()) as usize].to_vec()
            }).collect();
            let via_buckets = run_through_buckets(&plan, &pieces, bucket);
            prop_assert_eq!(&via_buckets, &run_direct(&plan, &pieces));
            let s = plan.summary();
            prop_assert_eq!(s.bytes_to_send, s.destination_bytes);

            // Copy each op back from the destination into the whole source tensor.
            for op in &plan.ops {
                let piece = &plan.sources[op.src as usize];
                let t = whole.position(&piece.spec.name).unwrap();
                let elt = piece.spec.dtype.size() as usize;
                let row_elems: u64 = piece.spec.shape[1..].iter().product();
                let base = (piece.offset[0] * row_elems) as usize;
                for c in plan.strided(op) {
                    for r in 0..c.rows {
                        let s = (base + (c.src_offset + r * c.src_stride) as usize) * elt;
                        let d = ((c.dst_offset + r * c.dst_stride) as usize) * elt;
                        let n = c.row_elems as usize * elt;
                        rebuilt[t][s..s + n].copy_from_slice(&via_buckets[op.dst as usize][d..d + n]);
                        reached[t][s..s + n].iter_mut().for_each(|b| *b = true);
                    }
                }
            }
        }
        for (t, s) in whole.iter().enumerate() {
            prop_assert!(reached[t].iter().all(|&b| b), "bytes of `{}` reached no rank", s.name);
            prop_assert!(rebuilt[t] == originals[t], "`{}` reassembled wrongly", s.name);
        }
    }
}

/// The bytes of box `start`/`shape` of a row-major tensor of `whole` shape, `elt` bytes each.
fn box_bytes(bytes: &[u8], whole: &[u64], start: &[u64], shape: &[u64], elt: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if shape.contains(&0) {
        return out;
    }
    let rank = whole.len();
    let Some(last) = rank.checked_sub(1) else { return bytes.to_vec() };
    let mut at = vec![0u64; last];
    loop {
        let mut flat = 0u64;
        for d in 0..last {
            flat = flat * whole[d] + start[d] + at[d];
        }
        let flat = (flat * whole[last] + start[last]) as usize * elt;
        out.extend_from_slice(&bytes[flat..flat + shape[last] as usize * elt]);
        // The next index over dims 0..last, the last of them fastest.
        let mut d = last;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            at[d] += 1;
            if at[d] < shape[d] {
                break;
            }
            at[d] = 0;
        }
    }
}

/// Cuts `m` into `n` senders' placed pieces: each tensor along one dim (chosen by `seed`), at
/// uneven points (empty pieces included); piece k to sender k.
fn placed_cuts(m: &Manifest, n: u64, seed: u64) -> SourceSet {
    let mut rng = seed | 1;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rng >> 33
    };
    let mut senders: Vec<Vec<TensorSpec>> = vec![Vec::new(); n as usize];
    let mut placements: Vec<Vec<Option<Placement>>> = vec![Vec::new(); n as usize];
    for s in m.iter() {
        if s.shape.is_empty() {
            senders[0].push(s.clone());
            placements[0].push(None);
            continue;
        }
        let dim = (next() % s.shape.len() as u64) as usize;
        let len = s.shape[dim];
        let mut cuts: Vec<u64> = (1..n).map(|_| next() % (len + 1)).collect();
        cuts.sort_unstable();
        let bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(len)).collect();
        for k in 0..n as usize {
            let (a, b) = (bounds[k], bounds[k + 1]);
            let mut shape = s.shape.clone();
            shape[dim] = b - a;
            let mut offset = vec![0; s.shape.len()];
            offset[dim] = a;
            senders[k].push(TensorSpec::new(s.name.clone(), s.dtype, shape));
            placements[k].push(Some(Placement { offset, whole: s.shape.clone() }));
        }
    }
    SourceSet::placed(senders.into_iter().map(manifest).collect(), placements).unwrap()
}

proptest! {
    /// Pieces placed anywhere (FSDP dim-0 shards even or not, tensor-parallel rows or columns,
    /// ranges of experts, empty pieces) give every engine rank the bytes the whole tensors
    /// give it, through buckets.
    #[test]
    fn placed_pieces_cut_along_any_dim_plan_to_the_bytes_of_whole_tensors(
        (config, tp_size, ep, bucket, senders) in small_config(),
        seed in any::<u64>(),
    ) {
        let whole = config.source_manifest();
        let rules = rules_for(&config, ep);
        let single = SourceSet::single(whole.clone());
        prop_assume!(destination_manifest(&single, &rules, TpRank { rank: 0, size: tp_size }, None, false).is_ok());
        let placed = placed_cuts(&whole, senders as u64 + 1, seed);
        let originals: Vec<Vec<u8>> = whole.iter().enumerate().map(|(t, s)| fill_bytes(t, s.byte_len())).collect();
        for tp in TpRank::all(tp_size) {
            let dest = destination_manifest(&single, &rules, tp, None, false).unwrap();
            let reference = plan(&single, &dest, &rules, tp).unwrap();
            let expected = run_direct(&reference, &originals);
            let plan = plan(&placed, &dest, &rules, tp).unwrap();
            let pieces: Vec<Vec<u8>> = plan.sources.iter().map(|p| {
                let t = whole.position(&p.spec.name).unwrap();
                let shape = &whole.specs()[t].shape;
                box_bytes(&originals[t], shape, &p.offset, &p.spec.shape, p.spec.dtype.size() as usize)
            }).collect();
            prop_assert_eq!(run_through_buckets(&plan, &pieces, bucket), expected);
        }
    }
}

#[test]
fn placed_pieces_that_do_not_tile_their_whole_are_named() {
    let rules = RuleSet::new(vec![Rule::rename("w", "w", Split::Replicated).unwrap()]).unwrap();
    let dest = manifest(vec![spec("w", DType::BF16, &[4, 6])]);
    let piece = |shape: &[u64], offset: &[u64], whole: &[u64]| {
        (
            manifest(vec![spec("w", DType::BF16, shape)]),
            vec![Some(Placement { offset: offset.to_vec(), whole: whole.to_vec() })],
        )
    };
    let refused = |pieces: Vec<(Manifest, Vec<Option<Placement>>)>| {
        let (senders, placements) = pieces.into_iter().unzip();
        plan(&SourceSet::placed(senders, placements).unwrap(), &dest, &rules, TpRank::SINGLE).unwrap_err().to_string()
    };
    // Columns 0..3 and 3..6: a tensor-parallel row-parallel split, tiles exactly.
    let (senders, placements) =
        [piece(&[4, 3], &[0, 0], &[4, 6]), piece(&[4, 3], &[0, 3], &[4, 6])].into_iter().unzip();
    assert!(plan(&SourceSet::placed(senders, placements).unwrap(), &dest, &rules, TpRank::SINGLE).is_ok());
    let err = refused(vec![piece(&[4, 4], &[0, 0], &[4, 6]), piece(&[4, 3], &[0, 3], &[4, 6])]);
    assert!(err.contains("senders 0 and 1 overlap"), "{err}");
    let err = refused(vec![piece(&[4, 3], &[0, 0], &[4, 6]), piece(&[4, 2], &[0, 3], &[4, 6])]);
    assert!(err.contains("hold 20 of its 24 elements"), "{err}");
    let err = refused(vec![piece(&[4, 3], &[0, 0], &[4, 6]), piece(&[4, 3], &[0, 4], &[4, 6])]);
    assert!(err.contains("sender 1's piece [4, 3] at [0, 4] does not lie inside"), "{err}");
    let err = refused(vec![piece(&[4, 3], &[0, 0], &[4, 6]), piece(&[4, 3], &[0, 3], &[4, 7])]);
    assert!(err.contains("sender 1 places it in a whole of [4, 7]"), "{err}");
    let unplaced = (manifest(vec![spec("w", DType::BF16, &[4, 3])]), vec![None]);
    let err = refused(vec![piece(&[4, 3], &[0, 0], &[4, 6]), unplaced]);
    assert!(err.contains("places its piece and another sender does not"), "{err}");
    let err = SourceSet::placed(vec![dest.clone()], vec![vec![]]).unwrap_err().to_string();
    assert!(err.contains("one placement (or none) per tensor"), "{err}");
}

#[test]
fn preset_plans_write_every_destination_in_order() {
    for (name, tp, ep) in [("qwen3-moe-tiny", 2, false), ("qwen3-moe-tiny", 2, true), ("qwen2-tiny", 4, false)] {
        for plan in plan_all(&synthetic(name).unwrap(), tp, ep) {
            assert!(plan.sequential_destinations().iter().all(|&s| s), "{name} tp {tp}");
        }
    }
    // Concatenating along dim 1 interleaves the parts: not sequential.
    let src = manifest(vec![spec("a", DType::F32, &[2, 2]), spec("b", DType::F32, &[2, 3])]);
    let rules = RuleSet::new(vec![Rule::fuse("ab", 1, &[("a", Split::Replicated), ("b", Split::Replicated)]).unwrap()])
        .unwrap();
    let dest = manifest(vec![spec("ab", DType::F32, &[2, 5])]);
    let plan = plan(&SourceSet::single(src), &dest, &rules, TpRank::SINGLE).unwrap();
    assert_eq!(plan.sequential_destinations(), vec![false]);
}

/// transformers 5 holds a layer's experts stacked (`experts.gate_up_proj` [E, 2I, H], gate
/// then up; `experts.down_proj` [E, H, I]): the same weights in that layout plan to the same
/// engine parameters and the same bytes as per-expert tensors, at every TP size, with and
/// without expert parallelism.
#[test]
fn stacked_expert_sources_give_the_bytes_of_per_expert_sources() {
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let (per_expert, stacked) = (config.source_manifest(), config.stacked_experts_manifest());
    assert!(stacked.len() < per_expert.len());
    let per_expert_bytes: Vec<Vec<u8>> =
        per_expert.iter().enumerate().map(|(t, s)| fill_bytes(t, s.byte_len())).collect();
    let bytes_of = |name: &str| &per_expert_bytes[per_expert.position(name).unwrap()];
    // The stacked tensors made of the per-expert ones (rows of gate, then up, per expert).
    let stacked_bytes: Vec<Vec<u8>> = stacked
        .iter()
        .map(|spec| match spec.name.strip_suffix(".experts.gate_up_proj") {
            Some(mlp) => (0..config.experts)
                .flat_map(|e| {
                    let gate = bytes_of(&format!("{mlp}.experts.{e}.gate_proj.weight"));
                    let up = bytes_of(&format!("{mlp}.experts.{e}.up_proj.weight"));
                    gate.iter().chain(up).copied().collect::<Vec<u8>>()
                })
                .collect(),
            None => match spec.name.strip_suffix(".experts.down_proj") {
                Some(mlp) => (0..config.experts)
                    .flat_map(|e| bytes_of(&format!("{mlp}.experts.{e}.down_proj.weight")).clone())
                    .collect(),
                None => bytes_of(&spec.name).clone(),
            },
        })
        .collect();
    for (ep, size) in [(false, 1u32), (false, 2), (false, 4), (true, 2), (true, 4)] {
        let rules = rules_for(&config, ep);
        for tp in TpRank::all(size) {
            let from_experts = SourceSet::single(per_expert.clone());
            let from_stacked = SourceSet::single(stacked.clone());
            let dest = destination_manifest(&from_experts, &rules, tp, None, false).unwrap();
            assert_eq!(destination_manifest(&from_stacked, &rules, tp, None, false).unwrap(), dest, "ep {ep} {tp}");
            let a = plan(&from_experts, &dest, &rules, tp).unwrap();
            let b = plan(&from_stacked, &dest, &rules, tp).unwrap();
            let order = |p: &Plan| -> Vec<Vec<u8>> {
                p.sources
                    .iter()
                    .map(|s| stacked_or_expert(&s.spec.name, &stacked, &stacked_bytes, &per_expert, &per_expert_bytes))
                    .collect()
            };
            assert_eq!(run_direct(&a, &order(&a)), run_through_buckets(&b, &order(&b), 700), "ep {ep} {tp}");
        }
    }
}

fn stacked_or_expert(
    name: &str,
    stacked: &Manifest,
    stacked_bytes: &[Vec<u8>],
    experts: &Manifest,
    expert_bytes: &[Vec<u8>],
) -> Vec<u8> {
    match stacked.position(name) {
        Some(i) => stacked_bytes[i].clone(),
        None => expert_bytes[experts.position(name).unwrap()].clone(),
    }
}

#[test]
fn a_segment_that_does_not_divide_its_dim_is_named() {
    let src = manifest(vec![spec("gu", DType::F32, &[3, 4])]);
    let rules = RuleSet::new(vec![Rule::map(
        "w",
        0,
        vec![
            Part::segment("gu", 0, 0, 2, Split::Replicated).unwrap(),
            Part::segment("gu", 0, 1, 2, Split::Replicated).unwrap(),
        ],
    )
    .unwrap()])
    .unwrap();
    let dest = manifest(vec![spec("w", DType::F32, &[3, 4])]);
    let err = plan(&SourceSet::single(src), &dest, &rules, TpRank::SINGLE).unwrap_err().to_string();
    assert!(err.contains("`gu`") && err.contains("2 equal segments"), "{err}");
    let bad = Rule::map("w", 0, vec![Part::segment("gu", 0, 2, 2, Split::Replicated).unwrap()]).unwrap();
    assert!(RuleSet::new(vec![bad]).unwrap_err().to_string().contains("segment 2 of 2"));
}

/// `model`'s source tensors with the shapes of `changes` (name, new shape) instead.
fn reshaped(model: &Manifest, changes: &[(&str, &[u64])]) -> SourceSet {
    let specs = model
        .iter()
        .map(|s| match changes.iter().find(|(name, _)| *name == s.name) {
            Some((_, shape)) => TensorSpec::new(s.name.clone(), s.dtype, shape.to_vec()),
            None => s.clone(),
        })
        .collect();
    SourceSet::single(manifest(specs))
}

/// Plans `source` for every rank of `tp_size` against the manifests the valid `model` gives
/// the engine, and derives the engine manifest from `source` alone: all must fail.
fn refusals(model: &Manifest, source: &SourceSet, rules: &RuleSet, tp_size: u32) -> Vec<PlanError> {
    let valid = SourceSet::single(model.clone());
    let mut errors = Vec::new();
    for tp in TpRank::all(tp_size) {
        let engine = destination_manifest(&valid, rules, tp, None, false).unwrap();
        errors.push(plan(source, &engine, rules, tp).expect_err("plans against the engine"));
        errors.push(destination_manifest(source, rules, tp, None, false).expect_err("derives a manifest"));
    }
    errors
}

#[test]
fn gate_and_up_of_unequal_sizes_are_refused_naming_both() {
    // gate [I+2, H] beside up [I-2, H] fuses into a gate_up_proj of the right size, with two
    // gate rows in the up half: the parts are declared equal, so this is refused.
    let config = synthetic("llama-tiny").unwrap();
    let (i, h) = (config.intermediate, config.hidden);
    let model = config.source_manifest();
    let (gate, up) = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight");
    let source = reshaped(&model, &[(gate, &[i + 2, h]), (up, &[i - 2, h])]);
    for tp_size in [1, 2] {
        for err in refusals(&model, &source, &rules_for(&config, false), tp_size) {
            let want = Problem::UnequalParts {
                destination: "model.layers.0.mlp.gate_up_proj.weight".into(),
                dim: 0,
                parts: vec![(gate.into(), vec![i + 2, h]), (up.into(), vec![i - 2, h])],
            };
            assert_eq!(err.problems, vec![want], "tp {tp_size}: {err}");
            assert!(err.to_string().contains(&format!("`{gate}` is [130, 64], `{up}` is [126, 64]")), "{err}");
        }
    }
}

#[test]
fn q_with_a_head_too_many_and_k_with_one_too_few_are_refused_at_tp1_and_tp2() {
    // 4 query heads and 2 KV heads of 16: q [80, H] and k [16, H] make a qkv_proj of the right
    // total at TP 1; at TP 2 k's single head would be replicated to both ranks.
    let config = synthetic("llama-tiny").unwrap();
    let (hd, h) = (config.head_dim, config.hidden);
    let model = config.source_manifest();
    let (q, k) = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight");
    let source = reshaped(&model, &[(q, &[5 * hd, h]), (k, &[hd, h])]);
    let qkv = "model.layers.1.self_attn.qkv_proj.weight";
    let wrong = |source: &str, heads: u64, want: u64| Problem::PartShape {
        destination: qkv.into(),
        source: source.into(),
        shape: vec![heads * hd, h],
        expected: vec![want * hd, h],
        by: PartRule::Len { dim: 0, len: want * hd },
    };
    for tp_size in [1, 2] {
        for err in refusals(&model, &source, &rules_for(&config, false), tp_size) {
            assert_eq!(err.problems, vec![wrong(q, 5, 4), wrong(k, 1, 2)], "tp {tp_size}: {err}");
            let text = err.to_string();
            assert!(text.contains(&format!("part shape: `{q}` is [80, 64], but `{qkv}` needs it to be [64, 64]")));
            assert!(text.contains(&format!("part shape: `{k}` is [16, 64], but `{qkv}` needs it to be [32, 64]")));
        }
    }
}

#[test]
fn an_expert_unlike_the_others_is_named_itself_and_expert_gate_and_up_must_be_equal() {
    let config = synthetic("qwen3-moe-tiny").unwrap();
    let (i, h) = (config.moe_intermediate, config.hidden);
    let model = config.source_manifest();
    let expert = |e: u64, proj: &str| format!("model.layers.1.mlp.experts.{e}.{proj}.weight");
    let w13 = "model.layers.1.mlp.experts.w13_weight";
    // Expert 0 is the odd one out: it is named, not the first expert that differs from it.
    let odd = expert(0, "gate_proj");
    let source = reshaped(&model, &[(&odd, &[i + 1, h])]);
    for (ep, tp_size) in [(false, 1), (false, 2), (true, 2)] {
        for err in refusals(&model, &source, &rules_for(&config, ep), tp_size) {
            let want = Problem::PartShape {
                destination: w13.into(),
                source: odd.clone(),
                shape: vec![i + 1, h],
                expected: vec![i, h],
                by: PartRule::Experts { like: expert(1, "gate_proj") },
            };
            assert_eq!(err.problems, vec![want], "ep {ep} tp {tp_size}: {err}");
        }
    }
    // Every expert with gate [I+2, H] and up [I-2, H]: alike, but not equal halves.
    let mut changes: Vec<(String, Vec<u64>)> = Vec::new();
    for e in 0..config.experts {
        changes.push((expert(e, "gate_proj"), vec![i + 2, h]));
        changes.push((expert(e, "up_proj"), vec![i - 2, h]));
    }
    let changes: Vec<(&str, &[u64])> = changes.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let source = reshaped(&model, &changes);
    for err in refusals(&model, &source, &rules_for(&config, false), 2) {
        let want = Problem::UnequalParts {
            destination: w13.into(),
            dim: 0,
            parts: vec![(expert(0, "gate_proj"), vec![i + 2, h]), (expert(0, "up_proj"), vec![i - 2, h])],
        };
        assert_eq!(err.problems, vec![want], "{err}");
    }
}

#[test]
fn a_tensor_for_a_parameter_the_engine_lacks_is_reported_as_itself() {
    // A third layer's up_proj (or expert) in a 2-layer engine: no layers.2 gate_up_proj (or
    // w2_weight) to fill, rather than a gate_proj (or other experts) missing beside it.
    for (name, extra, destination) in [
        ("llama-tiny", "model.layers.2.mlp.up_proj.weight", "model.layers.2.mlp.gate_up_proj.weight"),
        ("qwen3-moe-tiny", "model.layers.2.mlp.experts.3.down_proj.weight", "model.layers.2.mlp.experts.w2_weight"),
    ] {
        let config = synthetic(name).unwrap();
        let model = config.source_manifest();
        let rules = rules_for(&config, false);
        let engine =
            destination_manifest(&SourceSet::single(model.clone()), &rules, TpRank::SINGLE, None, false).unwrap();
        let mut specs = model.specs().to_vec();
        specs.push(spec(extra, DType::BF16, &[8, 8]));
        let err = plan(&SourceSet::single(manifest(specs)), &engine, &rules, TpRank::SINGLE).unwrap_err();
        let want = Problem::NoDestination { destination: destination.into(), sources: vec![extra.into()] };
        assert_eq!(err.problems, vec![want], "{err}");
        assert!(err.to_string().contains(&format!("no destination: `{destination}` (from `{extra}`)")), "{err}");
    }
    // Where the engine has the parameter, a partner that is not there is still missing.
    let config = synthetic("llama-tiny").unwrap();
    let model = config.source_manifest();
    let rules = rules_for(&config, false);
    let engine = destination_manifest(&SourceSet::single(model.clone()), &rules, TpRank::SINGLE, None, false).unwrap();
    let gate = "model.layers.1.mlp.gate_proj.weight";
    let specs = model.iter().filter(|s| s.name != gate).cloned().collect();
    let err = plan(&SourceSet::single(manifest(specs)), &engine, &rules, TpRank::SINGLE).unwrap_err();
    let destination = "model.layers.1.mlp.gate_up_proj.weight".to_string();
    assert_eq!(err.problems, vec![Problem::MissingSource { destination, source: gate.into() }], "{err}");
}

#[test]
fn json_rules_declare_part_lengths_and_equal_parts() {
    let text = r#"[
        {"kind": "map", "to": "l.qkv", "parts": [
            {"from": "l.q", "split": "replicated", "len": 4},
            {"from": "l.k", "split": "replicated", "len": 2}]},
        {"kind": "map", "to": "l.gate_up", "equal_parts": true, "parts": [
            {"from": "l.gate", "split": "replicated"},
            {"from": "l.up", "split": "replicated"}]}
    ]"#;
    let rules = RuleSet::from_json(text).unwrap();
    let back = serde_json::to_string(&rules).unwrap();
    assert_eq!(RuleSet::from_json(&back).unwrap(), rules);
    let shapes = |q: u64, gate: u64| {
        let src = manifest(vec![
            spec("l.q", DType::F32, &[q, 3]),
            spec("l.k", DType::F32, &[6 - q, 3]),
            spec("l.gate", DType::F32, &[gate, 3]),
            spec("l.up", DType::F32, &[8 - gate, 3]),
        ]);
        let engine = manifest(vec![spec("l.qkv", DType::F32, &[6, 3]), spec("l.gate_up", DType::F32, &[8, 3])]);
        plan(&SourceSet::single(src), &engine, &rules, TpRank::SINGLE)
    };
    assert!(shapes(4, 4).is_ok());
    let err = shapes(5, 3).unwrap_err();
    let named: BTreeSet<&str> = err.problems.iter().flat_map(Problem::names).collect();
    let want: BTreeSet<&str> = ["l.qkv", "l.q", "l.k", "l.gate_up", "l.gate", "l.up"].into();
    assert_eq!(named, want, "{err}");
    assert_eq!(err.problems.len(), 3, "q, k and gate/up: {err}");
    // Rules that say neither serialise as they always did.
    let plain = RuleSet::new(vec![Rule::fuse("ab", 0, &[("a", Split::Replicated), ("b", Split::Replicated)]).unwrap()]);
    let json = serde_json::to_string(&plain.unwrap()).unwrap();
    assert!(!json.contains("len") && !json.contains("equal_parts"), "{json}");
    assert!(RuleSet::from_json(
        r#"[{"kind": "map", "to": "a", "parts": [{"from": "a", "split": "replicated", "len": 0}]}]"#
    )
    .unwrap_err()
    .to_string()
    .contains("len of 0"));
}

/// The source tensors that are one part of a fused or stacked destination under the presets
/// (q, k, v, gate, up and every expert's projections).
fn fused_parts(model: &Manifest) -> Vec<&TensorSpec> {
    let fused = [".q_proj.", ".k_proj.", ".v_proj.", ".gate_proj.", ".up_proj.", ".experts."];
    model.iter().filter(|s| fused.iter().any(|f| s.name.contains(f))).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Where `verbatim_source` names a range of the source, packing the op writes exactly those
    /// bytes; and every op of a same-dtype plan that slices only the first dimension has one.
    #[test]
    fn verbatim_sources_are_what_packing_writes((config, tp_size, ep, bucket, _) in small_config()) {
        let model = config.source_manifest();
        let rules = rules_for(&config, ep);
        let tp = TpRank { rank: tp_size - 1, size: tp_size };
        let engine = destination_manifest(&SourceSet::single(model.clone()), &rules, tp, None, false);
        prop_assume!(engine.is_ok());
        let plan = plan(&SourceSet::single(model), &engine.unwrap(), &rules, tp).unwrap();
        let sources = source_bytes(&plan);
        let mut verbatim = 0;
        for op in crate::bucket::buckets(&plan, bucket).unwrap().iter().flat_map(|b| &b.entries).map(|e| &e.op) {
            let mut packed = vec![0u8; plan.op_bytes(op) as usize];
            exec::pack(&plan, op, &sources[op.src as usize], &mut packed).unwrap();
            if let Some(range) = exec::verbatim_source(&plan, op) {
                prop_assert_eq!(&sources[op.src as usize][range], &packed[..]);
                verbatim += 1;
            }
            let src = &plan.sources[op.src as usize].spec;
            // Every dimension of the source but its first is whole (the extent may have more
            // dimensions, for a stack: compared from the last).
            let inner = src.shape.len().saturating_sub(1);
            let rows_only = op.extent.iter().rev().zip(src.shape.iter().rev()).take(inner).all(|(e, s)| e == s);
            if plan.cast(op).is_none() && rows_only {
                prop_assert!(exec::verbatim_source(&plan, op).is_some(), "op {:?} of {} has none", op, src.name);
            }
        }
        prop_assert!(verbatim > 0);
    }

    /// In a valid model, one fused or stacked part made longer or shorter (by a row or by a
    /// head) fails planning and deriving the engine's manifest, with a problem naming that part.
    #[test]
    fn one_part_of_the_wrong_size_is_named(
        (config, tp_size, ep, _, _) in small_config(),
        pick in any::<prop::sample::Index>(),
        by_heads in any::<bool>(),
        grow in any::<bool>(),
    ) {
        prop_assume!(config.preset != Preset::Identity);
        let model = config.source_manifest();
        let rules = rules_for(&config, ep);
        let tp = TpRank { rank: tp_size - 1, size: tp_size };
        let engine = destination_manifest(&SourceSet::single(model.clone()), &rules, tp, None, false);
        prop_assume!(engine.is_ok());
        let parts = fused_parts(&model);
        let victim = pick.get(&parts);
        let step = if by_heads && victim.name.contains(".self_attn.") { config.head_dim } else { 1 };
        let mut shape = victim.shape.clone();
        shape[0] = if grow || shape[0] <= step { shape[0] + step } else { shape[0] - step };
        let source = reshaped(&model, &[(&victim.name, &shape)]);
        let errors = [
            plan(&source, &engine.unwrap(), &rules, tp).expect_err("plans against the engine"),
            destination_manifest(&source, &rules, tp, None, false).expect_err("derives a manifest"),
        ];
        for err in errors {
            let named = err.problems.iter().any(|p| {
                matches!(p, Problem::PartShape { .. } | Problem::UnequalParts { .. })
                    && p.names().contains(&victim.name.as_str())
            });
            prop_assert!(named, "`{}` {:?} -> {:?} not named as a part:\n{}", victim.name, victim.shape, shape, err);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// The plan of each whole-tensor bucket's destinations verifies on its own, and together
    /// the parts write every destination exactly as the whole plan does.
    #[test]
    fn bucket_parts_verify_and_write_what_the_plan_writes((config, tp_size, ep, bucket, _) in small_config()) {
        let model = config.source_manifest();
        let rules = rules_for(&config, ep);
        let tp = TpRank { rank: 0, size: tp_size };
        let engine = destination_manifest(&SourceSet::single(model.clone()), &rules, tp, None, false);
        prop_assume!(engine.is_ok());
        let plan = plan(&SourceSet::single(model), &engine.unwrap(), &rules, tp).unwrap();
        let sources = source_bytes(&plan);
        let whole = run_through_buckets(&plan, &sources, bucket);
        let mut seen = vec![false; plan.destinations.len()];
        for b in crate::bucket::whole_tensor_buckets(&plan, bucket).unwrap() {
            let mut dsts: Vec<u32> = b.entries.iter().map(|e| e.op.dst).collect();
            dsts.dedup();
            dsts.retain(|&d| !std::mem::replace(&mut seen[d as usize], true));
            if dsts.is_empty() {
                continue;
            }
            let part = plan.restricted_to(&dsts);
            prop_assert!(part.verify().is_ok());
            let written = run_through_buckets(&part, &sources, bucket);
            for (i, &d) in dsts.iter().enumerate() {
                prop_assert_eq!(&written[i], &whole[d as usize], "`{}`", plan.destinations[d as usize].name);
            }
        }
        prop_assert!(seen.iter().zip(&plan.destinations).all(|(&s, d)| s || d.byte_len() == 0));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// For random models, presets, TP ranks, trainer shards and blocks: the FP8 engine of the
    /// rank either plans, and then holds through buckets of any size (and directly) exactly
    /// what quantizing each of its bf16 tensors whole gives, or fails with quantization
    /// problems only, each naming an engine tensor.
    #[test]
    fn fp8_engines_of_random_models_hold_the_whole_tensor_quantization(
        (config, tp_size, ep, bucket, senders) in small_config(),
        rows_pow in 0u32..4, cols_pow in 0u32..4, rank in 0u32..8,
    ) {
        use crate::quant::{Quant, QuantPlan};
        let whole = config.source_manifest();
        let rules = rules_for(&config, ep);
        let single = SourceSet::single(whole.clone());
        let tp = TpRank { rank: rank % tp_size, size: tp_size };
        let dest = destination_manifest(&single, &rules, tp, None, false);
        prop_assume!(dest.is_ok());
        let dest = dest.unwrap();
        let source = if senders > 1 { SourceSet::sharded(chunk_dim0(&whole, senders as u64)) } else { single.clone() };
        let bf16 = plan(&source, &dest, &rules, tp).unwrap();
        let quant = Quant::Block { rows: 1 << rows_pow, cols: 1 << cols_pow };
        let derived = QuantPlan::new(&bf16, quant);
        prop_assume!(derived.as_ref().is_ok_and(|q| !q.targets.is_empty()));
        let engine = derived.unwrap().engine_manifest(&bf16);
        let fp8 = match plan(&source, &engine, &rules, tp) {
            Ok(fp8) => fp8,
            Err(e) => {
                // The engine's scales say "at least the whole dim" where their grid is one,
                // and the planner then takes 128, which a TP slice may split.
                prop_assert!(e.problems.iter().all(|p| p.kind() == "quant"), "{}", e);
                prop_assert!(e.problems.iter().all(|p| p.names().iter().all(|n| engine.get(n).is_some())), "{}", e);
                return Ok(());
            }
        };
        let originals: Vec<Vec<u8>> = whole.iter().enumerate().map(|(t, s)| fill_bytes(t, s.byte_len())).collect();
        let pieces: Vec<Vec<u8>> = fp8.sources.iter().map(|p| {
            let t = whole.position(&p.spec.name).unwrap();
            let row_bytes = p.spec.byte_len().checked_div(p.spec.shape[0]).unwrap_or(0);
            originals[t][(p.offset[0] * row_bytes) as usize..(p.offset[0] * row_bytes + p.spec.byte_len()) as usize].to_vec()
        }).collect();
        let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let want = crate::quant::tests::reference(&bf16, &fp8, &refs);
        let got = crate::quant::tests::through_buckets(&fp8, &refs, bucket.max(512));
        for (d, spec) in fp8.destinations.iter().enumerate() {
            prop_assert!(got[d] == want[d], "`{}` through buckets", spec.name);
        }
        prop_assert_eq!(run_direct(&fp8, &pieces), want);
    }
}
