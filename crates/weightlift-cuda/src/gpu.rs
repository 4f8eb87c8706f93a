//! A GPU: its context, one stream, device memory, and weightlift's kernels compiled for it.

use std::sync::Arc;

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{result, CudaContext, CudaStream};

use crate::error::{Call, CudaError};
use crate::kernels::Kernels;

/// Whether the CUDA driver library can be loaded; checked before any driver call, because
/// cudarc's dynamic loader panics on first use when the library is missing.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda and closes it again; no CUDA call is made.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded (needed to compile the kernels).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc; no NVRTC call is made.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Number of visible GPUs; an error that says so when there is no driver.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_present() {
        return Err(CudaError::NoDriver);
    }
    result::init().call("cuInit")?;
    let n = result::device::get_count().call("cuDeviceGetCount")?;
    Ok(n as usize)
}

/// What [`Gpu::alloc`] rounds sizes of at least this much up to (torch's caching allocator
/// rounds large segments to 2 MiB too). Measured on H200 (bench/results/ipc-overheads-h200-2026-11-30.md):
/// another process pulling from a legacy IPC import of a cuMemAlloc allocation whose size is not
/// a multiple of 64 KiB is 15% slower (Qwen3-30B-A3B 38.3 ms against 33.2 ms), as if the whole
/// import were mapped with small pages. Smaller allocations keep their size: the driver packs
/// them, and an update's descriptor lists would each take 2 MiB.
pub const ALLOCATION_ROUNDING: usize = 2 << 20;

/// One of a GPU's two streams: kernels run on the main one; work that overlaps them (digest
/// folds, NCCL transfers of the next bucket) on the side one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Main,
    Side,
}

/// The point a lane had reached when [`Gpu::mark`] was called.
pub struct Mark(cudarc::driver::CudaEvent);

impl Mark {
    /// Whether the GPU ran everything before the mark (never blocks).
    pub fn done(&self) -> Result<bool, CudaError> {
        self.0.try_is_complete().call("cuEventQuery")
    }
}

/// One GPU, ready to run weightlift's kernels on its stream.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Work that overlaps the main stream's (digest folds of an update's large tensors).
    side: Arc<CudaStream>,
    kernels: Kernels,
}

impl Gpu {
    /// Opens GPU `ordinal` (its primary context, shared with torch in the same process) and
    /// compiles the kernels for its architecture.
    pub fn open(ordinal: usize) -> Result<Gpu, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        if !nvrtc_present() {
            return Err(CudaError::NoNvrtc);
        }
        let ctx = CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        let stream = ctx.new_stream().call("cuStreamCreate")?;
        let side = ctx.new_stream().call("cuStreamCreate")?;
        let kernels = Kernels::compile(&ctx)?;
        Ok(Gpu { ctx, stream, side, kernels })
    }

    /// This GPU with streams of its own, the context and compiled kernels shared: for a
    /// sender and a receiver in one process, whose work would otherwise queue behind each
    /// other's on one stream (in two processes each has its own anyway).
    pub fn with_own_streams(&self) -> Result<Gpu, CudaError> {
        let stream = self.ctx.new_stream().call("cuStreamCreate")?;
        let side = self.ctx.new_stream().call("cuStreamCreate")?;
        Ok(Gpu { ctx: self.ctx.clone(), stream, side, kernels: self.kernels.clone() })
    }

    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub fn name(&self) -> Result<String, CudaError> {
        self.ctx.name().call("cuDeviceGetName")
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn side_stream(&self) -> &Arc<CudaStream> {
        &self.side
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub(crate) fn lane(&self, lane: Lane) -> &Arc<CudaStream> {
        match lane {
            Lane::Main => &self.stream,
            Lane::Side => &self.side,
        }
    }

    /// A mark of everything queued on `lane` so far, to wait for on the other lane or on the
    /// host.
    pub fn mark(&self, lane: Lane) -> Result<Mark, CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        Ok(Mark(self.lane(lane).record_event(None).call("cuEventRecord")?))
    }

    /// Makes work queued on `lane` from now on wait for `mark` (the GPU waits, not the host).
    pub fn wait_mark(&self, lane: Lane, mark: &Mark) -> Result<(), CudaError> {
        self.lane(lane).wait(&mark.0).call("cuStreamWaitEvent")
    }

    /// Free and total device memory, in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        result::mem_get_info().call("cuMemGetInfo")
    }

    /// Device memory from cuMemAlloc (so it can later be shared through CUDA IPC); a large
    /// size is rounded up as torch's caching allocator rounds ([`ALLOCATION_ROUNDING`]).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer, CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let allocated = match bytes {
            0 => 1,
            b if b >= ALLOCATION_ROUNDING => b.next_multiple_of(ALLOCATION_ROUNDING),
            b => b,
        };
        // SAFETY: a plain allocation in the current (just bound) context; the pointer is owned
        // by the returned buffer and freed exactly once in its Drop.
        let ptr = unsafe { result::malloc_sync(allocated) }.call("cuMemAlloc")?;
        Ok(DeviceBuffer { ptr, len: bytes, allocated, ctx: self.ctx.clone() })
    }

    /// Waits for everything queued on this GPU's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().call("cuStreamSynchronize")
    }

    /// Waits for all work on this GPU in this process, on every stream (torch's included), so
    /// memory another library wrote is complete before weightlift reads it.
    pub fn synchronize_device(&self) -> Result<(), CudaError> {
        self.ctx.synchronize().call("cuCtxSynchronize")
    }

    /// Sets `len` bytes at `ptr` to `value`: memory this process allocated some other way (a
    /// torch tensor), queued on this GPU's stream ([`Gpu::synchronize`] waits for it). The
    /// range must lie inside live memory of this GPU (one allocation, or VMM mappings side by side), which is checked, so a bad
    /// address is an error, not a stray write.
    pub fn fill_region(&self, ptr: u64, len: u64, value: u8) -> Result<(), CudaError> {
        if len == 0 {
            return Ok(());
        }
        self.locate(&[(ptr, len)])?;
        // SAFETY: the range lies inside live memory of this context (checked above); the
        // caller owns what it holds, as for any write it asks for.
        unsafe { result::memset_d8_async(ptr, value, len as usize, self.stream.cu_stream()) }.call("cuMemsetD8Async")
    }

    /// Copies `src` from the host to `ptr` and waits: memory this process allocated some other
    /// way (a pool's). The range must lie inside live memory of this GPU, which is checked, as
    /// for [`Gpu::fill_region`].
    pub fn upload_region(&self, ptr: u64, src: &[u8]) -> Result<(), CudaError> {
        if src.is_empty() {
            return Ok(());
        }
        self.locate(&[(ptr, src.len() as u64)])?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `src` is a valid host slice and the device range lies inside live memory of
        // this context (checked above); the caller owns what it holds.
        unsafe { result::memcpy_htod_sync(ptr, src) }.call("cuMemcpyHtoD")
    }

    /// Copies `bytes` from `src` to `dst` on this GPU's stream (the copy-engine ceiling).
    pub fn copy(&self, dst: &mut DeviceBuffer, src: &DeviceBuffer, bytes: usize) -> Result<(), CudaError> {
        fits(0, bytes, src.len)?;
        fits(0, bytes, dst.len)?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: both ranges lie inside live allocations of this context (checked above).
        unsafe { result::memcpy_dtod_async(dst.ptr, src.ptr, bytes, self.stream.cu_stream()) }.call("cuMemcpyDtoDAsync")
    }
}

