//! weightlift: move freshly trained weights from RL trainers into inference engines.
//!
//! The planning core lives in [`weightlift_core`] (re-exported as [`core`]); this crate adds
//! the data plane that carries a plan's bytes and the pieces around it.
//!
//! Its modules are private. What the CLI, the Python bindings and the integration tests use is
//! re-exported here, flat at the crate root, in these groups:
//!
//! - sending updates: [`Sender`] on the trainer side, its [`SenderOptions`], [`Fault`]s and
//!   [`SendError`], and the synthetic [`Trainer`] that steps a model like an optimizer;
//! - taking updates: [`Receiver`] on the engine side and the [`UpdateReport`] of each update;
//!   a streaming receiver ([`Receiver::streaming`]) lands them in a ring ([`StreamPlan`])
//!   and hands each tensor to the engine's loader through its [`Handoff`];
//! - the tensors updated from and into: [`SourceTensors`] and [`DestinationTensors`] in host
//!   memory ([`HostTensors`]), checkpoints on disk ([`CheckpointTensors`]) and GPU memory
//!   ([`GpuTensors`], any [`DeviceTensors`] shared over CUDA IPC);
//! - connecting the two: [`Endpoint`]s, [`TransportKind`]s, the shared [`Token`];
//! - the HTTP API an engine serves on its receiver ([`Agent`]) and the tagged GPU memory it
//!   releases and resumes ([`MemoryPool`], [`MemoryControl`]);
//! - setting up a run: [`ModelSource`], [`MappingOptions`], [`PlanInputs`];
//! - helpers for checkpoints and benchmark reports ([`write_file`], [`cpu_name`], [`today`]).
//!
//! The rest (the wire messages, the transports, packing and digesting buckets, staging on the
//! device) is an implementation detail, free to change without touching this facade.

pub use weightlift_core as core;

mod agent;
mod cuda_ipc;
mod device_sources;
mod device_writes;
mod fd_pass;
mod gpu;
mod memory;
mod nccl_buckets;
mod net;
mod protocol;
mod receiver;
mod report;
mod safetensors_dir;
mod sender;
mod session;
mod setup;
mod staged;
mod tensors;
mod trainer;
mod transport;
mod update;

// Sending updates: the trainer-side sender, its options, faults and errors, the synthetic trainer.
pub use sender::{Fault, ReceiverState, SendError, Sender, SenderOptions, Sources, Vote};
pub use trainer::{StepReport, Trainer};

// Taking updates: the engine-side receiver and what each update reports.
pub use receiver::{CannotQuantize, LocalError, Receiver, ReceiverOptions};
// Streaming receivers: updates through a ring of buffers into the engine's own loader.
pub use receiver::{DeviceRing, Handoff, RingTensors, StreamFailure, StreamOptions, StreamPlan, StreamSetupError};
pub use report::{StreamTiming, UpdateOutcome, UpdateReport};

// Tensors updated from and into: host memory, checkpoints, GPU memory (shared over CUDA IPC).
pub use cuda_ipc::{next_allocation_id, DeviceTensors};
pub use gpu::{GpuPlan, GpuTensors};
pub use tensors::{fsdp_boxes, fsdp_pieces, CheckpointTensors, DestinationTensors, HostTensors, SourceTensors};

// Connecting the two sides: addresses, transports, the wire version, the token and its checks.
pub use net::{Endpoint, Listener};
pub use protocol::{ProblemNote, Shard, TransportKind, PROTOCOL_VERSION};
pub use session::{check_exposure, Token, TOKEN_ENV};
pub use transport::SOCKET_BUFFERS;

// The HTTP API an engine serves on its receiver, and the tagged GPU memory it releases.
pub use agent::{Agent, AgentOptions, MemoryControl, MemoryError, RunningAgent, WEIGHTS_TAG};
pub use memory::{guard_receiver, MemoryPool, PoolHolding, PooledTensors};

// Setting up a run (the CLI's commands): models, mappings, threads, the bucket schedule.
pub use setup::{MappingOptions, ModelSource, PlanInputs, SetupError};
pub use update::{default_threads, Schedule};

// Helpers: writing a safetensors checkpoint, naming the machine and the day in reports.
pub use report::{cpu_name, today};
pub use safetensors_dir::write_file;
