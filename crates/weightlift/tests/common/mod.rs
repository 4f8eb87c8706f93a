//! What the integration tests share: the binary, scratch directories, `weightlift serve`
//! processes that are killed when dropped, and receivers on a thread of the test process with
//! a check of their bytes against the reference executor.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use weightlift::core::{destination_manifest, exec, synthetic, PresetOptions, RuleSet, SourceSet, TpRank};
use weightlift::{Endpoint, HostTensors, Receiver, ReceiverOptions, Sender};

pub const EXE: &str = env!("CARGO_BIN_EXE_weightlift");

/// A fresh, empty directory for one test.
pub fn temp_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wl-mp-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `specs` (zero-filled) as a two-file checkpoint, split in the middle as HF shards are.
pub fn write_checkpoint(dir: &Path, specs: &[weightlift::core::TensorSpec]) {
    let data: Vec<Vec<u8>> = specs.iter().map(|s| vec![0u8; s.byte_len() as usize]).collect();
    let tensors: Vec<_> = specs.iter().zip(data.iter().map(Vec::as_slice)).collect();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    weightlift::write_file(&dir.join("model-00001-of-00002.safetensors"), a).unwrap();
    weightlift::write_file(&dir.join("model-00002-of-00002.safetensors"), b).unwrap();
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `weightlift` with these arguments, without the caller's token.
pub fn weightlift(args: &[&str]) -> Command {
    let mut cmd = Command::new(EXE);
    cmd.args(args).env_remove("WEIGHTLIFT_TOKEN");
    cmd
}

/// A `weightlift serve` process, killed when dropped; `http` is its API's URL when asked for.
pub struct Serve {
    pub child: Child,
    pub endpoint: String,
    pub http: Option<String>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serve {
    /// `weightlift serve ARGS`, once it says where it listens.
    pub fn start(args: &[&str]) -> Serve {
        // One malloc arena: each thread's own would reserve 64 MiB of address space, hiding
        // what connections hold in `vm_bytes`.
        let mut child = weightlift(&[&["serve"], args].concat())
            .env("MALLOC_ARENA_MAX", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("serve says where it listens").unwrap();
        let endpoint = first.strip_prefix("listening on ").expect("serve says where it listens").to_string();
        let http = args
            .contains(&"--http")
            .then(|| lines.next().unwrap().unwrap().strip_prefix("http on ").expect("the API's URL").to_string());
        Serve { child, endpoint, http }
    }

    /// A synthetic model's rank `rank` of `tp_size`, listening at `listen`.
    pub fn rank(model: &str, listen: &str, tp_size: u32, rank: u32, extra: &[&str]) -> Serve {
        let (size, rank) = (tp_size.to_string(), rank.to_string());
        let base = ["--synthetic", model, "--listen", listen, "--tp-size", &size, "--tp-rank", &rank];
        Serve::start(&[&base[..], extra].concat())
    }

    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// The Unix socket's path.
    pub fn path(&self) -> &str {
        self.endpoint.strip_prefix("unix:").expect("a unix: endpoint")
    }

    /// Address space, not resident memory: a zeroed buffer is resident only once written, but
    /// it is held (and counted against the process's limits) from its allocation.
    pub fn vm_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }
}

/// A receiver serving on a thread of this process, and a trainer's tensors of its model.
pub struct Setup {
    pub rules: RuleSet,
    pub receiver: Receiver,
    /// Where it listens (for tcp port 0, the port it got).
    pub endpoint: Endpoint,
    pub trainer: HostTensors,
}

pub fn socket_path(label: &str) -> PathBuf {
    std::env::temp_dir().join(format!("wl-host-{}-{label}.sock", std::process::id()))
}

/// `model`'s receiver for rank `tp`, zero-filled, on a Unix socket named after `label`.
pub fn setup(model: &str, tp: TpRank, label: &str, options: ReceiverOptions) -> Setup {
    setup_at(model, tp, Endpoint::Unix(socket_path(label)), options)
}

/// The same, listening at `endpoint`.
pub fn setup_at(model: &str, tp: TpRank, endpoint: Endpoint, options: ReceiverOptions) -> Setup {
    let config = synthetic(model).unwrap();
    let rules = config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
    let source = SourceSet::single(config.source_manifest());
    let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
    let receiver = Receiver::new(HostTensors::filled(dest, 0), ReceiverOptions { tp, ..options });
    let listener = endpoint.bind().unwrap();
    let endpoint = listener.endpoint().unwrap();
    let serving = receiver.clone();
    std::thread::spawn(move || serving.serve(&listener));
    Setup { rules, receiver, endpoint, trainer: HostTensors::synthetic(&config, 7) }
}

/// The first destination whose bytes on the receiver differ from what `sender`'s plan makes
/// of the trainer's tensors; None when the receiver holds exactly those.
pub fn first_difference(s: &Setup, sender: &Sender) -> Option<String> {
    let plan = sender.plan();
    let (manifest, data) = s.trainer.clone().into_parts();
    let sources: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let mut expected: Vec<Vec<u8>> = plan.destinations.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
    exec::execute(plan, &sources, &mut expected).unwrap();
    assert_eq!(manifest.len(), sources.len());
    s.receiver
        .with_host_tensors(|t| {
            let differs = |&(i, want): &(usize, &Vec<u8>)| t.bytes(i) != want.as_slice();
            expected.iter().enumerate().find(differs).map(|(i, _)| plan.destinations[i].name.clone())
        })
        .expect("the receiver holds host tensors")
}

/// The receiver holds exactly what the plan makes from the trainer's tensors.
pub fn assert_bit_exact(s: &Setup, sender: &Sender) {
    if let Some(name) = first_difference(s, sender) {
        panic!("`{name}` differs");
    }
}

/// A source whose tensor `short` keeps only `1 / divisor` of its bytes: reading past them
/// breaks an update off midway, as a source that changed under the reader would.
pub struct Truncated {
    pub tensors: HostTensors,
    pub short: usize,
    pub divisor: usize,
}

impl weightlift::SourceTensors for Truncated {
    fn manifest(&self) -> &weightlift::core::Manifest {
        self.tensors.manifest()
    }

    fn bytes(&self, index: usize) -> &[u8] {
        let bytes = weightlift::SourceTensors::bytes(&self.tensors, index);
        &bytes[..if index == self.short { bytes.len() / self.divisor } else { bytes.len() }]
    }
}