impl Gpu {
    /// Lets this GPU's kernels and copies reach `peer`'s memory directly (NVLink); a no-op when
    /// already enabled.
    pub fn enable_peer_access(&self, peer: &Gpu) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: both contexts are live (owned by the two Gpus); flags must be 0.
        let result = unsafe { cudarc::driver::sys::cuCtxEnablePeerAccess(peer.ctx.cu_ctx(), 0) };
        match result {
            cudarc::driver::sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
            other => other.result().call("cuCtxEnablePeerAccess"),
        }
    }

    /// Copies `bytes` from `src` (on this GPU) to `dst` (on another) with the copy engines, on
    /// this GPU's stream: the peer-copy ceiling.
    pub fn copy_to_peer(&self, dst: &mut DeviceBuffer, src: &DeviceBuffer, bytes: usize) -> Result<(), CudaError> {
        fits(0, bytes, src.len)?;
        fits(0, bytes, dst.len)?;
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: both ranges lie inside live allocations of their contexts (checked above).
        unsafe {
            result::memcpy_peer_async(
                dst.ctx.cu_ctx(),
                dst.ptr,
                src.ctx.cu_ctx(),
                src.ptr,
                bytes,
                self.stream.cu_stream(),
            )
        }
        .call("cuMemcpyPeerAsync")
    }
}

