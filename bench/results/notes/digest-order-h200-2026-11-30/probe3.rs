// Scratch probe 3 (not committed to the crates): the read ceiling and the digest's rate.
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
        let list: Vec<String> = ms.iter().map(|m| format!("{m:.3}")).collect();
        println!(
            "P t={:6.1}s {label:<48} med {med:8.3} ms min {:8.3} GB/s(med) {:7.1} (min) {:7.1} | {}",
            self.0.elapsed().as_secs_f64(),
            sorted[0],
            bytes / med / 1e6,
            bytes / sorted[0] / 1e6,
            list.join(" ")
        );
        std::io::stdout().flush().ok();
        Ok(med)
    }
}

fn set(key: &str, v: Option<String>) {
    match v {
        // SAFETY-free scratch: the probe is single-threaded.
        Some(v) => unsafe { std::env::set_var(key, v) },
        None => unsafe { std::env::remove_var(key) },
    }
}

pub fn run(models: &[String], model_args: &ModelArgs) -> Result<(), CommandError> {
    let clock = Clock(Instant::now());
    let g0 = Gpu::open(0)?;
    let n = reps();
    {
        let bytes: usize = 4 << 30;
        let buf = g0.alloc(bytes)?;
        g0.fill_region(buf.device_ptr(), bytes as u64, 3)?;
        g0.synchronize()?;
        for (kernel, bps) in [("old", 32), ("new", 8), ("new", 16), ("new", 32), ("new", 4), ("old", 8)] {
            set("WL_READ_ALL", Some(kernel.into()));
            set("WL_READ_BPS", Some(bps.to_string()));
            for times in [1usize, 10] {
                clock.row(
                    &format!("read_all {kernel} {bps}/SM x{times}"),
                    (bytes * times) as f64,
                    n.min(6),
                    || Ok(g0.read_all(&buf, times)?),
                )?;
            }
        }
        set("WL_READ_ALL", None);
        set("WL_READ_BPS", None);
        // Equal tensors side by side in 16 GiB.
        let big: u64 = 16 << 30;
        let all = g0.alloc(big as usize)?;
        g0.fill_region(all.device_ptr(), big, 5)?;
        g0.synchronize()?;
        for size_mib in [1024u64, 256, 64, 16, 4] {
            let size = size_mib << 20;
            let regions: Vec<(u64, u64)> = (0..big / size).map(|i| (all.device_ptr() + i * size, size)).collect();
            let batch = g0.prepare_digests(&regions)?;
            clock.row(&format!("digest {} x {size_mib} MiB", regions.len()), big as f64, n, || {
                g0.run_digests(&batch)?;
                Ok(())
            })?;
        }
        // 64 MiB tensors with one wave's worth less (waves of 512K chunks).
        for wave in [1u64 << 19, 1 << 18] {
            set("WL_WAVE_CHUNKS", Some(wave.to_string()));
            let size = 64u64 << 20;
            let regions: Vec<(u64, u64)> = (0..big / size).map(|i| (all.device_ptr() + i * size, size)).collect();
            let batch = g0.prepare_digests(&regions)?;
            clock.row(&format!("digest 256 x 64 MiB, waves of {wave} chunks"), big as f64, n, || {
                g0.run_digests(&batch)?;
                Ok(())
            })?;
        }
        set("WL_WAVE_CHUNKS", None);
    }
    for name in models {
        let (_, inputs) = synthetic_inputs(name, model_args)?;
        let source = &inputs.source.senders()[0];
        let p = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
            .map_err(|e| CommandError::Io(e.to_string()))?;
        let src = GpuTensors::alloc(&g0, source)?;
        fill_distinct(&g0, &src)?;
        let dst = GpuTensors::alloc(&g0, &inputs.destination)?;
        let b = inputs.destination.total_bytes() as f64;
        let bound = GpuPlan::new(&g0, &p, &src.ptrs(), SourceGpu::This, &dst.ptrs())?;
        let reference = bound.update(&g0)?;
        println!("P {name}: {} destination tensors, {:.3} GB", inputs.destination.len(), b / 1e9);
        let regions = dst.regions();
        let variants: Vec<(&str, Option<u64>, Option<u64>)> = vec![
            ("default", None, None),
            ("waves 1M chunks", Some(1 << 20), None),
            ("waves 512K chunks", Some(1 << 19), None),
            ("waves 256K chunks", Some(1 << 18), None),
            ("early fold >= 8K chunks", None, Some(8 << 10)),
            ("no early fold", None, Some(u64::MAX)),
            ("waves 512K, early >= 8K", Some(1 << 19), Some(8 << 10)),
        ];
        for (label, wave, early) in variants {
            set("WL_WAVE_CHUNKS", wave.map(|w| w.to_string()));
            set("WL_EARLY_FOLD", early.map(|w| w.to_string()));
            let batch = g0.prepare_digests(&regions)?;
            clock.row(&format!("{name} digest {label}"), b, n, || {
                assert_eq!(g0.run_digests(&batch)?, reference);
                Ok(())
            })?;
        }
        set("WL_WAVE_CHUNKS", None);
        set("WL_EARLY_FOLD", None);
        // Without the two largest tensors (their folds are the longest).
        let mut by_size: Vec<usize> = (0..regions.len()).collect();
        by_size.sort_by_key(|&i| std::cmp::Reverse(regions[i].1));
        let largest: Vec<usize> = by_size[..2].to_vec();
        let rest: Vec<(u64, u64)> =
            regions.iter().enumerate().filter(|(i, _)| !largest.contains(i)).map(|(_, r)| *r).collect();
        let rest_bytes: u64 = rest.iter().map(|r| r.1).sum();
        let batch = g0.prepare_digests(&rest)?;
        clock.row(&format!("{name} digest without the 2 largest"), rest_bytes as f64, n, || {
            g0.run_digests(&batch)?;
            Ok(())
        })?;
        let only: Vec<(u64, u64)> = largest.iter().map(|&i| regions[i]).collect();
        let only_bytes: u64 = only.iter().map(|r| r.1).sum();
        let batch = g0.prepare_digests(&only)?;
        clock.row(&format!("{name} digest the 2 largest only"), only_bytes as f64, n, || {
            g0.run_digests(&batch)?;
            Ok(())
        })?;
        clock.row(&format!("{name} update (same process)"), b, n, || {
            bound.update(&g0)?;
            Ok(())
        })?;
    }
    Ok(())
}
