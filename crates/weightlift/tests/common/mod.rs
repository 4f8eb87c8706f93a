//! What the multi-process tests share: the binary, scratch directories, and `weightlift serve`
//! processes that are killed when dropped.

#![allow(dead_code)] // each test file uses its own part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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
    weightlift::safetensors_dir::write_file(&dir.join("model-00001-of-00002.safetensors"), a).unwrap();
    weightlift::safetensors_dir::write_file(&dir.join("model-00002-of-00002.safetensors"), b).unwrap();
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
