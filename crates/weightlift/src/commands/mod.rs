pub mod bench;
pub mod bench_gpu;
pub mod demo;
pub mod plan;
pub mod push;
pub mod serve;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use clap::Args;
use weightlift::core::quant::Quant;
use weightlift::core::{DType, Module, Preset, TpRank};
use weightlift::{Endpoint, MappingOptions, ModelSource, SendError, SetupError, TransportKind};

/// A command's failure and the exit code it maps to: 2 for a plan that cannot be made or
/// options that do not fit (like clap's usage errors), 1 for everything else.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("{0}")]
    Io(String),
    #[error("GPU: {0}")]
    Cuda(#[from] weightlift_cuda::CudaError),
    /// The command ran, but an update did not verify.
    #[error("{0}")]
    Unverified(String),
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Setup(SetupError::Plan(_) | SetupError::Invalid(_)) => 2,
            _ => 1,
        }
    }
}

/// Which model, and how it maps onto the engine: shared by every command that plans.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A synthetic model with real shapes: qwen3-0.6b, qwen3-8b, qwen3-30b-a3b, llama3-8b, or a tiny test model.
    #[arg(long, conflicts_with = "model")]
    pub synthetic: Option<String>,
    /// A directory of .safetensors files with an optional config.json.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Mapping preset: identity, llama, qwen3, qwen3-moe (default: from the model's config).
    #[arg(long)]
    pub preset: Option<Preset>,
    /// A JSON rule set to use instead of a preset.
    #[arg(long, value_name = "FILE", conflicts_with = "preset")]
    pub rules: Option<PathBuf>,
    /// Whole experts per rank instead of slices of every expert.
    #[arg(long)]
    pub expert_parallel: bool,
    /// Rows per attention head (default: from config.json, or the q_norm weight).
    #[arg(long)]
    pub head_dim: Option<u64>,
    /// The engine's dtype, e.g. BF16 when the source holds F32 master weights.
    #[arg(long)]
    pub dtype: Option<DType>,
    /// The engine keeps its own lm_head although the source ties it to the embeddings.
    #[arg(long)]
    pub untied_lm_head: bool,
    /// The part of a checkpoint with a draft the engine holds: whole (default), main (the
    /// main model, ignoring `mtp.*` and `draft.*`), mtp (its Qwen3-Next-style MTP module) or
    /// draft (a separate draft model sent under `draft.`). `push` takes one per `--to`.
    #[arg(long = "module", value_name = "MODULE")]
    pub modules: Vec<Module>,
    /// A derived engine in FP8: its linear weights in F8_E4M3, quantized on the way, with
    /// their scales: block:N (N x N blocks, `weight_scale_inv`), block:RxC, or channel
    /// (`weight_scale`). The other parameters keep --dtype (the source's with F8_E4M3).
    #[arg(long, value_name = "SCHEME")]
    pub quant: Option<Quant>,
}

impl ModelArgs {
    /// The model named, or `default` (a synthetic name) when none is.
    pub fn source(&self, default: Option<&str>) -> Result<ModelSource, CommandError> {
        Ok(match (&self.synthetic, &self.model, default) {
            (Some(name), _, _) => ModelSource::synthetic(name)?,
            (None, Some(dir), _) => ModelSource::dir(dir)?,
            (None, None, Some(name)) => ModelSource::synthetic(name)?,
            (None, None, None) => {
                return Err(SetupError::Invalid("name a model: --synthetic NAME or --model DIR".into()).into())
            }
        })
    }

    pub fn mapping(&self) -> MappingOptions {
        MappingOptions {
            preset: self.preset,
            rules_file: self.rules.clone(),
            head_dim: self.head_dim,
            expert_parallel: self.expert_parallel,
            dtype: self.dtype,
            untied_lm_head: self.untied_lm_head,
            engine_manifest: None,
            module: self.modules.first().copied().unwrap_or_default(),
            quant: self.quant,
        }
    }

    /// One module per receiver of `count`: none given, the whole checkpoint for each; one, the
    /// same for each; else exactly one each.
    pub fn modules_for(&self, count: usize) -> Result<Vec<Module>, CommandError> {
        match self.modules.len() {
            0 => Ok(vec![Module::Whole; count]),
            1 => Ok(vec![self.modules[0]; count]),
            n if n == count => Ok(self.modules.clone()),
            n => {
                Err(SetupError::Invalid(format!("{n} --module for {count} receivers: give one, or one per --to"))
                    .into())
            }
        }
    }

