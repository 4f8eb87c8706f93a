//! The HTTP API's request and response bodies, with their OpenAPI schemas.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::report::UpdateReport;

/// `{"error": {"code", "message"}}`: every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable reason: `malformed_json`, `invalid_request`, `unauthorized`,
    /// `payload_too_large`, `busy`, `stale_version`, `paused`, `not_found`, `bad_checkpoint`,
    /// `plan_error`, `update_failed`, `fetch_failed`, `deadline_exceeded`, `no_snapshot`,
    /// `not_implemented`, ...
    pub code: String,
    /// What went wrong, naming the tensors, versions, paths or tags involved.
    pub message: String,
    /// The update's report, when an update was attempted and not committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<UpdateReport>,
}

/// `POST /update_weights`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateWeightsRequest {
    /// The version to update to, in decimal; it must be above the committed one.
    #[schema(pattern = "^[0-9]{1,20}$", example = "7")]
    pub version: String,
    pub source: UpdateSource,
    #[serde(default)]
    pub transfer_mode: TransferMode,
}

/// Where the new weights come from.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum UpdateSource {
    /// A checkpoint directory (safetensors files and config.json) readable by the engine.
    Disk(String),
    /// A sender waiting for receivers (`weightlift push --listen ADDR`), as `unix:/path` or
    /// `tcp://host:port`: the engine connects and takes the version from it.
    Sender(String),
}

/// How the bytes travel from a sender: `auto` takes what the sender offers; the others
/// refuse a sender that offers anything else. Checkpoints on disk are read in place (`auto`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransferMode {
    #[default]
    Auto,
    Shm,
    Tcp,
    Ipc,
    /// GPU to GPU on any host over NCCL: the engine connects to the trainer (`source.sender`,
    /// the trainer's address to join, as SGLang's `init_weights_update_group` takes the
    /// master's), and the trainer names the communicator on that connection.
    Nccl,
}

/// `POST /weights_checker`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckerRequest {
    pub action: CheckerAction,
}

/// `snapshot` keeps each tensor's digest (never a copy of the weights); `compare` recomputes
/// and lists the tensors that differ from the snapshot; `reset` overwrites every weight with
/// random bytes (for tests: the next update must rewrite everything); `checksum` returns the
/// digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckerAction {
    Snapshot,
    Compare,
    Reset,
    Checksum,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckerResponse {
    /// `compare`: whether every tensor matches the snapshot; else whether the action ran.
    pub success: bool,
    pub action: String,
    /// Tensors digested, snapshotted or reset.
    pub tensors: usize,
    /// `compare`: tensors whose digest differs from the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatched: Option<Vec<String>>,
    /// `checksum`: each tensor's digest, as 16 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksums: Option<BTreeMap<String, String>>,
}

/// `POST /release_memory_occupation`, `POST /resume_memory_occupation`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemoryRequest {
    /// Tags such as `weights`, `kv_cache`, `cuda_graph`; none or empty means every tag.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MemoryResponse {
    pub success: bool,
    /// Bytes paused per tag after the call (0 for active tags).
    pub paused_bytes: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    pub status: String,
}

/// `GET /version`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VersionResponse {
    /// The committed weight version.
    pub version: u64,
    /// Whether some tensors may not hold the committed version's bytes (after a failed update
    /// or a checker reset).
    pub dirty: bool,
    pub dirty_tensors: Vec<String>,
    /// The version being updated right now, if any: from the moment the agent takes an
    /// update (before it reads the source) or the receiver begins one, until it settles.
    pub in_flight: Option<u64>,
}
