//! What one update did, as the receiver saw it.

use serde::{Deserialize, Serialize};
use weightlift_core::Version;

/// How one receiver's part of an update ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpdateOutcome {
    /// The receiver committed the version.
    Committed,
    /// The receiver refused the version before anything was written (not newer than its
    /// committed one, another in flight, its memory released).
    Refused,
    /// The sender called the update off: before any byte moved, or (an update of several
    /// receivers) after another receiver refused or failed it; what was written is dirty.
    Aborted,
    /// The transfer broke off, or digests differed.
    #[default]
    Failed,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpdateReport {
    /// The version the update carried.
    #[schema(value_type = u64)]
    pub version: Version,
    /// The version the receiver holds afterwards: `version` if committed, else the previous one.
    #[schema(value_type = u64)]
    pub committed: Version,
    /// Payload bytes moved.
    pub bytes: u64,
    /// From `Begin` accepted to the report, on the receiver.
    pub seconds: f64,
    pub gbps: f64,
    /// How it ended; `committed` for an update the receiver now holds.
    #[serde(default)]
    pub outcome: UpdateOutcome,
    /// The version was committed and every tensor written was compared with the sender's digest
    /// and matched. False for an update committed on the receiver's digests alone (CUDA IPC
    /// without sender digests: `sender_digests` false), which is committed but not verified.
    pub verified: bool,
    pub tensors: usize,
    pub buckets: usize,
    /// Delta mode: tensors left alone because their digest did not change, and their bytes.
    pub skipped_tensors: usize,
    pub bytes_saved: u64,
    /// Tensors whose digest differed from the sender's.
    pub mismatched: Vec<String>,
    /// Tensors whose bytes may no longer match `committed` (after a failure).
    pub dirty: Vec<String>,
    pub error: Option<String>,
    /// Seconds spent unpacking and digesting, of `seconds`.
    pub unpack_seconds: f64,
    /// The receiver process's peak resident memory so far (Linux VmHWM), when known.
    pub receiver_peak_rss: Option<u64>,
    /// CUDA IPC: allocations of the sender opened for this update (0 once mappings are warm).
    #[serde(default)]
    pub ipc_opens: u64,
    /// CUDA IPC: whether the sender digested its own memory for this side to compare with
    /// (else this side's digests of what it wrote were recorded as they are).
    #[serde(default)]
    pub sender_digests: bool,
    /// CUDA IPC: whether the sources were on the receiver's own GPU.
    #[serde(default)]
    pub same_gpu: Option<bool>,
    /// GPU memory the update held beyond the tensors (descriptors, chunk digests).
    #[serde(default)]
    pub device_extra_bytes: u64,
    /// Kernel launches of the update.
    #[serde(default)]
    pub launches: usize,
    /// A source in the receiver's process (a checkpoint): whether it was read from its files,
    /// being mostly out of the page cache, rather than copied from its maps.
    #[serde(default)]
    pub read_from_disk: bool,
    /// NCCL: the ranks of the communicator the update came through, the trainer and every
    /// receiver one broadcast fed (a fan-out class); 0 for other transports.
    #[serde(default)]
    pub nccl_ranks: u32,
    /// A streaming receiver: where the update's time went, per step of a bucket (None for a
    /// receiver that takes updates in place). Boxed: reports travel in enums of small variants.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_timing: Option<Box<StreamTiming>>,
}

/// Where a streamed update's time went: seconds summed over its buckets, per step, on the
/// connection's thread and on the engine's. Each step is timed with one clock read at either
/// end, so the sum is cheap (a few per bucket) and `seconds` less the steps is the time in
/// none of them (a host transport's reads, the loop itself).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamTiming {
    /// The connection's thread, from the update's first bucket to its end.
    pub seconds: f64,
    /// Buckets verified and handed to the engine.
    pub buckets: usize,
    /// Waiting for the engine to give back the bucket whose buffer the next one writes.
    pub buffer_wait_seconds: f64,
    /// CUDA IPC: queueing a bucket's pull on the GPU.
    pub launch_seconds: f64,
    /// CUDA IPC: waiting for the GPU to finish a bucket's pull and digests.
    pub gpu_wait_seconds: f64,
    /// Host transports and local sources: writing a bucket into the ring and digesting it.
    pub write_seconds: f64,
    /// Comparing a bucket's digests with the sender's and handing it over.
    pub hand_over_seconds: f64,
    /// Waiting for the sender's digests (CUDA IPC with sender digests: its `Digests` parts
    /// before the hand-overs that need them) and its `End`.
    pub end_wait_seconds: f64,
    /// After the last bucket: waiting for the engine to give it back.
    pub last_given_back_seconds: f64,
    /// The engine's thread: buckets it took.
    pub engine_buckets: usize,
    /// The engine's thread: waiting for each bucket to be handed to it, summed.
    pub engine_wait_seconds: f64,
    /// Of `engine_wait_seconds`, the first bucket's (which also waits out the update's setup).
    pub engine_first_wait_seconds: f64,
}

impl UpdateReport {
    /// Whether the receiver holds this update now (verified or not).
    pub fn is_committed(&self) -> bool {
        self.outcome == UpdateOutcome::Committed
    }
}

/// The calling process's peak resident set size, from /proc (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// This host's CPU model name (Linux), for benchmark records.
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Today's date (UTC) as YYYY-MM-DD, for benchmark records.
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}
