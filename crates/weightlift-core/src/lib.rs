//! weightlift-core: the pure planning core of weightlift (no GPU, no I/O).
//!
//! Given the tensors a trainer holds ([`SourceSet`]), the parameters one engine rank holds
//! ([`Manifest`]) and declarative name-mapping [`rules`], [`plan()`] produces the copy
//! operations for that rank and proves they write every destination byte exactly once.
//! [`buckets`] groups a plan's operations into bounded transfers, [`exec`] runs them on host
//! buffers, [`stream_layout`] places a streaming receiver's tensors in its ring, [`digest`] defines the checksum both sides compute, [`version`] the update
//! state machine of a receiver, and [`waves_of`] and [`WaveFolds`] schedule digests and
//! fused copies on a GPU.

pub mod bucket;
pub mod cluster;
pub mod digest;
pub mod dtype;
pub mod exec;
pub mod layout;
pub mod models;
pub mod pattern;
pub mod plan;
pub mod pool;
pub mod presets;
pub mod quant;
pub mod region;
pub mod rules;
mod schedule;
pub mod spec;
mod stream;
pub mod version;

pub use bucket::{buckets, pieces, whole_tensor_buckets, Bucket, BucketEntry, BucketError, DEFAULT_BUCKET_BYTES};
pub use dtype::{Cast, DType};
pub use layout::{Block, LayoutError, Split, TpRank};
pub use models::{synthetic, ModelConfig, SYNTHETIC_MODELS};
pub use pattern::Pattern;
pub use plan::{
    destination_manifest, plan, CopyOp, Placement, Plan, PlanError, PlanSummary, Problem, SourcePiece, SourceSet,
    StoredPlanError,
};
pub use presets::{HeadCounts, Module, Preset, PresetOptions};
pub use rules::{Rule, RuleError, RuleSet};
pub use schedule::{
    by_fold, fold_groups, prefix, tensor_of, update_order, waves, waves_of, Fold, ScheduleError, WaveFolds, WaveOrder,
    EARLY_FOLD_CHUNKS, WAVE_CHUNKS,
};
pub use spec::{Manifest, ManifestError, TensorSpec};
pub use stream::{stream_layout, Place, StreamBuffer, StreamError, StreamLayout, STREAM_ALIGN};
pub use version::{Phase, Version, VersionError, VersionState};
