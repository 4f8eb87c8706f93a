// Scratch probe 4 (not committed to the crates): order of waves across GPUs, cost of preparing.
use std::io::Write;
use std::time::Instant;

use weightlift::core::{plan, TpRank};
use weightlift::gpu::{GpuPlan, GpuTensors};
use weightlift_cuda::{Gpu, SourceGpu};

use super::{fill_distinct, synthetic_inputs};
use crate::commands::{CommandError, ModelArgs};

fn reps() -> usize {
    std::env::var("WL_PROBE_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

struct Clock(Instant);

impl Clock {
    fn row(&self, label: &str, bytes: f64, n: usize, mut f: impl FnMut() -> Result<(), CommandError>) -> Result<f64, CommandError> {
        f()?;
        let mut ms = Vec::new();
        for _ in 0..n {
            let s = Instant::now();
            f()?;
            ms.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let mut sorted = ms.clone();
        sorted.sort_by(f64::total_cmp);
        let med = sorted[n / 2];
        let list: Vec<String> = ms.iter().map(|m| format!("{m:.2}")).collect();
        println!(
            "P t={:6.1}s {label:<44} med {med:8.3} ms min {:8.3} max {:8.3} GB/s(med) {:7.1} | {}",
            self.0.elapsed().as_secs_f64(),
            sorted[0],
            sorted[n - 1],
            bytes / med / 1e6,
            list.join(" ")
        );
        std::io::stdout().flush().ok();
        Ok(med)
    }
}

fn set(key: &str, v: Option<&str>) {
    match v {
        // Scratch: the probe is single-threaded.
        Some(v) => unsafe { std::env::set_var(key, v) },
        None => unsafe { std::env::remove_var(key) },
    }
}

pub fn run(models: &[String], model_args: &ModelArgs) -> Result<(), CommandError> {
    let clock = Clock(Instant::now());
    let (g0, g1) = (Gpu::open(0)?, Gpu::open(1)?);
    g0.enable_peer_access(&g1)?;
    g1.enable_peer_access(&g0)?;
    let n = reps();
    for name in models {
        let (_, inputs) = synthetic_inputs(name, model_args)?;
        let source = &inputs.source.senders()[0];
        let p = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
            .map_err(|e| CommandError::Io(e.to_string()))?;
        let src = GpuTensors::alloc(&g0, source)?;
        fill_distinct(&g0, &src)?;
        let b = inputs.destination.total_bytes() as f64;
        println!("P {name}: {} destination tensors, {:.3} GB", inputs.destination.len(), b / 1e9);
        {
            let dst = GpuTensors::alloc(&g1, &inputs.destination)?;
            for order in [None, Some("1"), None] {
                set("WL_MODEL_ORDER", order);
                let label = if order.is_some() { "models' order" } else { "largest first" };
                let pull = GpuPlan::new(&g1, &p, &src.ptrs(), SourceGpu::Peer, &dst.ptrs())?;
                clock.row(&format!("{name} pull {label}"), b, 2 * n, || {
                    pull.update(&g1)?;
                    Ok(())
                })?;
            }
        }
        let dst = GpuTensors::alloc(&g0, &inputs.destination)?;
        for order in [None, Some("1")] {
            set("WL_MODEL_ORDER", order);
            let label = if order.is_some() { "models' order" } else { "largest first" };
            let local = GpuPlan::new(&g0, &p, &src.ptrs(), SourceGpu::This, &dst.ptrs())?;
            clock.row(&format!("{name} colocated update {label}"), b, n, || {
                local.update(&g0)?;
                Ok(())
            })?;
        }
        set("WL_MODEL_ORDER", None);
        let regions = dst.regions();
        let batch = g0.prepare_digests(&regions)?;
        clock.row(&format!("{name} digest, prepared once"), b, n, || {
            g0.run_digests(&batch)?;
            Ok(())
        })?;
        clock.row(&format!("{name} digest, prepared each time"), b, n, || {
            g0.run_digests(&g0.prepare_digests(&regions)?)?;
            Ok(())
        })?;
        clock.row(&format!("{name} prepare_digests alone"), b, n, || {
            g0.prepare_digests(&regions)?;
            Ok(())
        })?;
        clock.row(&format!("{name} GpuPlan::new alone (colocated)"), b, n.min(5), || {
            GpuPlan::new(&g0, &p, &src.ptrs(), SourceGpu::This, &dst.ptrs())?;
            Ok(())
        })?;
    }
    Ok(())
}
