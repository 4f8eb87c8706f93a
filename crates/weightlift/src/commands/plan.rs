//! `weightlift plan`: build one rank's plan and report it; with `--placement`, every rank of
//! every engine of a cluster placement, and the model of one update over its links
//! (`weightlift_core::cluster`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use weightlift::core::cluster::{self, ClusterModel, LinkLoad, Placement};
use weightlift::core::quant::Quant;
use weightlift::core::{buckets, plan, DType, PlanSummary, TpRank};
use weightlift::{MappingOptions, SetupError};

use super::{gb, tp_rank, CommandError, ModelArgs};

#[derive(Args, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The engine rank's parameters as a JSON manifest (default: what the rules derive).
    #[arg(long, value_name = "FILE")]
    pub engine: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub tp_size: u32,
    #[arg(long, default_value_t = 0)]
    pub tp_rank: u32,
    #[arg(long, default_value_t = 256)]
    pub bucket_mib: u64,
    /// Write the plan itself as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub save: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// A cluster placement as JSON (trainer ranks, engine replicas and TP sizes, link rates;
    /// see docs/design.md): plans every rank of every engine and prints the bytes each link
    /// carries and the predicted time of one update.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["engine", "save", "tp_rank"])]
    pub placement: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report<'a> {
    model: String,
    rules: &'a str,
    #[serde(flatten)]
    summary: &'a PlanSummary,
    bucket_bytes: u64,
    buckets: usize,
    planning_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    quant: Option<QuantReport>,
}

/// An FP8 engine (`--quant`, or an `--engine` manifest with scales): the quantized weights
/// and their scales, every scale covered once (the plan verified).
#[derive(Serialize)]
struct QuantReport {
    scheme: String,
    dtype: DType,
    weights: usize,
    scale_tensors: usize,
    scale_bytes: u64,
    /// The engine's parameters (quantized weights and scales included) and their bytes.
    engine_tensors: usize,
    engine_bytes: u64,
    scales_covered: bool,
    scales: Vec<ScaleReport>,
}

#[derive(Serialize)]
struct ScaleReport {
    name: String,
    weight: String,
    shape: Vec<u64>,
    block: [u64; 2],
}

pub fn run(args: &PlanArgs) -> Result<(), CommandError> {
    if let Some(path) = &args.placement {
        return run_cluster(args, path);
    }
    let model = args.model.source(None)?;
    let tp = tp_rank(args.tp_rank, args.tp_size)?;
    let options = MappingOptions { engine_manifest: args.engine.clone(), ..args.model.mapping() };

    let started = Instant::now();
    let inputs = options.inputs(&model, tp)?;
    let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).map_err(SetupError::from)?;
    let bucket_bytes = args.bucket_mib.saturating_mul(1 << 20);
    let bucket_count = buckets(&plan, bucket_bytes).map_err(|e| SetupError::Invalid(e.to_string()))?.len();
    let quant = quant_report(&plan);
    let planning_ms = started.elapsed().as_secs_f64() * 1e3;

    if let Some(path) = &args.save {
        let json = serde_json::to_vec(&plan).expect("a plan always serialises");
        std::fs::write(path, json).map_err(|e| CommandError::Io(format!("cannot write {}: {e}", path.display())))?;
    }
    let summary = plan.summary();
    let report = Report {
        model: model.name(),
        rules: &inputs.rules_name,
        summary: &summary,
        bucket_bytes,
        buckets: bucket_count,
        planning_ms,
        quant,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a report always serialises"));
    } else {
        print_summary(&report);
    }
    Ok(())
}

fn quant_report(plan: &weightlift::core::Plan) -> Option<QuantReport> {
    let first = plan.scaled.first()?;
    let name = |d: u32| plan.destinations[d as usize].name.clone();
    let scheme = match first.block {
        [1, cols] if cols == plan.destinations[first.weight as usize].shape.last().copied().unwrap_or(0) => {
            Quant::Channel
        }
        [rows, cols] => Quant::Block { rows, cols },
    };
    let scales: Vec<ScaleReport> = plan
        .scaled
        .iter()
        .map(|s| ScaleReport {
            name: name(s.scale),
            weight: name(s.weight),
            shape: plan.destinations[s.scale as usize].shape.clone(),
            block: s.block,
        })
        .collect();
    Some(QuantReport {
        scheme: scheme.to_string(),
        dtype: DType::F8E4M3,
        weights: plan.scaled.len(),
        scale_tensors: plan.scaled.len(),
        scale_bytes: plan.scaled.iter().map(|s| plan.destinations[s.scale as usize].byte_len()).sum(),
        engine_tensors: plan.destinations.len(),
        engine_bytes: plan.destinations.iter().map(|d| d.byte_len()).sum(),
        scales_covered: plan.verify().is_ok(),
        scales,
    })
}

