//! `weightlift serve`: a standalone receiver holding a model in host or GPU memory.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use weightlift::core::pool::TagOptions;
use weightlift::core::{exec, plan, Manifest, RuleSet, TpRank};
use weightlift::{
    check_exposure, default_threads, guard_receiver, Agent, AgentOptions, CheckpointTensors, DeviceTensors, Endpoint,
    HostTensors, MemoryControl, MemoryPool, ModelSource, PooledTensors, Receiver, ReceiverOptions, SetupError, Token,
    WEIGHTS_TAG,
};

use super::{gb, open_gpu, tp_rank, CommandError, DeviceArg, ModelArgs};

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Where senders connect: unix:/path, tcp://HOST:PORT (port 0 picks a free one).
    #[arg(long, default_value = "unix:/tmp/weightlift.sock")]
    pub listen: Endpoint,
    #[arg(long, default_value_t = 1)]
    pub tp_size: u32,
    #[arg(long, default_value_t = 0)]
    pub tp_rank: u32,
    /// Slots in each sender's shared-memory ring.
    #[arg(long, default_value_t = 2)]
    pub ring_slots: u32,
    /// The largest bucket a sender may use.
    #[arg(long, default_value_t = 1024)]
    pub max_bucket_mib: u64,
    /// Threads that unpack and digest (default: half the cores, at most 8).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds to wait for the next message of an update in flight.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Where the tensors live: host, or cuda:N (updates then come over cuda-ipc).
    #[arg(long, default_value = "host")]
    pub device: DeviceArg,
    /// Also serve the HTTP API (update_weights, weights_checker, version, metrics, ...) on this
    /// address, e.g. 127.0.0.1:8000 (port 0 picks one); printed on the second line of stdout.
    #[arg(long, value_name = "ADDR")]
    pub http: Option<String>,
    /// The token senders must prove they hold (challenge-response), and the bearer token the
    /// HTTP API requires.
    #[arg(long, env = "WEIGHTLIFT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Listen on an address other hosts can reach without a token.
    #[arg(long)]
    pub insecure: bool,
    /// Connections served at once (senders and the agent's fetches); more are refused.
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// Seconds a new connection has, from its first byte to its hello.
    #[arg(long, default_value_t = 10)]
    pub handshake_timeout_s: u64,
    /// With --device cuda: when the weights' memory is released (POST
    /// /release_memory_occupation), keep a copy in pinned host memory that resuming restores.
    /// Without it their bytes are dropped, as engines do, and the next update rewrites them.
    #[arg(long)]
    pub weights_backup: bool,
}

/// Chunks the GPU receiver's tagged pool maps (the Python package's default).
const POOL_CHUNK_BYTES: u64 = 256 << 20;

pub fn run(args: &ServeArgs) -> Result<(), CommandError> {
    let model = args.model.source(None)?;
    let tp = tp_rank(args.tp_rank, args.tp_size)?;
    let inputs = args.model.mapping().inputs(&model, tp)?;
    if let (DeviceArg::Cuda(_), ModelSource::Synthetic(_)) = (args.device, &model) {
        // Zeros straight on the GPU: a model's worth of host memory would be wasted.
        return serve(args, &model, inputs.destination.clone(), None, tp, &inputs.rules);
    }
    let mut tensors = HostTensors::filled(inputs.destination.clone(), 0);
    if let ModelSource::Dir(dir) = &model {
        // Start from the checkpoint's weights, laid out as this rank holds them.
        let checkpoint = CheckpointTensors::open(&dir.dir).map_err(SetupError::from)?;
        let plan = plan(&inputs.source, &inputs.destination, &inputs.rules, tp).map_err(SetupError::from)?;
        let (manifest, mut data) = tensors.into_parts();
        // Quantized into an FP8 engine (`--quant`) where the plan says so.
        let sources: Vec<&[u8]> =
            (0..plan.sources.len()).map(|i| weightlift::SourceTensors::bytes(&checkpoint, i)).collect();
        exec::execute(&plan, &sources, &mut data).map_err(|e| CommandError::Io(e.to_string()))?;
        tensors = HostTensors::new(manifest, data).map_err(|e| CommandError::Io(e.to_string()))?;
    }
    serve(args, &model, inputs.destination.clone(), Some(tensors), tp, &inputs.rules)
}

