//! `weightlift push`: update running receivers from a checkpoint, or (for demos and
//! benchmarks) from a synthetic model stepped like an optimizer would.

use std::io::Write;

use clap::Args;
use serde::Serialize;
use weightlift::core::{Manifest, RuleSet};
use weightlift::core::{TpRank, Version};
use weightlift::{
    check_exposure, default_threads, fsdp_pieces, CheckpointTensors, Endpoint, Fault, GpuTensors, HostTensors,
    ModelSource, ReceiverState, Sender, SenderOptions, SetupError, Shard, SourceTensors, StepReport, Token, Trainer,
    TransportKind,
};

use super::{gb, open_gpu, CommandError, DeviceArg, ModelArgs, TrainerArgs};

#[derive(Args, Debug)]
pub struct PushArgs {
    /// A receiver to update; repeat for each tensor-parallel rank.
    #[arg(long = "to", required_unless_present = "listen", value_name = "ENDPOINT")]
    pub to: Vec<Endpoint>,
    /// Wait for receivers here instead (unix:/path, tcp://HOST:PORT; port 0 picks one) and
    /// push --version to each one that connects: engines told to fetch it through their HTTP
    /// API (`update_weights` with `{"sender": ADDR}`). Prints `listening on ADDR` first.
    #[arg(long, conflicts_with = "to", value_name = "ENDPOINT")]
    pub listen: Option<Endpoint>,
    /// With --listen: wait for this many receivers (the ranks of one engine) and push the
    /// version to all of them at once, committed on all or none; without it, each receiver
    /// that connects is pushed to on its own, until interrupted.
    #[arg(long, requires = "listen")]
    pub receivers: Option<u64>,
    /// The receivers' token (challenge-response before anything is sent).
    #[arg(long, env = "WEIGHTLIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With --listen on an address other hosts can reach: serve it without a token.
    #[arg(long, requires = "listen")]
    pub insecure: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The version to push (the first of several with --steps).
    #[arg(long, default_value_t = 1)]
    pub version: u64,
    /// Push this many versions, stepping the weights (in memory) before each.
    #[arg(long, default_value_t = 1)]
    pub steps: u64,
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// GPU sources in CUDA VMM memory (shared as file descriptors, needs unix: endpoints)
    /// instead of cudaMalloc memory (shared as legacy IPC handles).
    #[arg(long)]
    pub vmm: bool,
    #[arg(long, default_value_t = 64)]
    pub bucket_mib: u64,
    /// Bucket size in bytes, overriding --bucket-mib (tests use tiny buckets).
    #[arg(long, hide = true)]
    pub bucket_bytes: Option<u64>,
    /// With --synthetic and --device cuda: step the weights on the GPU (every byte set to a
    /// value of the step) instead of in host memory and copying them up; for benchmarks that
    /// time pushes, without a host copy of the model.
    #[arg(long)]
    pub gpu_fill: bool,
    /// Skip tensors whose digest did not change since the receiver's last commit.
    #[arg(long)]
    pub delta: bool,
    /// Threads that pack and digest (default: half the cores, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long)]
    pub json: bool,
    /// Print each step as one JSON line as soon as it is done (for `weightlift demo`).
    #[arg(long, hide = true)]
    pub progress_jsonl: bool,
    /// Misbehave on purpose (fault tests): flip:N, hangup:N or abort:N (bucket N).
    #[arg(long, hide = true)]
    pub fault: Option<Fault>,
    /// Push as this rank of a sharded trainer (with --world): this process sends only its
    /// FSDP2 pieces of the model (dim 0 of every tensor in `torch.chunk` pieces); every rank
    /// runs `push` with the same --to, --version and --steps, and rank 0 decides each version.
    #[arg(long, requires = "world", conflicts_with = "listen")]
    pub rank: Option<u32>,
    /// The ranks of the sharded trainer (with --rank).
    #[arg(long, requires = "rank")]
    pub world: Option<u32>,
}

#[derive(Serialize)]
struct PushOutput<'a> {
    model: String,
    transport: TransportKind,
    /// Per rank: whether buckets went into its device slots, copied by this process.
    device_writes: Vec<bool>,
    /// Per rank: whether the last update into its device slots read the checkpoint from its
    /// files (it was mostly out of the page cache) rather than from their maps.
    reads_from_disk: Vec<bool>,
    /// Each rank's receiver as it was before this push.
    receivers: Vec<ReceiverState>,
    steps: &'a [StepReport],
}

/// `push --rank r --world n --json`: this rank's view of each version.
#[derive(Serialize)]
struct ShardOutput<'a> {
    model: String,
    transport: TransportKind,
    rank: u32,
    world: u32,
    steps: &'a [StepReport],
}

