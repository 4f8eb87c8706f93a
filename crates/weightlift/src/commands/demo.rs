//! `weightlift demo`: the main job. Starts engine-side receiver processes (one per TP rank)
//! and a trainer-side sender process for a synthetic model (or a checkpoint directory), runs
//! `--steps` updates that each carry new bytes, and reports every step.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use weightlift::{HostTensors, ModelSource, StepReport, TransportKind};

use std::path::Path;

use weightlift::core::ModelConfig;

use super::push::print_table;
use super::{spawn_receiver, CommandError, DeviceArg, ModelArgs, TrainerArgs};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// Where the engine's tensors live (default: the trainer's device); cuda:1 with --device
    /// cuda:0 updates across GPUs over NVLink.
    #[arg(long)]
    pub receiver_device: Option<DeviceArg>,
    /// One receiver process per rank.
    #[arg(long, default_value_t = 1)]
    pub tp_size: u32,
    /// Trainer processes: with more than one, a sharded trainer whose ranks each hold FSDP2
    /// pieces of the model (dim 0 of every tensor) and push them together, every version.
    #[arg(long, default_value_t = 1)]
    pub senders: u32,
    #[arg(long, default_value_t = 64)]
    pub bucket_mib: u64,
    /// Where the trainer's weights come from; --device then says where the engine's live
    /// (`--device cuda --source host|disk|tcp` runs each path into a GPU engine).
    #[arg(long, value_enum)]
    pub source: Option<DemoSource>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A trainer's weights, for `demo --source`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DemoSource {
    /// Host memory on the engine's host, over shared memory (device slots into a GPU engine).
    Host,
    /// A checkpoint the demo saves to disk first, then pushed from its mapped files.
    Disk,
    /// Host memory over TCP (loopback here), the way a trainer on another host sends.
    Tcp,
    /// A GPU trainer on the engine's GPU, over CUDA IPC.
    Gpu,
}

#[derive(Serialize)]
struct DemoStep {
    version: u64,
    bytes: u64,
    seconds: f64,
    gbps: f64,
    verified: bool,
}

#[derive(Serialize)]
struct DemoOutput {
    model: String,
    source: Option<DemoSource>,
    transport: TransportKind,
    tp_size: u32,
    senders: u32,
    steps: Vec<DemoStep>,
}

/// Child processes that are killed when dropped, so a failing demo leaves nothing behind.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub const DEFAULT_MODEL: &str = "qwen3-0.6b";

