//! `weightlift bench`: host update throughput of each transport, as a ratio to the
//! single-thread memcpy rate measured in the same run.

use std::time::Instant;

use clap::Args;
use serde::Serialize;
use weightlift::core::{TpRank, Version};
use weightlift::{
    cpu_name, default_threads, today, HostTensors, ModelSource, Receiver, ReceiverOptions, SenderOptions, Trainer,
    TransportKind, SOCKET_BUFFERS,
};

use super::{gb, spawn_receiver, CommandError, ModelArgs};

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Updates timed per transport (after one warm-up update).
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    #[arg(long, default_value_t = 64)]
    pub bucket_mib: u64,
    /// Ring slots of the shared-memory transport.
    #[arg(long, default_value_t = 2)]
    pub ring_slots: u32,
    /// Threads per side (default: half the cores, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
    /// `host` (transports between processes), or `cuda` / `cuda:N` (the GPU data plane).
    #[arg(long, default_value = "host")]
    pub device: String,
    /// Models for the GPU benchmark.
    #[arg(long, value_delimiter = ',', default_value = "qwen3-8b,qwen3-30b-a3b")]
    pub gpu_models: Vec<String>,
    /// GPU benchmark: only the rows measured in this process (the kernels), no engine process
    /// (the same as `--gpu-rows same-process`).
    #[arg(long)]
    pub same_process: bool,
    /// GPU benchmark: which groups of rows to measure (the ceilings always are).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "same-process,ipc,staged,disk")]
    pub gpu_rows: Vec<super::bench_gpu::GpuRows>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    transport: TransportKind,
    median_seconds: f64,
    median_gbps: f64,
    best_gbps: f64,
    ratio_to_memcpy: f64,
    receiver_peak_rss: Option<u64>,
    /// What the receiver's memory should stay within: its tensors plus the transfer buffers.
    destination_bytes: u64,
    transfer_buffer_bytes: u64,
}

#[derive(Serialize)]
struct BenchOutput {
    benchmark: &'static str,
    device: String,
    date: String,
    model: String,
    bytes_per_update: u64,
    threads_per_side: usize,
    cores: usize,
    memcpy_gbps: f64,
    rows: Vec<Row>,
}