fn print_summary(r: &Report) {
    let s = r.summary;
    println!("plan for {} ({}), tp rank {}/{}", r.model, r.rules, s.tp_rank, s.tp_size);
    println!("  source       {:>8} tensors  {:>10}", s.source_tensors, gb(s.source_bytes));
    println!("  destination  {:>8} params   {:>10}", s.destination_tensors, gb(s.destination_bytes));
    println!("  to send      {:>10} in {} bucket(s) of {} MiB", gb(s.bytes_to_send), r.buckets, r.bucket_bytes >> 20);
    println!(
        "  ops          {:>8} ({} strided, {} with a cast), {} source tensor(s) ignored",
        s.ops, s.strided_ops, s.cast_ops, s.ignored
    );
    println!("  coverage     every destination byte written exactly once");
    if let Some(q) = &r.quant {
        println!(
            "  quantized    {} weight(s) to {} ({}), {} scale tensor(s) of {}, each scale covered once",
            q.weights,
            q.dtype,
            q.scheme,
            q.scale_tensors,
            gb(q.scale_bytes)
        );
        println!("  engine       {:>8} params   {:>10}", q.engine_tensors, gb(q.engine_bytes));
    }
    println!("  plan hash    {}", s.plan_hash);
    println!("  planned in   {:.1} ms", r.planning_ms);
}

/// `--placement`: plans every TP rank of every engine, then models the update.
fn run_cluster(args: &PlanArgs, path: &std::path::Path) -> Result<(), CommandError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| CommandError::Io(format!("cannot read {}: {e}", path.display())))?;
    let placement: Placement =
        serde_json::from_str(&text).map_err(|e| SetupError::Invalid(format!("{}: {e}", path.display())))?;
    let model = args.model.source(None)?;
    let started = Instant::now();
    let mut engine_plans = Vec::new();
    for engine in &placement.engines {
        let options = MappingOptions { expert_parallel: engine.expert_parallel, ..args.model.mapping() };
        let plans = TpRank::all(engine.tp)
            .map(|tp| {
                let inputs = options.inputs(&model, tp)?;
                Ok(plan(&inputs.source, &inputs.destination, &inputs.rules, tp).map_err(SetupError::from)?)
            })
            .collect::<Result<Vec<_>, CommandError>>()?;
        engine_plans.push(plans);
    }
    let modelled = cluster::model(&placement, &engine_plans).map_err(|e| SetupError::Invalid(e.to_string()))?;
    let planning_ms = started.elapsed().as_secs_f64() * 1e3;
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            model: String,
            #[serde(flatten)]
            cluster: &'a ClusterModel,
            planning_ms: f64,
        }
        let out = Out { model: model.name(), cluster: &modelled, planning_ms };
        println!("{}", serde_json::to_string_pretty(&out).expect("a model always serialises"));
    } else {
        print_cluster(&model.name(), &modelled, planning_ms);
    }
    Ok(())
}

fn print_cluster(model: &str, m: &ClusterModel, planning_ms: f64) {
    let p = &m.placement;
    let (link, rate) = match p.same_host {
        true => ("NVLink", p.links.nvlink_gbps),
        false => ("network", p.links.network_gbps),
    };
    let trainer = match p.trainer.ranks {
        1 => "one trainer rank holding whole tensors".to_string(),
        n => format!("{n} trainer ranks holding FSDP2 shards"),
    };
    println!("one update of {model} ({}): {trainer}, {link} at {rate} GB/s per GPU", gb(m.model_bytes));
    for (i, e) in m.engines.iter().enumerate() {
        let (least, most) = (e.rank_bytes.iter().min().copied(), e.rank_bytes.iter().max().copied());
        println!(
            "  engine {i}: {} replica(s) at TP {}{}: {} a replica, {}-{} a rank; {} class(es) of {} receiver(s)",
            e.replicas,
            e.tp,
            if e.expert_parallel { " (experts split)" } else { "" },
            gb(e.replica_bytes),
            gb(least.unwrap_or(0)),
            gb(most.unwrap_or(0)),
            e.classes,
            e.receivers_per_class
        );
    }
    println!(
        "  {:<24} {:>14} {:>14} {:>14} {:>12} {:>9}  bottleneck",
        "", "trainer egress", "engine ingress", "forwarding", "all links", "seconds"
    );
    let row = |name: &str, l: &LinkLoad| {
        println!(
            "  {name:<24} {:>14} {:>14} {:>14} {:>12} {:>9.3}  {}",
            gb(l.trainer_egress_bytes),
            gb(l.engine_ingress_bytes),
            gb(l.engine_forward_bytes),
            gb(l.total_bytes),
            l.seconds,
            l.bottleneck
        )
    };
    row("weightlift (fan-out)", &m.fan_out);
    row("one send per replica", &m.per_replica);
    row("gather, rank 0 pushes", &m.gather_then_push);
    println!("  NCCL communicators per trainer rank (one per class): {}", m.communicators_per_trainer_rank);
    println!("  planned in {planning_ms:.0} ms");
}
