//! Sharded trainers: every rank pushes its own pieces of one version, over its own
//! connection to every engine rank (receivers on threads of this process, each rank of the
//! trainer on a thread of its own with its own connections), and each engine rank ends up
//! with the bytes one sender of the whole tensors would give it.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use weightlift::core::{exec, plan, synthetic, Placement, SourceSet, TpRank, Version};
use weightlift::{
    Endpoint, Fault, HostTensors, ReceiverOptions, SendError, SenderOptions, Shard, StepReport, Trainer, TransportKind,
};

mod common;
use common::{setup, Setup};

/// How a trainer's ranks cut each tensor.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// FSDP2: dim 0 in `torch.chunk` pieces.
    Fsdp,
    /// Each tensor along a dim of its own, at random places (some pieces empty).
    Random(u64),
}

fn pieces(whole: &HostTensors, cut: Cut, rank: u32, world: u32) -> (HostTensors, Vec<Option<Placement>>) {
    let Cut::Random(seed) = cut else { return whole.fsdp_shard(rank, world) };
    let boxes = whole.manifest().iter().enumerate().map(|(t, spec)| {
        let mut state = seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let dim = (next() % spec.shape.len() as u64) as usize;
        let len = spec.shape[dim];
        let mut cuts: Vec<u64> = (1..world).map(|_| next() % (len + 1)).collect();
        cuts.sort_unstable();
        let bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(len)).collect();
        let (start, end) = (bounds[rank as usize], bounds[rank as usize + 1]);
        let mut offset = vec![0; spec.shape.len()];
        let mut shape = spec.shape.clone();
        offset[dim] = start;
        shape[dim] = end - start;
        (offset, shape)
    });
    whole.cut(&boxes.collect::<Vec<_>>())
}

