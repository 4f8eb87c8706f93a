//! The one crate of weightlift that holds `unsafe` code.
//!
//! Every other crate of the project is free of `unsafe`; whatever needs it lives here, behind safe
//! APIs, and each `unsafe` block carries a `// SAFETY:` comment saying why it is sound (the lint
//! below enforces the comment). It holds:
//!
//! - [`Gpu`]: one GPU's context and stream, device memory ([`DeviceBuffer`]), and weightlift's
//!   kernels compiled with NVRTC at run time: batched strided copies ([`CopyBatch`]) and
//!   digests of device memory ([`DigestBatch`]) that match the CPU digest bit for bit. The
//!   driver and NVRTC are loaded at run time: on a machine without them every entry point
//!   returns [`CudaError::NoDriver`] or [`CudaError::NoNvrtc`], never a panic.
//! - [`SharedMemory`]: a region under `/dev/shm` shared between the processes of one host, through
//!   which weights travel from a trainer to an inference engine.
//! - [`MappedFile`]: a read-only map of a whole file, so checkpoint tensors are read straight from
//!   the page cache.
//! - [`FileReader`]: large positional reads of a file, `O_DIRECT` where the filesystem takes it,
//!   for cold checkpoints; [`cufile_available`] and [`CuFileReader`]: GPUDirect Storage through
//!   cuFile, loaded at run time, reading files straight into device memory.
//! - [`nccl_available`], [`Comm`]: NCCL, loaded at run time, non-blocking communicators with
//!   deadlines (broadcast, grouped sends and receives).
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod cufile;
mod dynlib;
pub mod error;
pub mod file_read;
pub mod gpu;
pub mod host_copy;
pub mod host_map;
pub mod ipc;
pub mod kernels;
pub mod nccl;
pub mod vmm;
pub mod vmm_pool;

pub use cufile::{cufile_available, CuFileError, CuFileInfo, CuFileReader};
pub use error::CudaError;
pub use file_read::{
    drop_cached, resident_bytes, resident_share, sequential_read_rate, AlignedBuffer, FileReader, ReadError, ReadMode,
    SequentialRead, DIRECT_ALIGN, SEQUENTIAL_CHUNK,
};
pub use gpu::{device_count, driver_present, DeviceBuffer, Gpu, HostRegistration, Lane, Mark, OwnedDeviceMemory};
pub use host_copy::PinnedRanges;
pub use host_map::{MapError, MappedFile, SharedMemory};
pub use ipc::{ordinal_with_uuid, IpcMapping, Located, Piece, Segment, Sharing, IPC_HANDLE_BYTES};
pub use kernels::{
    CastDesc, ChunkDigester, CopyBatch, CopyDesc, DigestBatch, FusedKernel, FusedRun, LaunchedUpdate, QuantBatch,
    QuantDesc, SourceGpu, UpdateBatch, Wave, CHUNK_BYTES,
};
pub use nccl::{nccl_available, BucketStep, Comm, Move, NcclError, NcclInfo, UniqueId, NCCL_PATH_ENV};
pub use vmm::{ImportedAllocation, MappedPieces, PhysicalMemory, SharedAllocation, SharedPieces};
pub use vmm_pool::{GpuPool, PinnedHost, VmmDevice};
// Scheduling lives in weightlift-core; re-exported for the kernels' callers, as before.
pub use weightlift_core::{waves, waves_of, WaveOrder, WAVE_CHUNKS};

#[cfg(test)]
mod tests_gpu;
