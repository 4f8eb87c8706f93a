//! A model of one update at cluster scale: the bytes every link carries and the time the
//! update takes at the links' rates, from the plans of each engine's TP ranks and a placement
//! (trainer ranks holding FSDP2 dim-0 shards, engine replicas at a TP size, their hosts).
//!
//! The model is the data plane weightlift runs: every engine rank takes exactly its bytes
//! from the trainer ranks that hold them; the ranks of the replicas of one engine that take
//! the same bytes form one fan-out class, fed by one broadcast (a pipeline through the class:
//! each receiver takes the bytes once and forwards them once), so a trainer rank sends its
//! share once per class, not once per replica. Time is the busiest link direction's bytes
//! over its rate (a bound at line rate: no latency, no contention beyond the link). Beside it,
//! what the same placement costs without fan-out (one send per replica) and the field's
//! gather-then-push (every parameter gathered whole, rank 0 sends it all).

use serde::{Deserialize, Serialize};

use crate::plan::Plan;

/// Rows `[start, end)` of a tensor of `rows` rows that FSDP2 rank `rank` of `world` holds
/// (dim 0 in `torch.chunk` pieces: ceil(rows / world) each, the last ones short or empty).
pub fn fsdp_rows(rows: u64, rank: u32, world: u32) -> (u64, u64) {
    let chunk = rows.div_ceil(u64::from(world.max(1)));
    let start = (chunk * u64::from(rank)).min(rows);
    (start, (start + chunk).min(rows))
}

/// Bytes (in the destination dtype, as they travel) that each of `world` FSDP2 trainer ranks
/// holds of what `plan` (planned over whole source tensors) writes. A 0-dimensional source
/// is held by every rank and sent by rank 0.
pub fn bytes_per_trainer_rank(plan: &Plan, world: u32) -> Vec<u64> {
    let mut bytes = vec![0u64; world.max(1) as usize];
    for op in &plan.ops {
        let shape = &plan.sources[op.src as usize].spec.shape;
        let elt = plan.destinations[op.dst as usize].dtype.size();
        let Some(&first) = op.src_start.first() else {
            bytes[0] += op.numel() * elt;
            continue;
        };
        let lead = op.extent.len() - shape.len();
        let rows = op.extent[lead];
        if rows == 0 {
            continue;
        }
        let per_row = op.numel() / rows * elt;
        let (from, to) = (first, first + rows);
        let chunk = shape[0].div_ceil(u64::from(world.max(1)));
        for (w, held) in bytes.iter_mut().enumerate().skip((from / chunk) as usize) {
            let (start, end) = fsdp_rows(shape[0], w as u32, world);
            if start >= to {
                break;
            }
            *held += (end.min(to).saturating_sub(start.max(from))) * per_row;
        }
    }
    bytes
}

/// Where the trainer and the engines run, and the rates of the links between GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    pub trainer: TrainerPlacement,
    pub engines: Vec<EnginePlacement>,
    /// Trainer and engines on one host, every transfer over NVLink (the 2- and 4-GPU runs);
    /// else disaggregated, every transfer over the network.
    #[serde(default)]
    pub same_host: bool,
    pub links: Links,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainerPlacement {
    /// Trainer ranks, each holding an FSDP2 dim-0 shard of every tensor (1: whole tensors).
    pub ranks: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnginePlacement {
    pub replicas: u32,
    pub tp: u32,
    /// Experts split over the TP ranks instead of sliced (expert parallelism).
    #[serde(default)]
    pub expert_parallel: bool,
}

/// GB/s per GPU and direction (full duplex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    pub nvlink_gbps: f64,
    pub network_gbps: f64,
}

/// The bytes each kind of link direction carries at most, and the time they take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkLoad {
    /// Bytes out of the busiest trainer GPU.
    pub trainer_egress_bytes: u64,
    /// Bytes into the busiest engine GPU (its shard of the model).
    pub engine_ingress_bytes: u64,
    /// Bytes the busiest engine GPU forwards to the next receiver of its broadcast.
    pub engine_forward_bytes: u64,
    /// Bytes over all links (each hop counted).
    pub total_bytes: u64,
    /// The busiest link direction's bytes over the link's rate.
    pub seconds: f64,
    /// Which link direction that is.
    pub bottleneck: String,
}

