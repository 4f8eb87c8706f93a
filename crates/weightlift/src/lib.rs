//! weightlift: move freshly trained weights from RL trainers into inference engines.
//!
//! The planning core lives in [`weightlift_core`] (re-exported as [`core`]); this crate adds
//! sources on disk ([`safetensors_dir`]) and the setup shared by the CLI's commands
//! ([`setup`]).

pub use weightlift_core as core;

pub mod safetensors_dir;
pub mod setup;