/// A fresh label per engine, for its sockets.
fn label(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("shard-{what}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The engine's ranks of `model` at `tp_size`, each on its own socket.
fn engine(model: &str, tp_size: u32, options: ReceiverOptions) -> Vec<Setup> {
    let name = label(model);
    (0..tp_size)
        .map(|r| setup(model, TpRank::new(r, tp_size).unwrap(), &format!("{name}-{r}"), options.clone()))
        .collect()
}

fn endpoints(engine: &[Setup]) -> Vec<Endpoint> {
    engine.iter().map(|s| s.endpoint.clone()).collect()
}

/// Every engine rank holds what a single sender of `whole` makes for it.
fn assert_like_one_sender(engine: &[Setup], whole: &HostTensors, what: &str) {
    for s in engine {
        let tp = s.receiver.tp();
        let dest = s.receiver.manifest().clone();
        let reference = plan(&SourceSet::single(whole.manifest().clone()), &dest, &s.rules, tp).unwrap();
        let sources: Vec<&[u8]> = whole.data().iter().map(Vec::as_slice).collect();
        let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
        exec::execute(&reference, &sources, &mut expected).unwrap();
        s.receiver
            .with_host_tensors(|t| {
                for (i, want) in expected.iter().enumerate() {
                    assert!(
                        t.bytes(i) == want.as_slice(),
                        "{what}: rank {} `{}` differs",
                        tp.rank,
                        dest.specs()[i].name
                    );
                }
            })
            .unwrap();
    }
}

/// Each of `world` trainer ranks, on a thread of its own, connects to every engine rank and
/// pushes versions `versions` of `whole` stepped once before each, cut by `cut`; the step
/// reports per version, per trainer rank.
fn push_sharded(
    engine: &[Setup],
    whole: &HostTensors,
    cut: Cut,
    world: u32,
    versions: std::ops::RangeInclusive<u64>,
    options: impl Fn(u32) -> SenderOptions + Sync,
) -> Vec<Vec<Result<StepReport, SendError>>> {
    let endpoints = endpoints(engine);
    let rules = engine[0].rules.clone();
    std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..world)
            .map(|rank| {
                let (endpoints, rules, options) = (&endpoints, &rules, &options);
                let versions = versions.clone();
                let mut whole = whole.clone();
                scope.spawn(move || {
                    let (mine, placements) = pieces(&whole, cut, rank, world);
                    let shard = Shard { rank, world, placements };
                    let mut trainer =
                        match Trainer::connect_shard(endpoints, mine.manifest(), rules, &options(rank), &shard) {
                            Ok(trainer) => trainer,
                            Err(e) => return vec![Err(e)],
                        };
                    versions
                        .map(|v| {
                            whole.perturb();
                            let (mine, _) = pieces(&whole, cut, rank, world);
                            trainer.push(Version(v), &mine)
                        })
                        .collect()
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn small_buckets(_: u32) -> SenderOptions {
    SenderOptions { bucket_bytes: 4096, ..SenderOptions::default() }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Random shardings (any dim, uneven, empty pieces) of 2-4 ranks, into engines of one or
    /// two ranks over shared memory and TCP: every version commits on every engine rank with
    /// the bytes of the whole tensors.
    #[test]
    fn sharded_trainers_update_every_engine_rank_with_the_whole_tensors_bytes(
        model in prop_oneof![Just("qwen3-tiny"), Just("qwen3-moe-tiny")],
        world in 2u32..=4,
        tp_size in 1u32..=2,
        tcp in any::<bool>(),
        fsdp in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let engine = engine(model, tp_size, ReceiverOptions::default());
        let mut whole = HostTensors::synthetic(&synthetic(model).unwrap(), seed);
        let cut = if fsdp { Cut::Fsdp } else { Cut::Random(seed) };
        let transport = if tcp { TransportKind::Tcp } else { TransportKind::Shm };
        let options = |_| SenderOptions { transport, bucket_bytes: 4096, ..SenderOptions::default() };
        let steps = push_sharded(&engine, &whole, cut, world, 1..=2, options);
        for (rank, steps) in steps.iter().enumerate() {
            prop_assert_eq!(steps.len(), 2);
            for step in steps {
                let step = step.as_ref().unwrap();
                prop_assert!(step.committed && step.verified, "trainer rank {}: {:?}", rank, step.failure());
            }
        }
        whole.perturb();
        whole.perturb();
        let what = format!("{model} {world} ranks {cut:?} tp {tp_size} {transport}");
        assert_like_one_sender(&engine, &whole, &what);
        for s in &engine {
            prop_assert_eq!(s.receiver.committed(), Version(2));
            prop_assert!(s.receiver.dirty().is_empty());
        }
    }
}

#[test]
fn a_rank_that_hangs_up_fails_the_version_on_every_engine_rank_naming_it() {
    let engine = engine("qwen3-moe-tiny", 2, ReceiverOptions::default());
    let mut whole = HostTensors::synthetic(&synthetic("qwen3-moe-tiny").unwrap(), 3);
    let steps = push_sharded(&engine, &whole, Cut::Fsdp, 3, 1..=1, small_buckets);
    assert!(steps.iter().flatten().all(|s| s.as_ref().unwrap().committed));
    whole.perturb();

    // Rank 1 hangs up after its first bucket of version 2.
    let hang_up =
        |rank| SenderOptions { fault: (rank == 1).then_some(Fault::HangUpAfterBuckets(1)), ..small_buckets(rank) };
    let steps = push_sharded(&engine, &whole, Cut::Fsdp, 3, 2..=2, hang_up);
    let rank0 = steps[0][0].as_ref().unwrap();
    assert!(!rank0.committed, "{rank0:?}");
    let failure = rank0.failure().unwrap();
    assert!(failure.contains("trainer rank 1"), "{failure}");
    for s in &engine {
        assert_eq!(s.receiver.committed(), Version(1));
        assert!(!s.receiver.dirty().is_empty(), "what rank 0 wrote of version 2 is dirty");
        let report = s.receiver.last_report().unwrap();
        assert!(report.error.as_deref().unwrap().contains("trainer rank 1"), "{report:?}");
    }

    // The ranks connect again and the version goes through.
    let steps = push_sharded(&engine, &whole, Cut::Fsdp, 3, 2..=2, small_buckets);
    assert!(steps.iter().flatten().all(|s| s.as_ref().unwrap().committed), "{steps:?}");
    whole.perturb();
    assert_like_one_sender(&engine, &whole, "after the retry");
    assert!(engine.iter().all(|s| s.receiver.dirty().is_empty()));
}

#[test]
fn a_flipped_byte_in_one_ranks_share_fails_verification_everywhere() {
    let engine = engine("qwen3-tiny", 1, ReceiverOptions::default());
    let whole = HostTensors::synthetic(&synthetic("qwen3-tiny").unwrap(), 5);
    let flip = |rank| SenderOptions { fault: (rank == 2).then_some(Fault::FlipByteInBucket(0)), ..small_buckets(rank) };
    let steps = push_sharded(&engine, &whole, Cut::Fsdp, 3, 1..=1, flip);
    for (rank, steps) in steps.iter().enumerate() {
        let step = steps[0].as_ref().unwrap();
        assert!(!step.committed, "rank {rank}");
        assert!(!step.ranks[0].mismatched.is_empty(), "rank {rank}: {:?}", step.ranks[0]);
        let error = step.ranks[0].error.as_deref().unwrap();
        assert!(error.contains("trainer rank 2's share"), "rank {rank}: {error}");
    }
    assert_eq!(engine[0].receiver.committed(), Version(0));
}

#[test]
fn ranks_that_never_connect_are_named_to_those_that_did() {
    let options = ReceiverOptions { timeout: Duration::from_millis(500), ..ReceiverOptions::default() };
    let engine = engine("qwen3-tiny", 1, options);
    let whole = HostTensors::synthetic(&synthetic("qwen3-tiny").unwrap(), 5);
    for (rank, missing) in [(0, "rank(s) 1, 2 of 3"), (2, "rank(s) 0, 1 of 3")] {
        let (mine, placements) = whole.fsdp_shard(rank, 3);
        let shard = Shard { rank, world: 3, placements };
        let err =
            Trainer::connect_shard(&endpoints(&engine), mine.manifest(), &engine[0].rules, &small_buckets(0), &shard)
                .err()
                .expect("refused");
        assert!(err.to_string().contains(missing), "{err}");
    }
}

#[test]
fn ranks_that_offer_different_versions_are_refused_and_nothing_is_written() {
    let engine = engine("qwen3-tiny", 1, ReceiverOptions::default());
    let whole = HostTensors::synthetic(&synthetic("qwen3-tiny").unwrap(), 5);
    let endpoints = endpoints(&engine);
    let rules = engine[0].rules.clone();
    let refused: Vec<String> = std::thread::scope(|scope| {
        let ranks: Vec<_> = (0..2u32)
            .map(|rank| {
                let (endpoints, rules, whole) = (&endpoints, &rules, &whole);
                scope.spawn(move || {
                    let (mine, placements) = whole.fsdp_shard(rank, 2);
                    let shard = Shard { rank, world: 2, placements };
                    let mut trainer =
                        Trainer::connect_shard(endpoints, mine.manifest(), rules, &small_buckets(rank), &shard)
                            .unwrap();
                    let step = trainer.push(Version(1 + u64::from(rank)), &mine).unwrap();
                    assert!(!step.committed);
                    step.failure().unwrap()
                })
            })
            .collect();
        ranks.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for failure in &refused {
        assert!(failure.contains("trainer rank 1 offers version 2 and rank 0 version 1"), "{failure}");
    }
    assert_eq!(engine[0].receiver.committed(), Version(0));
    assert!(engine[0].receiver.dirty().is_empty());
}

/// The CLI: `weightlift demo --senders 3` runs three trainer processes, each pushing its
/// FSDP pieces, into two engine processes; and a rank process that hangs up makes rank 0's
/// `push` fail naming it, with the engines still on their last version.
#[test]
fn trainer_rank_processes_push_through_the_cli() {
    let out = common::weightlift(&[
        "demo",
        "--synthetic",
        "qwen3-moe-tiny",
        "--senders",
        "3",
        "--tp-size",
        "2",
        "--steps",
        "2",
        "--json",
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", common::stderr(&out));
    let demo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(demo["senders"], 3);
    let steps = demo["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert!(steps.iter().all(|s| s["verified"] == true), "{demo}");

    let dir = common::temp_dir("shard-cli");
    let engine: Vec<common::Serve> = (0..2)
        .map(|r| {
            let listen = format!("unix:{}", dir.join(format!("r{r}.sock")).display());
            common::Serve::rank("qwen3-tiny", &listen, 2, r, &["--timeout-s", "5"])
        })
        .collect();
    let push = |rank: u32, version: &str, fault: Option<&str>| {
        let (rank, world) = (rank.to_string(), "2".to_string());
        let mut args =
            vec!["push", "--synthetic", "qwen3-tiny", "--version", version, "--rank", &rank, "--world", &world];
        args.extend(["--bucket-bytes", "4096"]);
        for e in &engine {
            args.extend(["--to", e.endpoint.as_str()]);
        }
        if let Some(fault) = fault {
            args.extend(["--fault", fault]);
        }
        let mut cmd = common::weightlift(&args);
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
        cmd.spawn().unwrap()
    };
    for rank in [push(0, "1", None), push(1, "1", None)] {
        let out = rank.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", common::stderr(&out));
    }
    let (rank0, rank1) = (push(0, "2", None), push(1, "2", Some("hangup:1")));
    assert!(!rank1.wait_with_output().unwrap().status.success());
    let rank0 = rank0.wait_with_output().unwrap();
    assert!(!rank0.status.success());
    assert!(common::stderr(&rank0).contains("trainer rank 1"), "{}", common::stderr(&rank0));
    // The engine is still on version 1: a push of version 1 is refused as not newer.
    let again = common::weightlift(&[
        "push",
        "--synthetic",
        "qwen3-tiny",
        "--version",
        "1",
        "--to",
        engine[0].endpoint.as_str(),
    ])
    .output()
    .unwrap();
    assert!(!again.status.success());
    assert!(common::stderr(&again).contains("version 1"), "{}", common::stderr(&again));
}