/// One engine of a placement in the model: its replicas' classes and loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineModel {
    pub replicas: u32,
    pub tp: u32,
    pub expert_parallel: bool,
    /// Per TP rank: bytes it takes (one replica).
    pub rank_bytes: Vec<u64>,
    /// Bytes one replica takes, over its ranks (a tensor every rank holds, once per rank).
    pub replica_bytes: u64,
    /// Fan-out classes (one per TP rank: its replicas) and receivers per class.
    pub classes: u32,
    pub receivers_per_class: u32,
}

/// The model of one update under a placement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterModel {
    pub placement: Placement,
    /// Bytes of the model as the trainer holds it (all ranks together).
    pub model_bytes: u64,
    pub engines: Vec<EngineModel>,
    /// weightlift: shards as held, fan-out by broadcast.
    pub fan_out: LinkLoad,
    /// Shards as held, one send per replica (no fan-out).
    pub per_replica: LinkLoad,
    /// Every parameter gathered whole on the trainer (`full_tensor()`), rank 0 sends all of
    /// it to every engine rank (the gather's own traffic not counted).
    pub gather_then_push: LinkLoad,
    /// NCCL communicators a trainer rank is part of, with one per class.
    pub communicators_per_trainer_rank: u32,
}

/// Why a placement cannot be modelled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("placement: {0}")]
    Invalid(String),
}