pub fn run(args: &DemoArgs) -> Result<(), CommandError> {
    let model = args.model.source(Some(DEFAULT_MODEL))?;
    let mut model_args = args.model.clone();
    if model_args.synthetic.is_none() && model_args.model.is_none() {
        model_args.synthetic = Some(DEFAULT_MODEL.into());
    }
    let (trainer_device, receiver_device, transport) = match args.source {
        None => {
            (args.trainer.device, args.receiver_device.unwrap_or(args.trainer.device), args.trainer.transport(true))
        }
        Some(_) if args.receiver_device.is_some() || args.trainer.transport.is_some() => {
            return Err(CommandError::Io(
                "--source picks the path: give the engine's device with --device, not --receiver-device or --transport"
                    .into(),
            ))
        }
        Some(DemoSource::Host | DemoSource::Disk) => (DeviceArg::Host, args.trainer.device, TransportKind::Shm),
        Some(DemoSource::Tcp) => (DeviceArg::Host, args.trainer.device, TransportKind::Tcp),
        Some(DemoSource::Gpu) => match args.trainer.device {
            DeviceArg::Cuda(_) => (args.trainer.device, args.trainer.device, TransportKind::CudaIpc),
            DeviceArg::Host => return Err(CommandError::Io("--source gpu needs --device cuda[:N]".into())),
        },
    };
    if transport == TransportKind::InProcess {
        return Err(CommandError::Io("the demo runs the two sides as processes: use --transport shm or tcp".into()));
    }
    let exe = std::env::current_exe().map_err(|e| CommandError::Io(format!("cannot find this program: {e}")))?;
    let dir = std::env::temp_dir().join(format!("weightlift-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| CommandError::Io(format!("{}: {e}", dir.display())))?;
    if let (Some(DemoSource::Disk), ModelSource::Synthetic(config)) = (args.source, &model) {
        // Both sides then read the checkpoint: the engines its layout, the trainer its bytes.
        model_args = save_checkpoint(config, &dir.join("checkpoint"), &model_args)?;
    }

    let mut children = Children(Vec::new());
    let mut endpoints = Vec::new();
    for rank in 0..args.tp_size {
        let listen = match transport {
            TransportKind::Shm | TransportKind::CudaIpc => {
                format!("unix:{}", dir.join(format!("rank{rank}.sock")).display())
            }
            TransportKind::Tcp | TransportKind::InProcess | TransportKind::Nccl => "tcp://127.0.0.1:0".to_string(),
        };
        let extra = [
            "--tp-size".to_string(),
            args.tp_size.to_string(),
            "--tp-rank".into(),
            rank.to_string(),
            "--device".into(),
            receiver_device.to_string(),
        ];
        let (child, endpoint) = spawn_receiver(&exe, &model_args, &listen, &extra)?;
        children.0.push(child);
        endpoints.push(endpoint);
    }

    if args.senders == 0 || (args.senders > 1 && trainer_device != DeviceArg::Host) {
        return Err(CommandError::Io("--senders N (1 or more) runs trainer ranks in host memory".into()));
    }
    let push = |rank: Option<u32>| {
        let mut push = Command::new(&exe);
        push.arg("push").args(model_args.to_args());
        for e in &endpoints {
            push.args(["--to", &e.to_string()]);
        }
        push.args([
            "--steps",
            &args.steps.to_string(),
            "--transport",
            &transport.to_string(),
            "--device",
            &trainer_device.to_string(),
            "--bucket-mib",
            &args.bucket_mib.to_string(),
            "--progress-jsonl",
        ]);
        if let Some(rank) = rank {
            push.args(["--rank", &rank.to_string(), "--world", &args.senders.to_string()]);
        }
        push
    };
    // Rank 0 reports the steps; the other ranks' reports are the same versions.
    let mut ranks = Children(Vec::new());
    for rank in 1..args.senders {
        let child = push(Some(rank))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| CommandError::Io(format!("cannot start trainer rank {rank}: {e}")))?;
        ranks.0.push(child);
    }
    let mut sender = push((args.senders > 1).then_some(0))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| CommandError::Io(format!("cannot start the sender: {e}")))?;
    let stdout = sender.stdout.take().expect("piped");

    let bar = ProgressBar::new(args.steps);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} updates  {msg}").expect("valid template"));
    bar.set_message(format!("{} over {transport}", model.name()));
    let mut steps: Vec<StepReport> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| CommandError::Io(e.to_string()))?;
        let step: StepReport =
            serde_json::from_str(&line).map_err(|e| CommandError::Io(format!("sender said {line:?}: {e}")))?;
        bar.set_message(format!("version {} {:.2} GB/s", step.version.0, step.gbps));
        bar.inc(1);
        steps.push(step);
    }
    bar.finish_and_clear();
    let status = sender.wait().map_err(|e| CommandError::Io(e.to_string()))?;
    let mut others_ok = true;
    for (rank, child) in ranks.0.iter_mut().enumerate() {
        let status = child.wait().map_err(|e| CommandError::Io(e.to_string()))?;
        if !status.success() {
            eprintln!("trainer rank {} exited with {status}", rank + 1);
            others_ok = false;
        }
    }
    drop(children);
    let _ = std::fs::remove_dir_all(&dir);

    if args.json {
        let out = DemoOutput {
            model: model.name(),
            source: args.source,
            transport,
            tp_size: args.tp_size,
            senders: args.senders,
            steps: steps
                .iter()
                .map(|s| DemoStep {
                    version: s.version.0,
                    bytes: s.bytes,
                    seconds: s.seconds,
                    gbps: s.gbps,
                    verified: s.verified,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
    } else {
        println!(
            "{} over {transport} ({} -> {receiver_device}), {} sender(s), {} receiver(s)",
            model.name(),
            match args.source {
                Some(DemoSource::Disk) => "disk".to_string(),
                _ => trainer_device.to_string(),
            },
            args.senders,
            args.tp_size
        );
        print_table(&steps);
    }
    if !status.success() || !others_ok || steps.len() as u64 != args.steps || steps.iter().any(|s| !s.verified) {
        return Err(CommandError::Unverified(format!(
            "{} of {} steps verified; the sender exited with {status}",
            steps.iter().filter(|s| s.verified).count(),
            args.steps
        )));
    }
    Ok(())
}

/// Saves `config`'s synthetic weights as one safetensors file in `dir`; the model arguments
/// that name it (with the preset and head size the synthetic model implies).
fn save_checkpoint(config: &ModelConfig, dir: &Path, args: &ModelArgs) -> Result<ModelArgs, CommandError> {
    std::fs::create_dir_all(dir).map_err(|e| CommandError::Io(format!("{}: {e}", dir.display())))?;
    let (manifest, data) = HostTensors::synthetic(config, 7).into_parts();
    let tensors: Vec<_> = manifest.iter().zip(data.iter().map(Vec::as_slice)).collect();
    weightlift::write_file(&dir.join("model.safetensors"), &tensors)
        .map_err(|e| CommandError::Io(format!("saving the checkpoint in {}: {e}", dir.display())))?;
    Ok(ModelArgs {
        synthetic: None,
        model: Some(dir.to_path_buf()),
        preset: Some(args.preset.unwrap_or(config.preset)),
        head_dim: Some(args.head_dim.unwrap_or(config.head_dim)),
        ..args.clone()
    })
}
