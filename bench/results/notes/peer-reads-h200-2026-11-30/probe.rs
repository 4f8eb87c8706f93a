// Scratch probe (not committed): cross-GPU pull vs push, contiguous vs plan, kernel variants.
use std::io::Write;
use std::time::Instant;

use weightlift::core::{plan, TpRank};
use weightlift::gpu::{GpuPlan, GpuTensors};
use weightlift_cuda::{CopyDesc, FusedKernel, FusedRun, Gpu, SourceGpu, Wave};

use super::{fill_distinct, synthetic_inputs};
use crate::commands::{CommandError, ModelArgs};

fn reps() -> usize {
    std::env::var("WL_PROBE_REPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

struct Clock(Instant);

impl Clock {
    fn row(&self, label: &str, bytes: f64, n: usize, mut f: impl FnMut() -> Result<(), CommandError>) -> Result<(), CommandError> {
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
            "P t={:7.1}s {label:<40} med {med:8.2} ms min {:8.2} max {:8.2} GB/s(med) {:7.1} | {}",
            self.0.elapsed().as_secs_f64(),
            sorted[0],
            sorted[n - 1],
            bytes / med / 1e6,
            list.join(" ")
        );
        std::io::stdout().flush().ok();
        Ok(())
    }
}

fn set_bps(v: Option<u32>) {
    // SAFETY-free scratch: single-threaded probe.
    match v {
        Some(v) => unsafe { std::env::set_var("WL_FUSED_BPS", v.to_string()) },
        None => unsafe { std::env::remove_var("WL_FUSED_BPS") },
    }
}

pub fn run(models: &[String], model_args: &ModelArgs) -> Result<(), CommandError> {
    let clock = Clock(Instant::now());
    let (g0, g1) = (Gpu::open(0)?, Gpu::open(1)?);
    g0.enable_peer_access(&g1)?;
    g1.enable_peer_access(&g0)?;
    let n = reps();
    if std::env::var("WL_PROBE_CONTIG").map(|v| v != "0").unwrap_or(true) {
        let big: usize = 8 << 30;
        let bytes: usize = 2 << 30;
        let src0 = g0.alloc(big)?;
        let dst1 = g1.alloc(big)?;
        g0.fill_region(src0.device_ptr(), big as u64, 7)?;
        g0.synchronize()?;
        let desc = CopyDesc {
            src: src0.device_ptr(),
            dst: dst1.device_ptr(),
            rows: 1,
            row_bytes: bytes as u64,
            src_stride: bytes as u64,
            dst_stride: bytes as u64,
        };
        let pull = g1.prepare_copies(&[desc])?;
        clock.row("copy kernel pull 2GiB", bytes as f64, n, || {
            g1.run_copies(&pull)?;
            Ok(g1.synchronize()?)
        })?;
        let piece: u64 = 32 << 20;
        let pieces = bytes as u64 / piece;
        let runs = |order: &dyn Fn(u64) -> u64, dst: bool| -> Vec<FusedRun> {
            (0..pieces)
                .map(|i| FusedRun {
                    src: src0.device_ptr() + order(i) * piece,
                    dst: if dst { dst1.device_ptr() + i * piece } else { 0 },
                    bytes: piece,
                    out: i * piece / 4096,
                })
                .collect()
        };
        let one = |len: u64, dst: bool| Wave {
            fused: vec![FusedRun { src: src0.device_ptr(), dst: if dst { dst1.device_ptr() } else { 0 }, bytes: len, out: 0 }],
            tensor_bytes: vec![len],
            ..Wave::default()
        };
        let many = |order: &dyn Fn(u64) -> u64| Wave {
            fused: runs(order, true),
            tensor_bytes: vec![bytes as u64],
            ..Wave::default()
        };
        let variants: Vec<(&str, Wave, f64)> = vec![
            ("1 run 2GiB const data", one(bytes as u64, true), bytes as f64),
            ("1 run 2GiB digest only", one(bytes as u64, false), bytes as f64),
            ("64 runs 32MiB in order", many(&|i| i), bytes as f64),
            ("64 runs 32MiB src reversed", many(&|i| pieces - 1 - i), bytes as f64),
            ("64 runs 32MiB src stride 7", many(&|i| (i * 7) % pieces), bytes as f64),
            ("1 run 8GiB const data", one(big as u64, true), big as f64),
        ];
        for (label, wave, b) in &variants {
            let mut batch = g1.prepare_update(std::slice::from_ref(wave), SourceGpu::Peer)?;
            for bps in [2u32, 3] {
                set_bps(Some(bps));
                clock.row(&format!("pull plain bps={bps} {label}"), *b, n, || {
                    g1.run_update(&batch)?;
                    Ok(())
                })?;
            }
            set_bps(None);
            batch.set_fused_kernel(&g1, FusedKernel::Staged)?;
            clock.row(&format!("pull staged {label}"), *b, n, || {
                g1.run_update(&batch)?;
                Ok(())
            })?;
        }
        // Random data: 64 MiB of host bytes uploaded over the first 2 GiB.
        let mut state = 0x9E3779B97F4A7C15u64;
        let host: Vec<u8> = (0..(64usize << 20))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for k in 0..(bytes / host.len()) {
            g0.upload_region(src0.device_ptr() + (k * host.len()) as u64, &host)?;
        }
        g0.synchronize()?;
        let batch = g1.prepare_update(&[one(bytes as u64, true)], SourceGpu::Peer)?;
        for bps in [2u32, 3] {
            set_bps(Some(bps));
            clock.row(&format!("pull plain bps={bps} 1 run 2GiB random data"), bytes as f64, n, || {
                g1.run_update(&batch)?;
                Ok(())
            })?;
        }
        set_bps(None);
    }
    for name in models {
        let (_, inputs) = synthetic_inputs(name, model_args)?;
        let source = &inputs.source.senders()[0];
        let p = plan(&inputs.source, &inputs.destination, &inputs.rules, TpRank::SINGLE)
            .map_err(|e| CommandError::Io(e.to_string()))?;
        let src = GpuTensors::alloc(&g0, source)?;
        fill_distinct(&g0, &src)?;
        let mut dst = GpuTensors::alloc(&g1, &inputs.destination)?;
        let b = inputs.destination.total_bytes() as f64;
        println!("P {name}: {} source tensors, {} destination, {:.3} GB", source.len(), inputs.destination.len(), b / 1e9);
        let mut pull = GpuPlan::new(&g1, &p, &src.ptrs(), SourceGpu::Peer, &dst.ptrs())?;
        let reference = pull.update(&g1)?;
        let check = |d: Vec<u64>| {
            assert_eq!(d, reference);
            Ok::<(), CommandError>(())
        };
        clock.row(&format!("{name} pull plain (default) x3n"), b, 3 * n, || check(pull.update(&g1)?))?;
        for bps in [2, 3] {
            set_bps(Some(bps));
            clock.row(&format!("{name} pull plain bps={bps}"), b, n, || check(pull.update(&g1)?))?;
        }
        set_bps(None);
        pull.set_fused_kernel(&g1, FusedKernel::Staged)?;
        clock.row(&format!("{name} pull staged"), b, n, || check(pull.update(&g1)?))?;
        pull.set_fused_kernel(&g1, FusedKernel::PlainLoads)?;
        let copies = pull.copy_batch(&g1)?;
        clock.row(&format!("{name} pull copy kernel only"), b, n, || {
            g1.run_copies(&copies)?;
            Ok(g1.synchronize()?)
        })?;
        dst.fill(&g1, 0)?;
        drop(pull);
        // Then the pull again: does the mode persist after other work?
        let pull = GpuPlan::new(&g1, &p, &src.ptrs(), SourceGpu::Peer, &dst.ptrs())?;
        clock.row(&format!("{name} pull plain again x2n"), b, 2 * n, || check(pull.update(&g1)?))?;
    }
    Ok(())
}