/// Models one update under `placement`, given for each of its engines the plan of each TP
/// rank (over whole source tensors, in rank order).
pub fn model(placement: &Placement, engine_plans: &[Vec<Plan>]) -> Result<ClusterModel, ClusterError> {
    let world = placement.trainer.ranks;
    if world == 0 {
        return Err(ClusterError::Invalid("the trainer needs at least one rank".into()));
    }
    if engine_plans.len() != placement.engines.len() || placement.engines.is_empty() {
        return Err(ClusterError::Invalid(format!(
            "{} engine(s) placed, {} planned",
            placement.engines.len(),
            engine_plans.len()
        )));
    }
    let rate = if placement.same_host { placement.links.nvlink_gbps } else { placement.links.network_gbps };
    if rate.is_nan() || rate <= 0.0 || rate.is_infinite() {
        return Err(ClusterError::Invalid(format!("link rate {rate} GB/s: must be positive")));
    }
    let mut engines = Vec::new();
    // Per trainer rank: bytes sent with fan-out, and with one send per replica.
    let (mut egress, mut egress_per_replica) = (vec![0u64; world as usize], vec![0u64; world as usize]);
    let (mut ingress, mut forward, mut hops) = (0u64, 0u64, 0u64);
    let mut communicators = 0;
    let mut model_bytes = 0;
    for (engine, plans) in placement.engines.iter().zip(engine_plans) {
        if engine.replicas == 0 || plans.len() != engine.tp as usize {
            return Err(ClusterError::Invalid(format!(
                "an engine of {} replica(s) at TP {} with {} rank plan(s)",
                engine.replicas,
                engine.tp,
                plans.len()
            )));
        }
        let mut rank_bytes = Vec::new();
        for plan in plans {
            let held = bytes_per_trainer_rank(plan, world);
            let bytes: u64 = held.iter().sum();
            for (w, b) in held.iter().enumerate() {
                egress[w] += b;
                egress_per_replica[w] += b * u64::from(engine.replicas);
            }
            ingress = ingress.max(bytes);
            // The last receiver of a chain forwards nothing; with one replica nobody forwards.
            if engine.replicas > 1 {
                forward = forward.max(bytes);
            }
            hops += bytes * u64::from(engine.replicas);
            rank_bytes.push(bytes);
        }
        model_bytes = plans[0].sources.iter().map(|s| s.spec.byte_len()).sum();
        communicators += engine.tp;
        engines.push(EngineModel {
            replicas: engine.replicas,
            tp: engine.tp,
            expert_parallel: engine.expert_parallel,
            replica_bytes: rank_bytes.iter().sum(),
            rank_bytes,
            classes: engine.tp,
            receivers_per_class: engine.replicas,
        });
    }
    let load = |trainer: u64, forward: u64, total: u64| {
        let mut bottleneck = ("trainer GPU egress", trainer);
        for candidate in [("engine GPU ingress", ingress), ("engine GPU forwarding egress", forward)] {
            if candidate.1 > bottleneck.1 {
                bottleneck = candidate;
            }
        }
        LinkLoad {
            trainer_egress_bytes: trainer,
            engine_ingress_bytes: ingress,
            engine_forward_bytes: forward,
            total_bytes: total,
            seconds: bottleneck.1 as f64 / (rate * 1e9),
            bottleneck: format!("{} ({})", bottleneck.0, if placement.same_host { "NVLink" } else { "network" }),
        }
    };
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0);
    Ok(ClusterModel {
        placement: placement.clone(),
        model_bytes,
        engines,
        fan_out: load(max(&egress), forward, hops),
        per_replica: load(max(&egress_per_replica), 0, hops),
        // Rank 0 sends every engine rank its bytes, from the gathered tensors.
        gather_then_push: load(hops, 0, hops),
        communicators_per_trainer_rank: communicators,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::plan::{destination_manifest, plan, Placement as PiecePlacement, SourceSet};
    use crate::{synthetic, Manifest, PresetOptions, TensorSpec, TpRank};

    /// The plans of every TP rank of `model` at `tp`, over whole source tensors.
    fn rank_plans(model: &str, tp: u32, expert_parallel: bool) -> Vec<Plan> {
        let config = synthetic(model).unwrap();
        let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel }).unwrap();
        let source = SourceSet::single(config.source_manifest());
        TpRank::all(tp)
            .map(|rank| {
                let dest = destination_manifest(&source, &rules, rank, None, false).unwrap();
                plan(&source, &dest, &rules, rank).unwrap()
            })
            .collect()
    }

    /// What the model says each trainer rank holds of an engine rank's bytes is what the
    /// planner, given every rank's FSDP2 pieces, has each rank send (its share of the plan).
    fn check_against_the_sharded_planner(model: &str, tp: u32, world: u32) {
        let config = synthetic(model).unwrap();
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        let whole = config.source_manifest();
        let (mut senders, mut placements) = (Vec::new(), Vec::new());
        for w in 0..world {
            let (mut specs, mut placed) = (Vec::new(), Vec::new());
            for spec in whole.iter() {
                let mut shape = spec.shape.clone();
                let mut offset = vec![0; shape.len()];
                if let Some(rows) = shape.first_mut() {
                    let (start, end) = fsdp_rows(*rows, w, world);
                    (*rows, offset[0]) = (end - start, start);
                }
                specs.push(TensorSpec { shape, ..spec.clone() });
                placed.push(Some(PiecePlacement { offset, whole: spec.shape.clone() }));
            }
            senders.push(Manifest::new(specs).unwrap());
            placements.push(placed);
        }
        let sharded = SourceSet::placed(senders, placements).unwrap();
        let single = SourceSet::single(whole);
        for rank in TpRank::all(tp) {
            let dest = destination_manifest(&single, &rules, rank, None, false).unwrap();
            let modelled = bytes_per_trainer_rank(&plan(&single, &dest, &rules, rank).unwrap(), world);
            let planned = plan(&sharded, &dest, &rules, rank).unwrap();
            let shares: Vec<u64> = (0..world).map(|w| planned.share_of(w).share_bytes().iter().sum()).collect();
            assert_eq!(modelled, shares, "{model} {rank} over {world} trainer ranks");
        }
    }

    #[test]
    fn trainer_ranks_hold_what_the_sharded_planner_has_them_send() {
        check_against_the_sharded_planner("qwen3-tiny", 2, 3);
        check_against_the_sharded_planner("qwen3-moe-tiny", 2, 4);
        check_against_the_sharded_planner("qwen3-moe-tiny", 1, 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn the_model_matches_the_sharded_planner_for_any_sharding(
            model in prop::sample::select(vec!["qwen3-tiny", "qwen3-moe-tiny", "qwen2-tiny"]),
            tp in prop::sample::select(vec![1u32, 2, 4]),
            world in 1u32..=9,
        ) {
            check_against_the_sharded_planner(model, tp, world);
        }
    }

    fn placement(ranks: u32, engines: &[(u32, u32)], same_host: bool) -> Placement {
        Placement {
            trainer: TrainerPlacement { ranks },
            engines: engines
                .iter()
                .map(|&(replicas, tp)| EnginePlacement { replicas, tp, expert_parallel: false })
                .collect(),
            same_host,
            links: Links { nvlink_gbps: 400.0, network_gbps: 50.0 },
        }
    }

    /// Fan-out sends a trainer rank's bytes once per class whatever the replicas; one send
    /// per replica multiplies them; the engine's ingress is its rank's shard either way, and
    /// the time is the busiest link's bytes at its rate.
    #[test]
    fn fan_out_keeps_trainer_egress_flat_in_the_replicas() {
        let plans = rank_plans("qwen3-moe-tiny", 2, false);
        let shard: Vec<u64> = plans.iter().map(|p| p.share_bytes().iter().sum()).collect();
        let one = model(&placement(4, &[(1, 2)], false), std::slice::from_ref(&plans)).unwrap();
        let three = model(&placement(4, &[(3, 2)], false), std::slice::from_ref(&plans)).unwrap();
        assert_eq!(three.fan_out.trainer_egress_bytes, one.fan_out.trainer_egress_bytes);
        assert_eq!(three.per_replica.trainer_egress_bytes, 3 * one.per_replica.trainer_egress_bytes);
        assert_eq!(one.fan_out.engine_ingress_bytes, *shard.iter().max().unwrap());
        assert_eq!(
            (one.fan_out.engine_forward_bytes, three.fan_out.engine_forward_bytes),
            (0, one.fan_out.engine_ingress_bytes)
        );
        assert_eq!(three.fan_out.total_bytes, 3 * shard.iter().sum::<u64>());
        assert_eq!(three.engines[0].rank_bytes, shard);
        assert_eq!(three.communicators_per_trainer_rank, 2);
        // 4 trainer ranks share the bytes: the engine's ingress is the bottleneck.
        assert!(three.fan_out.bottleneck.starts_with("engine GPU ingress"), "{}", three.fan_out.bottleneck);
        let expected = three.fan_out.engine_ingress_bytes as f64 / 50e9;
        assert!((three.fan_out.seconds - expected).abs() < 1e-15, "{}", three.fan_out.seconds);
        // Gather then push: one rank sends everything to every engine rank.
        assert_eq!(three.gather_then_push.trainer_egress_bytes, three.fan_out.total_bytes);
        let same_host = model(&placement(1, &[(3, 2)], true), &[plans]).unwrap();
        assert!(same_host.fan_out.bottleneck.contains("NVLink"), "{}", same_host.fan_out.bottleneck);
    }

    #[test]
    fn a_placement_that_does_not_fit_its_plans_says_why() {
        let plans = rank_plans("qwen3-tiny", 2, false);
        let err = model(&placement(0, &[(1, 2)], false), std::slice::from_ref(&plans)).unwrap_err().to_string();
        assert!(err.contains("at least one rank"), "{err}");
        let err = model(&placement(2, &[(1, 4)], false), std::slice::from_ref(&plans)).unwrap_err().to_string();
        assert!(err.contains("TP 4 with 2 rank plan(s)"), "{err}");
        let err = model(&placement(2, &[(1, 2), (1, 2)], false), std::slice::from_ref(&plans)).unwrap_err().to_string();
        assert!(err.contains("2 engine(s) placed, 1 planned"), "{err}");
        let mut zero = placement(2, &[(1, 2)], false);
        zero.links.network_gbps = 0.0;
        let err = model(&zero, &[plans]).unwrap_err().to_string();
        assert!(err.contains("must be positive"), "{err}");
    }
}