/// Single-thread memcpy between two resident buffers of `bytes`: best of five.
fn memcpy_gbps(bytes: usize) -> f64 {
    let src = vec![1u8; bytes];
    let mut dst = vec![2u8; bytes];
    (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

pub fn run(args: &BenchArgs) -> Result<(), CommandError> {
    if let Some(rest) = args.device.strip_prefix("cuda") {
        let ordinal = rest.strip_prefix(':').map_or(Ok(0), str::parse).map_err(|_| {
            CommandError::Setup(weightlift::SetupError::Invalid(format!("bad device `{}`", args.device)))
        })?;
        let rows = if args.same_process { vec![super::bench_gpu::GpuRows::SameProcess] } else { args.gpu_rows.clone() };
        return super::bench_gpu::run(ordinal, &args.gpu_models, &args.model, &rows, args.json);
    }
    let model = args.model.source(Some(super::demo::DEFAULT_MODEL))?;
    let ModelSource::Synthetic(config) = &model else {
        return Err(CommandError::Io("the host benchmark steps a synthetic model: use --synthetic".into()));
    };
    let mut model_args = args.model.clone();
    model_args.synthetic = Some(config.name.clone());
    let inputs = args.model.mapping().inputs(&model, TpRank::SINGLE)?;
    let destination_bytes = inputs.destination.total_bytes();
    let memcpy = memcpy_gbps(destination_bytes.min(1 << 30) as usize);
    let mut tensors = HostTensors::synthetic(config, 11);
    let threads = args.threads.unwrap_or_else(default_threads);
    let exe = std::env::current_exe().map_err(|e| CommandError::Io(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("weightlift-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Io(e.to_string()))?;

    let mut rows = Vec::new();
    for transport in [TransportKind::InProcess, TransportKind::Shm, TransportKind::Tcp] {
        let options =
            SenderOptions { transport, bucket_bytes: args.bucket_mib << 20, threads, ..SenderOptions::default() };
        let mut child = None;
        let trainer = match transport {
            TransportKind::InProcess => {
                let receiver_options =
                    ReceiverOptions { ring_slots: args.ring_slots, threads, ..ReceiverOptions::default() };
                let receiver = Receiver::new(HostTensors::filled(inputs.destination.clone(), 0), receiver_options);
                receiver
                    .connect_in_process(tensors.manifest(), &inputs.rules, options)
                    .map(|s| Trainer::from_senders(vec![s]))
            }
            TransportKind::Shm | TransportKind::Tcp | TransportKind::CudaIpc | TransportKind::Nccl => {
                let listen = match transport {
                    TransportKind::Shm => format!("unix:{}", dir.join("bench.sock").display()),
                    _ => "tcp://127.0.0.1:0".into(),
                };
                // The receiver runs in its own process, so its peak memory is its own.
                let extra =
                    ["--ring-slots".to_string(), args.ring_slots.to_string(), "--threads".into(), threads.to_string()];
                let (process, endpoint) = spawn_receiver(&exe, &model_args, &listen, &extra)?;
                child = Some(process);
                Trainer::connect(&[endpoint], tensors.manifest(), &inputs.rules, &options)
            }
        };
        let result = trainer.map_err(CommandError::from).and_then(|mut trainer| {
            let mut seconds = Vec::new();
            let mut last = None;
            for step in 0..=args.steps {
                tensors.perturb();
                let report = trainer.push(Version(step + 1), &tensors)?;
                if !report.verified {
                    return Err(CommandError::Unverified(format!("{transport} update {} did not verify", step + 1)));
                }
                if step > 0 {
                    seconds.push(report.seconds);
                }
                last = Some(report);
            }
            seconds.sort_by(f64::total_cmp);
            let bytes = last.as_ref().map_or(0, |r| r.bytes) as f64;
            let median = seconds[seconds.len() / 2];
            let buffers = match transport {
                TransportKind::Tcp => SOCKET_BUFFERS as u64 * (args.bucket_mib << 20),
                _ => u64::from(args.ring_slots) * (args.bucket_mib << 20),
            };
            Ok(Row {
                transport,
                median_seconds: median,
                median_gbps: bytes / median / 1e9,
                best_gbps: bytes / seconds[0] / 1e9,
                ratio_to_memcpy: bytes / median / 1e9 / memcpy,
                // In process, the receiver's memory is not its own to measure.
                receiver_peak_rss: (transport != TransportKind::InProcess)
                    .then(|| last.and_then(|r| r.ranks[0].receiver_peak_rss))
                    .flatten(),
                destination_bytes,
                transfer_buffer_bytes: buffers,
            })
        });
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
        rows.push(result?);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let out = BenchOutput {
        benchmark: "host-update",
        device: cpu_name(),
        date: today(),
        model: config.name.clone(),
        bytes_per_update: destination_bytes,
        threads_per_side: threads,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memcpy_gbps: memcpy,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        return Ok(());
    }
    println!(
        "{} on {} ({} cores, {} thread(s) per side), {} per update; single-thread memcpy {:.2} GB/s",
        out.model,
        out.device,
        out.cores,
        threads,
        gb(out.bytes_per_update),
        memcpy
    );
    println!(
        "{:<9} {:>10} {:>9} {:>9} {:>10} {:>16} {:>20}",
        "transport", "median s", "GB/s", "best", "x memcpy", "receiver peak", "tensors + buffers"
    );
    for r in &out.rows {
        println!(
            "{:<9} {:>10.4} {:>9.2} {:>9.2} {:>10.2} {:>16} {:>20}",
            r.transport.to_string(),
            r.median_seconds,
            r.median_gbps,
            r.best_gbps,
            r.ratio_to_memcpy,
            r.receiver_peak_rss.map_or_else(|| "?".into(), gb),
            gb(r.destination_bytes + r.transfer_buffer_bytes)
        );
    }
    Ok(())
}
