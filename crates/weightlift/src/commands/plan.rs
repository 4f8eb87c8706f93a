//! `weightlift plan`: build one rank's plan and report it.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use weightlift::core::{buckets, plan, PlanSummary};
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
}

pub fn run(args: &PlanArgs) -> Result<(), CommandError> {
    let model = args.model.source(None)?;
    let tp = tp_rank(args.tp_rank, args.tp_size)?;
    let options = MappingOptions { engine_manifest: args.engine.clone(), ..args.model.mapping() };

    let started = Instant::now();
    let inputs = options.inputs(&model, tp)?;
    let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).map_err(SetupError::from)?;
    let bucket_bytes = args.bucket_mib.saturating_mul(1 << 20);
    let bucket_count = buckets(&plan, bucket_bytes).map_err(|e| SetupError::Invalid(e.to_string()))?.len();
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
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("a report always serialises"));
    } else {
        print_summary(&report);
    }
    Ok(())
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
    println!("  plan hash    {}", s.plan_hash);
    println!("  planned in   {:.1} ms", r.planning_ms);
}