impl Gpu {
    /// Page-locks `memory` for this GPU's copies (cuMemHostRegister) until the returned value
    /// is dropped: copies from it then run at the pinned rate, not through the driver's
    /// bounce buffers. Only a hint: copies from `memory` are correct without it, and memory
    /// freed while registered stays locked by the driver, never reached through the
    /// registration.
    pub fn register_host(&self, memory: &[u8]) -> Result<HostRegistration, CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let ptr = memory.as_ptr().cast_mut().cast::<std::ffi::c_void>();
        // SAFETY: `memory` is a live host range of the given length; the flags (0) ask for no
        // device mapping. The registration only locks pages; nothing is read or written
        // through it.
        unsafe { cudarc::driver::sys::cuMemHostRegister_v2(ptr, memory.len(), 0) }
            .result()
            .call("cuMemHostRegister")?;
        Ok(HostRegistration { ctx: self.ctx.clone(), ptr: ptr as usize })
    }

    /// Copies `src` from host memory to `dst` at byte `at`, queued on this GPU's stream after
    /// what is there already, and waits for this copy only: `src` may be reused on return
    /// while the work queued before it (and after it) still runs.
    pub fn copy_from_host(&self, dst: &impl OwnedDeviceMemory, at: usize, src: &[u8]) -> Result<(), CudaError> {
        let (ptr, len) = dst.range();
        fits(at, src.len(), len)?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: the destination lies inside live memory this crate owns (checked above) and
        // `src` is a live host slice, borrowed until the event below completes.
        unsafe { result::memcpy_htod_async(ptr + at as u64, src, self.stream.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        let copied = self.stream.record_event(None).call("cuEventRecord")?;
        copied.synchronize().call("cuEventSynchronize")
    }
}

/// Host memory page-locked by [`Gpu::register_host`]; unlocked when dropped.
pub struct HostRegistration {
    ctx: Arc<CudaContext>,
    ptr: usize,
}

impl HostRegistration {
    /// Takes ownership of a registration made at `ptr` in `ctx` (unregistered when dropped).
    pub(crate) fn adopt(ctx: Arc<CudaContext>, ptr: usize) -> HostRegistration {
        HostRegistration { ctx, ptr }
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` was registered by cuMemHostRegister in this context and is unregistered
        // exactly once, here.
        let _ = unsafe { cudarc::driver::sys::cuMemHostUnregister(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Device memory owned by weightlift; freed when dropped.
pub struct DeviceBuffer {
    ptr: CUdeviceptr,
    len: usize,
    /// What the driver was asked for: `len`, or more (see [`ALLOCATION_ROUNDING`]).
    allocated: usize,
    ctx: Arc<CudaContext>,
}

impl DeviceBuffer {
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Device memory the buffer takes: its length, rounded up when large.
    pub fn allocated_bytes(&self) -> usize {
        self.allocated
    }
}

impl OwnedDeviceMemory for DeviceBuffer {
    fn range(&self) -> (u64, usize) {
        (self.ptr, self.len)
    }

    fn owner(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

/// Checks that `bytes` at `offset` lie inside a buffer of `len` bytes.
fn fits(offset: usize, bytes: usize, len: usize) -> Result<(), CudaError> {
    if offset.checked_add(bytes).is_none_or(|end| end > len) {
        return Err(CudaError::Invalid(format!("{bytes} bytes at offset {offset} exceed a {len}-byte buffer")));
    }
    Ok(())
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::DeviceBuffer {}
    impl Sealed for crate::vmm::SharedAllocation {}
    impl Sealed for crate::vmm::ImportedAllocation {}
    impl Sealed for crate::vmm::SharedPieces {}
}

/// Device memory this crate allocated and owns: its whole range stays valid while borrowed,
/// which is what makes the copies below sound (sealed: only this crate's owners implement it).
pub trait OwnedDeviceMemory: sealed::Sealed {
    /// Start and length in bytes.
    fn range(&self) -> (u64, usize);
    fn owner(&self) -> &Arc<CudaContext>;

    /// Synchronous host -> device copy of all of `src` to the start of this memory.
    fn upload(&mut self, src: &[u8]) -> Result<(), CudaError> {
        self.upload_at(0, src)
    }

    /// Synchronous host -> device copy of all of `src` to byte `offset` of this memory.
    fn upload_at(&mut self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        let (ptr, len) = self.range();
        fits(offset, src.len(), len)?;
        self.owner().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `src` is a valid host slice and the destination range lies inside this memory.
        unsafe { result::memcpy_htod_sync(ptr + offset as u64, src) }.call("cuMemcpyHtoD")
    }

    /// Sets every byte to `value` (queued on `gpu`'s stream).
    fn fill(&mut self, gpu: &Gpu, value: u8) -> Result<(), CudaError> {
        let (ptr, len) = self.range();
        self.owner().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: the range is exactly this live memory.
        unsafe { result::memset_d8_async(ptr, value, len, gpu.stream().cu_stream()) }.call("cuMemsetD8Async")
    }

    /// Synchronous device -> host copy of the start of this memory into all of `dst`.
    fn download(&self, dst: &mut [u8]) -> Result<(), CudaError> {
        self.download_at(0, dst)
    }

    /// Synchronous device -> host copy from byte `offset` of this memory into all of `dst`.
    fn download_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        let (ptr, len) = self.range();
        fits(offset, dst.len(), len)?;
        self.owner().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `dst` is a valid host slice and the source range lies inside this memory.
        unsafe { result::memcpy_dtoh_sync(dst, ptr + offset as u64) }.call("cuMemcpyDtoH")
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the pointer came from cuMemAlloc in this context and is freed only here.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

// SAFETY: a device pointer is a plain address valid in every thread once the context is bound,
// which every method does before using it.
unsafe impl Send for DeviceBuffer {}
// SAFETY: shared references only read the pointer and length.
unsafe impl Sync for DeviceBuffer {}