/// Serves `destination` (starting from `host`, or zeros) until the listener fails; with
/// --http, the HTTP API too (updates from disk mapped by `rules`).
fn serve(
    args: &ServeArgs,
    model: &ModelSource,
    destination: Manifest,
    host: Option<HostTensors>,
    tp: TpRank,
    rules: &RuleSet,
) -> Result<(), CommandError> {
    let token = args.token.as_deref().and_then(Token::new);
    check_exposure(&args.listen, token.as_ref(), args.insecure, "push weights into this engine")
        .map_err(|e| SetupError::Invalid(e.to_string()))?;
    if let Some(addr) = &args.http {
        let http = Endpoint::Tcp(addr.clone());
        check_exposure(&http, token.as_ref(), args.insecure, "drive this engine's HTTP API")
            .map_err(|e| SetupError::Invalid(e.to_string()))?;
    }
    let options = ReceiverOptions {
        tp,
        ring_slots: args.ring_slots,
        max_bucket_bytes: args.max_bucket_mib << 20,
        timeout: Duration::from_secs(args.timeout_s),
        handshake_timeout: Duration::from_secs(args.handshake_timeout_s),
        token,
        max_connections: args.max_connections,
        threads: args.threads.unwrap_or_else(default_threads),
        ..ReceiverOptions::default()
    };
    let (receiver, memory) = match args.device {
        DeviceArg::Host => {
            (Receiver::new(host.unwrap_or_else(|| HostTensors::filled(destination.clone(), 0)), options), None)
        }
        DeviceArg::Cuda(ordinal) => {
            let gpu = open_gpu(ordinal)?;
            // The weights in a tagged pool, so that the HTTP API can release and resume them.
            let pool = Arc::new(MemoryPool::new(&gpu, POOL_CHUNK_BYTES)?);
            pool.configure(WEIGHTS_TAG, TagOptions { cpu_backup: args.weights_backup, keep_physical: false });
            let tensors = PooledTensors::alloc(&pool, WEIGHTS_TAG, &destination)
                .map_err(|e| CommandError::Io(format!("cannot allocate the weights on cuda:{ordinal}: {e}")))?;
            match host {
                Some(host) => tensors.upload(&gpu, &host)?,
                None => tensors.fill_each(&gpu, &|_| 0)?,
            }
            // Pinned now, not on the first release: pinning costs ~0.4 s per GiB on first touch.
            pool.prepare_staging(WEIGHTS_TAG)
                .map_err(|e| CommandError::Io(format!("cannot pin the weights' backup staging: {e}")))?;
            let holding = tensors.holding(WEIGHTS_TAG);
            let receiver = Receiver::on_gpu(gpu, tensors, options)?;
            guard_receiver(&receiver, vec![holding]);
            (receiver, Some(pool as Arc<dyn MemoryControl>))
        }
    };
    let bytes = destination.total_bytes();
    let listener =
        args.listen.bind().map_err(|e| CommandError::Io(format!("cannot listen on {}: {e}", args.listen)))?;
    let endpoint = listener.endpoint().map_err(|e| CommandError::Io(e.to_string()))?;
    // This one line is all a receiver writes to stdout: scripts (and `weightlift demo`) wait
    // for it and may close the pipe after it, which must not matter.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "listening on {endpoint}").and_then(|()| stdout.flush());
    // The HTTP API serves from its own thread while this one accepts senders.
    let _http = match &args.http {
        Some(addr) => {
            let options = AgentOptions {
                token: args.token.clone(),
                disk_rules: Some(rules.clone()),
                memory,
                ..AgentOptions::default()
            };
            let running = Agent::new(receiver.clone(), options)
                .spawn(addr)
                .map_err(|e| CommandError::Io(format!("cannot serve HTTP on {addr}: {e}")))?;
            let _ = writeln!(stdout, "http on http://{}", running.addr()).and_then(|()| stdout.flush());
            Some(running)
        }
        None => None,
    };
    tracing::info!("holding {} ({} tensors, {}) as {tp}", model.name(), destination.len(), gb(bytes));
    receiver.serve(&listener).map_err(|e| CommandError::Io(format!("accepting on {endpoint}: {e}")))
}