pub fn run(args: &PushArgs) -> Result<(), CommandError> {
    let model = args.model.source(None)?;
    let local = match &args.listen {
        Some(listen) => listen.is_local(),
        None => args.to.iter().all(Endpoint::is_local),
    };
    let transport = args.trainer.transport(local);
    // The receivers plan against their own parameters; the trainer only brings its tensors
    // and the rules (which depend on the TP size only through its checks).
    let tp = TpRank::new(0, args.to.len().max(1) as u32).expect("at least one receiver");
    let source_manifest = model.manifest();
    let options = SenderOptions {
        transport,
        bucket_bytes: args.bucket_bytes.unwrap_or(args.bucket_mib << 20),
        delta: args.delta,
        fault: args.fault,
        threads: args.threads.unwrap_or_else(default_threads),
        token: args.token.as_deref().and_then(Token::new),
        device_writes: !args.trainer.no_device_writes,
        host_digests: args.trainer.host_digests,
        // This process owns its tensors and copies them no other way.
        pin_sources: true,
        ..SenderOptions::default()
    };
    if let Some(listen) = &args.listen {
        let (rules, _) = args.model.mapping().rules(&model, tp)?;
        return publish(listen, &model, &source_manifest, &rules, options, args);
    }
    if let (Some(rank), Some(world)) = (args.rank, args.world) {
        let (rules, _) = args.model.mapping().rules(&model, tp)?;
        let steps = push_shard(&model, &rules, options, rank, world, args)?;
        if args.json {
            let out = ShardOutput { model: model.name(), transport, rank, world, steps: &steps };
            println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        } else if !args.progress_jsonl {
            print_table(&steps);
        }
        return match steps.iter().find_map(StepReport::failure) {
            None => Ok(()),
            Some(failure) => Err(CommandError::Unverified(failure)),
        };
    }
    // Each receiver with its module's rules (a main model and its draft take one version).
    let modules = args.model.modules_for(args.to.len())?;
    let mut senders = Vec::with_capacity(args.to.len());
    for (to, module) in args.to.iter().zip(modules) {
        let mut mapping = args.model.mapping();
        mapping.module = module;
        let (rules, _) = mapping.rules(&model, tp)?;
        senders.push(Sender::connect(to, &source_manifest, &rules, options.clone())?);
    }
    let mut trainer = Trainer::from_senders(senders);

    let steps = match args.trainer.device {
        DeviceArg::Cuda(ordinal) => push_from_gpu(&mut trainer, &model, ordinal, args)?,
        DeviceArg::Host => push_from_host(&mut trainer, &model, args)?,
    };

    if args.json {
        let out = PushOutput {
            model: model.name(),
            transport,
            device_writes: trainer.senders().iter().map(Sender::writes_device_slots).collect(),
            reads_from_disk: trainer.senders().iter().map(Sender::reads_from_disk).collect(),
            receivers: trainer.receivers_at_connect(),
            steps: &steps,
        };
        println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
    } else if !args.progress_jsonl {
        print_table(&steps);
    }
    match steps.iter().find_map(StepReport::failure) {
        None => Ok(()),
        Some(failure) => Err(CommandError::Unverified(failure)),
    }
}

/// Rank `rank` of a sharded trainer of `world`: steps the whole model in memory before each
/// version (as every rank's optimizer would) and pushes its own FSDP2 pieces of it.
fn push_shard(
    model: &ModelSource,
    rules: &RuleSet,
    options: SenderOptions,
    rank: u32,
    world: u32,
    args: &PushArgs,
) -> Result<Vec<StepReport>, CommandError> {
    if rank >= world {
        return Err(SetupError::Invalid(format!("--rank {rank} is not below --world {world}")).into());
    }
    let gpu_fill = args.gpu_fill && args.trainer.device != DeviceArg::Host;
    // With --gpu-fill no host copy is made: the shard is filled on the GPU each step.
    let mut whole = match model {
        ModelSource::Synthetic(_) if gpu_fill => None,
        ModelSource::Synthetic(config) => Some(HostTensors::synthetic(config, 7)),
        ModelSource::Dir(_) if gpu_fill => {
            return Err(SetupError::Invalid("--gpu-fill steps synthetic models only".into()).into())
        }
        ModelSource::Dir(dir) => {
            Some(HostTensors::copy_of(&CheckpointTensors::open(&dir.dir).map_err(SetupError::from)?))
        }
    };
    let (pieces, placements) = fsdp_pieces(&model.manifest(), rank, world);
    // On a GPU, the shard is uploaded there every step (as a trainer rank's local shard lives).
    let mut on_gpu = match args.trainer.device {
        DeviceArg::Host => None,
        DeviceArg::Cuda(ordinal) => {
            let gpu = open_gpu(ordinal)?;
            let tensors = GpuTensors::alloc(&gpu, &pieces)?;
            Some((gpu, tensors))
        }
    };
    let shard = Shard { rank, world, placements };
    let mut trainer = Trainer::connect_shard(&args.to, &pieces, rules, &options, &shard)?;
    let mut steps = Vec::new();
    for step in 0..args.steps {
        let version = Version(args.version + step);
        let mine = whole.as_mut().map(|whole| {
            whole.perturb();
            whole.fsdp_shard(rank, world).0
        });
        let step = match (on_gpu.as_mut(), &mine) {
            (None, Some(mine)) => push_one(&mut trainer, version, mine, args)?,
            (Some((gpu, tensors)), mine) => {
                match mine {
                    Some(mine) => tensors.upload(mine)?,
                    None => {
                        tensors.fill(gpu, 0x11u8.wrapping_add(version.0 as u8))?;
                        gpu.synchronize()?;
                    }
                }
                let step = trainer.push_device(version, gpu, tensors)?;
                report_progress(&step, args);
                step
            }
            (None, None) => return Err(SetupError::Invalid("--gpu-fill fills a GPU: --device cuda:N".into()).into()),
        };
        let committed = step.committed;
        steps.push(step);
        if !committed {
            break;
        }
    }
    Ok(steps)
}

