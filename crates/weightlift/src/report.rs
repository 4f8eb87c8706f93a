//! What one update did, as the receiver saw it.

use serde::{Deserialize, Serialize};
use weightlift_core::Version;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateReport {
    /// The version the update carried.
    pub version: Version,
    /// The version the receiver holds afterwards: `version` if committed, else the previous one.
    pub committed: Version,
    /// Payload bytes moved.
    pub bytes: u64,
    /// From `Begin` accepted to the report, on the receiver.
    pub seconds: f64,
    pub gbps: f64,
    /// Every tensor written matched the sender's digest and the version was committed.
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
}

/// The calling process's peak resident set size, from /proc (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
