//! weightlift: move freshly trained weights from RL trainers into inference engines.
//!
//! The planning core lives in [`weightlift_core`] (re-exported as [`core`]); this crate adds
//! the host data plane (a [`Sender`] on the trainer side, a [`Receiver`] on the engine side, a
//! framed [`protocol`] and two [`transport`]s), sources on disk ([`safetensors_dir`]) and the
//! setup shared by the CLI's commands ([`setup`]).

pub use weightlift_core as core;

pub mod agent;
pub mod cuda_ipc;
pub mod device_sources;
pub mod device_writes;
pub mod fd_pass;
pub mod gpu;
pub mod memory;
pub mod net;
pub mod protocol;
pub mod receiver;
pub mod report;
pub mod safetensors_dir;
pub mod sender;
pub mod session;
pub mod setup;
pub mod staged;
pub mod tensors;
pub mod trainer;
pub mod transport;
pub mod update;

pub use net::Endpoint;
pub use protocol::TransportKind;
pub use receiver::{Receiver, ReceiverOptions};
pub use report::{UpdateOutcome, UpdateReport};
pub use sender::{Fault, ReceiverState, SendError, Sender, SenderOptions, Vote};
pub use session::Token;
pub use tensors::{CheckpointTensors, DestinationTensors, HostTensors, SourceTensors};
pub use trainer::{StepReport, Trainer};
