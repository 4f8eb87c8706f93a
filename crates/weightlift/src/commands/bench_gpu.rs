//! `weightlift bench --device cuda[:N]`: the GPU data plane in one process on one GPU, against
//! ceilings measured in the same run (copy engine D2D copy, HBM read).

use std::time::Instant;

use serde::Serialize;
use weightlift::core::{plan, TpRank};
use weightlift::gpu::{GpuPlan, GpuTensors};
use weightlift::report::today;
use weightlift_cuda::{CudaError, Gpu};

use super::{gb, CommandError, ModelArgs};

const CEILING_BYTES: usize = 4 << 30;
const RUNS: usize = 5;

#[derive(Serialize)]
struct GpuRow {
    model: String,
    tensors: usize,
    copies: usize,
    bytes: u64,
    copy_ms: f64,
    copy_gbps: f64,
    digest_ms: f64,
    digest_gbps: f64,
    /// Copy, then digest: two passes.
    unfused_update_ms: f64,
    /// Fused copy+digest where the bytes allow it.
    fused_bytes: u64,
    update_ms: f64,
    update_gbps: f64,
    update_ratio_to_d2d: f64,
    digest_ratio_to_read: f64,
    verified_against_cpu: bool,
}

#[derive(Serialize)]
struct GpuBench {
    benchmark: &'static str,
    device: String,
    date: String,
    d2d_copy_gbps: f64,
    hbm_read_gbps: f64,
    rows: Vec<GpuRow>,
    skipped: Vec<String>,
}

fn cuda(e: CudaError) -> CommandError {
    CommandError::Io(e.to_string())
}

/// Median and best (in seconds) of `RUNS` timed runs of `f`, after one warm-up.
fn time(mut f: impl FnMut() -> Result<(), CudaError>) -> Result<(f64, f64), CommandError> {
    f().map_err(cuda)?;
    let mut t: Vec<f64> = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let start = Instant::now();
        f().map_err(cuda)?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok((t[RUNS / 2], t[0]))
}

pub fn run(ordinal: usize, models: &[String], model_args: &ModelArgs, json: bool) -> Result<(), CommandError> {
    let gpu = Gpu::open(ordinal).map_err(cuda)?;
    let device = gpu.name().map_err(cuda)?;

    let (d2d, read) = {
        let src = gpu.alloc(CEILING_BYTES).map_err(cuda)?;
        let mut dst = gpu.alloc(CEILING_BYTES).map_err(cuda)?;
        let (_, copy_best) = time(|| {
            gpu.copy(&mut dst, &src, CEILING_BYTES)?;
            gpu.synchronize()
        })?;
        let (_, read_best) = time(|| gpu.read_all(&src))?;
        (CEILING_BYTES as f64 / copy_best / 1e9, CEILING_BYTES as f64 / read_best / 1e9)
    };

    let mut rows = Vec::new();
    let mut skipped = Vec::new();
    for name in models {
        let args = ModelArgs { synthetic: Some(name.clone()), model: None, ..model_args.clone() };
        let model = args.source(None)?;
        let inputs = args.mapping().inputs(&model, TpRank::SINGLE)?;
        let bytes = inputs.destination.total_bytes();
        let source_bytes = inputs.source.senders()[0].total_bytes();
        let (free, _) = gpu.memory_info().map_err(cuda)?;
        if (source_bytes + bytes) as usize + (2 << 30) > free {
            skipped.push(format!("{name}: needs {} on one GPU, {} free", gb(source_bytes + bytes), gb(free as u64)));
            continue;
        }
        let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
            .map_err(|e| CommandError::Io(e.to_string()))?;
        let mut src = GpuTensors::alloc(&gpu, &inputs.source.senders()[0]).map_err(cuda)?;
        let mut dst = GpuTensors::alloc(&gpu, &inputs.destination).map_err(cuda)?;
        src.fill(&gpu, 0x3c).map_err(cuda)?;
        dst.fill(&gpu, 0).map_err(cuda)?;
        let bound = GpuPlan::new(&gpu, &plan, &src, &dst).map_err(cuda)?;
        let (copy, _) = time(|| {
            bound.copy(&gpu)?;
            gpu.synchronize()
        })?;
        let (digest, _) = time(|| bound.digests(&gpu).map(|_| ()))?;
        let (unfused, _) = time(|| {
            bound.copy(&gpu)?;
            bound.digests(&gpu).map(|_| ())
        })?;
        let (update, _) = time(|| bound.update(&gpu).map(|_| ()))?;
        // Every destination now holds 0x3c bytes: check the update's digests against the CPU's.
        dst.fill(&gpu, 0).map_err(cuda)?;
        let digests = bound.update(&gpu).map_err(cuda)?;
        let verified = inputs
            .destination
            .iter()
            .zip(&digests)
            .all(|(spec, &d)| d == weightlift::core::digest::digest(&vec![0x3c; spec.byte_len() as usize]));
        let b = bytes as f64;
        rows.push(GpuRow {
            model: name.clone(),
            tensors: inputs.destination.len(),
            copies: bound.copy_count,
            bytes,
            copy_ms: copy * 1e3,
            copy_gbps: b / copy / 1e9,
            digest_ms: digest * 1e3,
            digest_gbps: b / digest / 1e9,
            unfused_update_ms: unfused * 1e3,
            fused_bytes: bound.fused_bytes,
            update_ms: update * 1e3,
            update_gbps: b / update / 1e9,
            update_ratio_to_d2d: b / update / 1e9 / d2d,
            digest_ratio_to_read: b / digest / 1e9 / read,
            verified_against_cpu: verified,
        });
    }
    let out = GpuBench {
        benchmark: "gpu-same-process",
        device,
        date: today(),
        d2d_copy_gbps: d2d,
        hbm_read_gbps: read,
        rows,
        skipped,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!("{} ({}): D2D copy {:.0} GB/s, HBM read {:.0} GB/s", out.device, out.date, d2d, read);
    println!(
        "{:<15} {:>7} {:>8} {:>10} {:>9} {:>10} {:>11} {:>10} {:>9} {:>8} {:>9}",
        "model",
        "tensors",
        "copies",
        "bytes",
        "copy ms",
        "digest ms",
        "2-pass ms",
        "update ms",
        "GB/s",
        "x D2D",
        "verified"
    );
    for r in &out.rows {
        println!(
            "{:<15} {:>7} {:>8} {:>10} {:>9.2} {:>10.2} {:>11.2} {:>10.2} {:>9.0} {:>8.2} {:>9}",
            r.model,
            r.tensors,
            r.copies,
            gb(r.bytes),
            r.copy_ms,
            r.digest_ms,
            r.unfused_update_ms,
            r.update_ms,
            r.update_gbps,
            r.update_ratio_to_d2d,
            r.verified_against_cpu
        );
    }
    for s in &out.skipped {
        println!("skipped {s}");
    }
    Ok(())
}
