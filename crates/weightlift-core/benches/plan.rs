//! Planning benchmark: how long each planning phase takes for the real model shapes.
//!
//! `cargo bench -p weightlift-core --bench plan [-- --json PATH]` prints a table (median of
//! several runs per phase) and optionally writes the figures as JSON.

use std::hint::black_box;
use std::time::Instant;

use weightlift_core::{
    buckets, destination_manifest, plan, synthetic, PresetOptions, SourceSet, TpRank, DEFAULT_BUCKET_BYTES,
};

const RUNS: usize = 7;

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

fn main() {
    let json_path = std::env::args().skip_while(|a| a != "--json").nth(1);
    let cases = [
        ("qwen3-8b", 1, false),
        ("qwen3-8b", 8, false),
        ("llama3-8b", 2, false),
        ("qwen3-30b-a3b", 1, false),
        ("qwen3-30b-a3b", 8, false),
        ("qwen3-30b-a3b", 8, true),
    ];
    let mut rows = Vec::new();
    println!(
        "{:<15} {:>3} {:>3} {:>8} {:>7} {:>11} {:>9} {:>10} {:>8} {:>9}",
        "model", "tp", "ep", "tensors", "ops", "derive ms", "plan ms", "bucket ms", "hash ms", "total ms"
    );
    for (name, tp_size, ep) in cases {
        let config = synthetic(name).expect("known model");
        let source = SourceSet::single(config.source_manifest());
        let rules = config
            .preset
            .rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: ep })
            .expect("preset builds");
        let tp = TpRank::new(0, tp_size).expect("valid rank");
        let dest = destination_manifest(&source, &rules, tp, None, false).expect("derives");
        let built = plan(&source, &dest, &rules, tp).expect("plans");

        let derive_ms = median_ms(|| drop(black_box(destination_manifest(&source, &rules, tp, None, false))));
        let plan_ms = median_ms(|| drop(black_box(plan(&source, &dest, &rules, tp))));
        let bucket_ms = median_ms(|| drop(black_box(buckets(&built, DEFAULT_BUCKET_BYTES))));
        let hash_ms = median_ms(|| {
            black_box(built.hash());
        });
        let total = derive_ms + plan_ms + bucket_ms;
        println!(
            "{name:<15} {tp_size:>3} {:>3} {:>8} {:>7} {derive_ms:>11.2} {plan_ms:>9.2} {bucket_ms:>10.2} {hash_ms:>8.2} {total:>9.2}",
            if ep { "yes" } else { "no" },
            source.senders()[0].len(),
            built.ops.len(),
        );
        rows.push(serde_json::json!({
            "model": name, "tp_size": tp_size, "expert_parallel": ep,
            "source_tensors": source.senders()[0].len(), "ops": built.ops.len(),
            "derive_ms": derive_ms, "plan_ms": plan_ms, "bucket_ms": bucket_ms, "hash_ms": hash_ms,
            "total_ms": total,
        }));
    }
    println!("(median of {RUNS} runs; plan includes the coverage proof; total = derive + plan + bucket)");
    if let Some(path) = json_path {
        let doc = serde_json::json!({
            "benchmark": "plan",
            "device": cpu_name(),
            "date": std::env::var("BENCH_DATE").unwrap_or_default(),
            "runs_per_figure": RUNS,
            "results": rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("serialises")).expect("writes results");
        println!("wrote {path}");
    }
}

/// The host CPU's model name (planning runs on the CPU; no GPU is involved).
fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
