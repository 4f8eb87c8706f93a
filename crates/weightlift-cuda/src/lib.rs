//! The one crate of weightlift that holds `unsafe` code.
//!
//! Every other crate of the project is free of `unsafe`; whatever needs it lives here, behind safe
//! APIs, and each `unsafe` block carries a `// SAFETY:` comment saying why it is sound (the lint
//! below enforces the comment). CUDA driver access (pinning and registering host memory, device
//! copies) will come here; for now the crate holds the host memory mappings the data plane uses:
//!
//! - [`SharedMemory`]: a region under `/dev/shm` shared between the processes of one host, through
//!   which weights travel from a trainer to an inference engine.
//! - [`MappedFile`]: a read-only map of a whole file, so checkpoint tensors are read straight from
//!   the page cache.
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod host_map;

pub use host_map::{MapError, MappedFile, SharedMemory};