    /// The same options as command-line arguments, for a child process.
    pub fn to_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(v) = value {
                args.push(flag.to_string());
                args.push(v);
            }
        };
        push("--synthetic", self.synthetic.clone());
        push("--model", self.model.as_ref().map(|p| p.display().to_string()));
        push("--preset", self.preset.map(|p| p.name().to_string()));
        push("--rules", self.rules.as_ref().map(|p| p.display().to_string()));
        push("--head-dim", self.head_dim.map(|h| h.to_string()));
        push("--dtype", self.dtype.map(|d| d.name().to_string()));
        push("--quant", self.quant.map(|q| q.to_string()));
        if self.expert_parallel {
            args.push("--expert-parallel".into());
        }
        if self.untied_lm_head {
            args.push("--untied-lm-head".into());
        }
        for module in &self.modules {
            args.extend(["--module".to_string(), module.name().to_string()]);
        }
        args
    }
}

/// Starts `weightlift serve` as a child process and waits for the endpoint it listens on.
pub fn spawn_receiver(
    exe: &Path,
    model: &ModelArgs,
    listen: &str,
    extra: &[String],
) -> Result<(Child, Endpoint), CommandError> {
    let mut child = Command::new(exe)
        .arg("serve")
        .args(model.to_args())
        .args(["--listen", listen])
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| CommandError::Io(format!("cannot start a receiver: {e}")))?;
    let mut first = String::new();
    let read = BufReader::new(child.stdout.take().expect("piped")).read_line(&mut first);
    match read.ok().and_then(|_| first.trim().strip_prefix("listening on ")?.parse().ok()) {
        Some(endpoint) => Ok((child, endpoint)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(CommandError::Io(format!("a receiver did not start (it said {first:?})")))
        }
    }
}

/// Where tensors live: `host`, or a GPU (`cuda` is `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Host,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" | "cpu" => Ok(DeviceArg::Host),
            "cuda" => Ok(DeviceArg::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceArg::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected host, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceArg::Host => f.write_str("host"),
            DeviceArg::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Where the trainer's tensors live and how they travel: shared by `push` and `demo`.
#[derive(Args, Debug, Clone)]
pub struct TrainerArgs {
    /// shm (same host), tcp, cuda-ipc (GPU to GPU, same host) or nccl (GPU to GPU, any host);
    /// default: cuda-ipc for --device cuda, else shm when every receiver is on this host, else
    /// tcp.
    #[arg(long)]
    pub transport: Option<TransportKind>,
    /// Where the trainer's tensors live: host, or cuda:N.
    #[arg(long, default_value = "host")]
    pub device: DeviceArg,
    /// Host tensors into GPU receivers on this host: send buckets through the shared-memory
    /// ring rather than copying them into the receivers' device slots from this process.
    #[arg(long)]
    pub no_device_writes: bool,
    /// Device slots: digest the tensors where they are in host memory, on the CPU (a second
    /// read of it), rather than what the copies landed on the GPU.
    #[arg(long)]
    pub host_digests: bool,
}

impl TrainerArgs {
    /// The transport asked for, or the default for this device and these receivers.
    pub fn transport(&self, receivers_local: bool) -> TransportKind {
        self.transport.unwrap_or(match self.device {
            DeviceArg::Cuda(_) => TransportKind::CudaIpc,
            DeviceArg::Host if receivers_local => TransportKind::Shm,
            DeviceArg::Host => TransportKind::Tcp,
        })
    }
}

/// Opens GPU `ordinal`, with an error that says which.
pub fn open_gpu(ordinal: usize) -> Result<std::sync::Arc<weightlift_cuda::Gpu>, CommandError> {
    weightlift_cuda::Gpu::open(ordinal)
        .map(std::sync::Arc::new)
        .map_err(|e| CommandError::Io(format!("cannot use cuda:{ordinal}: {e}")))
}

pub fn tp_rank(rank: u32, size: u32) -> Result<TpRank, CommandError> {
    TpRank::new(rank, size).map_err(|e| SetupError::Invalid(e.to_string()).into())
}

pub fn gb(bytes: u64) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}