/// The trainer's weights in host memory: a checkpoint straight from the page cache, or stepped
/// in memory before each version.
fn push_from_host(
    trainer: &mut Trainer,
    model: &ModelSource,
    args: &PushArgs,
) -> Result<Vec<StepReport>, CommandError> {
    let mut steps = Vec::new();
    match model {
        ModelSource::Synthetic(config) => {
            let mut tensors = HostTensors::synthetic(config, 7);
            for step in 0..args.steps {
                tensors.perturb();
                steps.push(push_one(trainer, Version(args.version + step), &tensors, args)?);
                if !steps.last().is_some_and(|s| s.committed) {
                    break;
                }
            }
        }
        ModelSource::Dir(dir) => {
            let checkpoint = CheckpointTensors::open(&dir.dir).map_err(SetupError::from)?;
            if args.steps == 1 {
                // Straight from the page cache, no copy.
                steps.push(push_one(trainer, Version(args.version), &checkpoint, args)?);
            } else {
                // Several versions: step a copy in memory, as a trainer would.
                let mut tensors = HostTensors::copy_of(&checkpoint);
                drop(checkpoint);
                for step in 0..args.steps {
                    tensors.perturb();
                    steps.push(push_one(trainer, Version(args.version + step), &tensors, args)?);
                    if !steps.last().is_some_and(|s| s.committed) {
                        break;
                    }
                }
            }
        }
    }
    Ok(steps)
}

/// The trainer's weights on GPU `ordinal`: stepped in host memory and copied up before each
/// push, or, with --gpu-fill (synthetic models), stepped on the GPU with no host copy.
fn push_from_gpu(
    trainer: &mut Trainer,
    model: &ModelSource,
    ordinal: usize,
    args: &PushArgs,
) -> Result<Vec<StepReport>, CommandError> {
    let (manifest, mut host) = match model {
        ModelSource::Synthetic(_) if args.gpu_fill => (model.manifest(), None),
        ModelSource::Synthetic(config) => {
            let tensors = HostTensors::synthetic(config, 7);
            (tensors.manifest().clone(), Some(tensors))
        }
        ModelSource::Dir(_) if args.gpu_fill => {
            return Err(SetupError::Invalid("--gpu-fill steps synthetic models only".into()).into())
        }
        ModelSource::Dir(dir) => {
            let tensors = HostTensors::copy_of(&CheckpointTensors::open(&dir.dir).map_err(SetupError::from)?);
            (tensors.manifest().clone(), Some(tensors))
        }
    };
    let gpu = open_gpu(ordinal)?;
    let mut on_gpu =
        if args.vmm { GpuTensors::alloc_shareable(&gpu, &manifest) } else { GpuTensors::alloc(&gpu, &manifest) }?;
    let mut steps = Vec::new();
    for step in 0..args.steps {
        let version = Version(args.version + step);
        match host.as_mut() {
            Some(tensors) => {
                tensors.perturb();
                on_gpu.upload(tensors)?;
            }
            None => {
                on_gpu.fill(&gpu, 0x11u8.wrapping_add(version.0 as u8))?;
                gpu.synchronize()?;
            }
        }
        let step = trainer.push_device(version, &gpu, &on_gpu)?;
        report_progress(&step, args);
        let committed = step.committed;
        steps.push(step);
        if !committed {
            break;
        }
    }
    Ok(steps)
}

/// Waits for receivers at `listen` and pushes one version, the same weights, to them: with
/// `--receivers N`, to all N at once (two-phase: committed on all or none), else to each on
/// its own as it comes.
fn publish(
    listen: &Endpoint,
    model: &ModelSource,
    manifest: &Manifest,
    rules: &RuleSet,
    options: SenderOptions,
    args: &PushArgs,
) -> Result<(), CommandError> {
    if args.steps != 1 {
        return Err(SetupError::Invalid("--listen pushes one version (--steps 1)".into()).into());
    }
    check_exposure(listen, options.token.as_ref(), args.insecure, "fetch the weights")
        .map_err(|e| SetupError::Invalid(e.to_string()))?;
    let version = Version(args.version);
    // The weights, ready before the first receiver comes.
    let host: Box<dyn SourceTensors> = match model {
        ModelSource::Synthetic(config) => Box::new(HostTensors::synthetic(config, 7)),
        ModelSource::Dir(dir) => Box::new(CheckpointTensors::open(&dir.dir).map_err(SetupError::from)?),
    };
    let device = match args.trainer.device {
        DeviceArg::Cuda(ordinal) => {
            let gpu = open_gpu(ordinal)?;
            let mut tensors = GpuTensors::alloc(&gpu, manifest)?;
            tensors.upload(host.as_ref())?;
            Some((gpu, tensors))
        }
        DeviceArg::Host => None,
    };
    let listener = listen.bind().map_err(|e| CommandError::Io(format!("cannot listen on {listen}: {e}")))?;
    let endpoint = listener.endpoint().map_err(|e| CommandError::Io(e.to_string()))?;
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {endpoint}").and_then(|()| stdout.flush());
    let push = |trainer: &mut Trainer| -> Result<StepReport, weightlift::SendError> {
        match &device {
            Some((gpu, tensors)) => trainer.push_device(version, gpu, tensors),
            None => trainer.push(version, host.as_ref()),
        }
    };
    let accept = || -> Result<Option<Sender>, CommandError> {
        let stream = listener.accept().map_err(|e| CommandError::Io(format!("accepting on {endpoint}: {e}")))?;
        let peer = stream.peer();
        match Sender::accept(stream, manifest, rules, options.clone()) {
            Ok(sender) => Ok(Some(sender)),
            Err(e) => {
                tracing::warn!(%peer, "version {version} not delivered: {e}");
                Ok(None)
            }
        }
    };
    let print = |step: &StepReport| {
        // One line per receiver: its report (committed or not, with the reason).
        let mut stdout = std::io::stdout();
        for report in &step.ranks {
            let _ = writeln!(stdout, "{}", serde_json::to_string(report).expect("serialises"))
                .and_then(|()| stdout.flush());
        }
    };
    if let Some(n) = args.receivers {
        let mut senders = Vec::new();
        while (senders.len() as u64) < n {
            senders.extend(accept()?);
        }
        let step = push(&mut Trainer::from_senders(senders))?;
        print(&step);
        return step.failure().map_or(Ok(()), |failure| Err(CommandError::Unverified(failure)));
    }
    loop {
        let Some(sender) = accept()? else { continue };
        let step = push(&mut Trainer::from_senders(vec![sender]))?;
        if let Some(failure) = step.failure() {
            tracing::warn!("{failure}");
        }
        print(&step);
    }
}

fn push_one(
    trainer: &mut Trainer,
    version: Version,
    tensors: &dyn SourceTensors,
    args: &PushArgs,
) -> Result<StepReport, CommandError> {
    let step = trainer.push(version, tensors)?;
    report_progress(&step, args);
    Ok(step)
}

fn report_progress(step: &StepReport, args: &PushArgs) {
    if args.progress_jsonl {
        // The reader (`weightlift demo`) may be gone: a closed pipe must not stop the push.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{}", serde_json::to_string(step).expect("serialises")).and_then(|()| stdout.flush());
    }
}

/// `no*`: committed on the receivers' digests alone (CUDA IPC without sender digests).
pub fn print_table(steps: &[StepReport]) {
    println!("{:>8} {:>12} {:>9} {:>8} {:>9}", "version", "bytes", "seconds", "GB/s", "verified");
    for s in steps {
        println!(
            "{:>8} {:>12} {:>9.3} {:>8.2} {:>9}",
            s.version.0,
            gb(s.bytes),
            s.seconds,
            s.gbps,
            match (s.committed, s.verified) {
                (true, true) => "yes",
                (true, false) => "no*",
                (false, _) => "NOT COMMITTED",
            }
        );
    }
}
