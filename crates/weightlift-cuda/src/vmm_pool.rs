//! The device side of the tagged memory pool ([`weightlift_core::pool`]) over CUDA's virtual
//! memory management: address ranges (`cuMemAddressReserve`), physical memory (`cuMemCreate`,
//! released with its RAII owner), mappings with access (`cuMemMap`, `cuMemSetAccess`), pinned
//! host staging (`cuMemHostAlloc`, owned) and copies queued on a stream of the pool's own.

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys::{
    self, CUdeviceptr, CUmemAllocationGranularity_flags, CUmemAllocationHandleType, CUmemAllocationProp,
};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use weightlift_core::pool::{Backend, TaggedPool};

use crate::error::{Call, CudaError};
use crate::gpu::Gpu;
use crate::vmm::{allocation_granularity, check, grant_access, pinned_prop, PhysicalMemory};

/// Pinned device memory on `ordinal`, not shared with other processes.
fn private_prop(ordinal: usize) -> CUmemAllocationProp {
    pinned_prop(ordinal, CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE)
}

/// Page-locked host memory from `cuMemHostAlloc`; freed when dropped.
pub struct PinnedHost {
    ctx: Arc<CudaContext>,
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the pointer is owned exclusively by this value (nothing else frees or aliases it),
// and pinned host memory may be used and freed from any thread of the process.
unsafe impl Send for PinnedHost {}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by cuMemHostAlloc, freed exactly once, here; the pool waits for
        // every queued copy before staging can be dropped.
        let _ = unsafe { sys::cuMemFreeHost(self.ptr) };
    }
}

impl PinnedHost {
    /// `len` bytes of page-locked host memory for `ctx`'s copies.
    pub(crate) fn alloc(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHost, CudaError> {
        ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let mut ptr = std::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; flags 0 (one context uses it).
        check(unsafe { sys::cuMemHostAlloc(&mut ptr, len, 0) }, "cuMemHostAlloc")?;
        Ok(PinnedHost { ctx: ctx.clone(), ptr, len })
    }

    /// Where a copy may write `bytes` bytes at `at`, checked to lie inside.
    pub(crate) fn at_mut(&mut self, at: u64, bytes: u64) -> Result<*mut u8, CudaError> {
        self.at(at, bytes)
    }

    /// The first `len` bytes.
    ///
    /// # Safety
    ///
    /// No copy into this memory is in flight.
    pub(crate) unsafe fn bytes(&self, len: usize) -> Result<&[u8], CudaError> {
        let start = self.at(0, len as u64)?;
        // SAFETY: the range lies inside the allocation (checked by `at`), which lives as long
        // as `self`; the caller guarantees nothing writes it meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(start, len) })
    }

    /// The address of `staging[at..at + bytes]`, checked to lie inside.
    fn at(&self, at: u64, bytes: u64) -> Result<*mut u8, CudaError> {
        if at.checked_add(bytes).is_none_or(|end| end > self.len as u64) {
            return Err(CudaError::Invalid(format!("{bytes} bytes at {at} overrun {} bytes of staging", self.len)));
        }
        // SAFETY: `at` lies inside the allocation (checked just above).
        Ok(unsafe { self.ptr.cast::<u8>().add(at as usize) })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The pool's view of one GPU.
pub struct VmmDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    ordinal: usize,
    granularity: u64,
    /// Calls and time spent per driver call, since the pool was made (where pauses and
    /// resumes spend their time).
    times: BTreeMap<&'static str, (u64, Duration)>,
}

/// A tagged memory pool on one GPU.
pub type GpuPool = TaggedPool<VmmDevice>;

impl Gpu {
    /// A tagged memory pool on this GPU, mapping chunks of `chunk_bytes` (rounded up to the
    /// allocation granularity). Pools are independent: a process may hold several.
    pub fn tagged_pool(&self, chunk_bytes: u64) -> Result<GpuPool, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let granularity = allocation_granularity(
            &private_prop(self.ordinal()),
            CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
        )?;
        let stream = self.context().new_stream().call("cuStreamCreate")?;
        let device = VmmDevice {
            ctx: self.context().clone(),
            stream,
            ordinal: self.ordinal(),
            granularity: granularity as u64,
            times: BTreeMap::new(),
        };
        Ok(TaggedPool::new(device, chunk_bytes))
    }
}

impl VmmDevice {
    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")
    }

    fn note(&mut self, call: &'static str, started: Instant) {
        let entry = self.times.entry(call).or_default();
        entry.0 += 1;
        entry.1 += started.elapsed();
    }

    /// (driver call, calls, total time) since the pool was made, by call name.
    pub fn driver_times(&self) -> Vec<(&'static str, u64, Duration)> {
        self.times.iter().map(|(&call, &(calls, time))| (call, calls, time)).collect()
    }
}

impl Backend for VmmDevice {
    type Error = CudaError;
    type Physical = PhysicalMemory;
    type Staging = PinnedHost;
    type Mark = CudaEvent;

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn reserve(&mut self, bytes: u64) -> Result<u64, CudaError> {
        self.bind()?;
        let mut va: CUdeviceptr = 0;
        let started = Instant::now();
        // SAFETY: `va` is a valid out-pointer; the size is a multiple of the granularity (the
        // pool's contract); alignment 0 is the default, address 0 lets the driver choose.
        let reserved =
            check(unsafe { sys::cuMemAddressReserve(&mut va, bytes as usize, 0, 0, 0) }, "cuMemAddressReserve");
        self.note("cuMemAddressReserve", started);
        reserved.map(|()| va)
    }

    fn free_range(&mut self, va: u64, bytes: u64) {
        let _ = self.bind();
        // SAFETY: the pool frees each range it reserved once, with its size, after unmapping it.
        let _ = unsafe { sys::cuMemAddressFree(va, bytes as usize) };
    }

    fn create(&mut self, bytes: u64) -> Result<PhysicalMemory, CudaError> {
        self.bind()?;
        let started = Instant::now();
        let created = PhysicalMemory::create(&self.ctx, bytes as usize, &private_prop(self.ordinal));
        self.note("cuMemCreate", started);
        created
    }

    fn release(&mut self, physical: PhysicalMemory) {
        let started = Instant::now();
        drop(physical);
        self.note("cuMemRelease", started);
    }

    fn map(&mut self, va: u64, bytes: u64, physical: &PhysicalMemory) -> Result<(), CudaError> {
        self.bind()?;
        let started = Instant::now();
        // SAFETY: [va, va + bytes) lies in a range the pool reserved and holds no mapping (the
        // pool maps each chunk once between unmaps); the handle is live and `bytes` long.
        let mapped = check(unsafe { sys::cuMemMap(va, bytes as usize, 0, physical.handle, 0) }, "cuMemMap");
        self.note("cuMemMap", started);
        mapped
    }

    fn grant(&mut self, va: u64, bytes: u64) -> Result<(), CudaError> {
        self.bind()?;
        let started = Instant::now();
        // The pool grants only ranges it has fully mapped, within one reservation.
        let granted = grant_access(va, bytes as usize, self.ordinal);
        self.note("cuMemSetAccess", started);
        granted
    }

    fn unmap(&mut self, va: u64, bytes: u64) {
        let _ = self.bind();
        let started = Instant::now();
        // SAFETY: the pool unmaps exactly the ranges it mapped, once each, after waiting for
        // the work that used them.
        let _ = unsafe { sys::cuMemUnmap(va, bytes as usize) };
        self.note("cuMemUnmap", started);
    }

    fn free_bytes(&mut self) -> Result<u64, CudaError> {
        self.bind()?;
        let (mut free, mut total) = (0usize, 0usize);
        let started = Instant::now();
        // SAFETY: two valid out-pointers.
        let read = check(unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) }, "cuMemGetInfo");
        self.note("cuMemGetInfo", started);
        read.map(|()| free as u64)
    }

    fn staging(&mut self, bytes: u64) -> Result<PinnedHost, CudaError> {
        self.bind()?;
        let mut ptr: *mut c_void = std::ptr::null_mut();
        let len = bytes.max(1) as usize;
        let started = Instant::now();
        // SAFETY: `ptr` is a valid out-pointer; flags 0 (portable pinned memory not needed: one
        // context uses it).
        let allocated = check(unsafe { sys::cuMemHostAlloc(&mut ptr, len, 0) }, "cuMemHostAlloc");
        self.note("cuMemHostAlloc", started);
        allocated.map(|()| PinnedHost { ctx: self.ctx.clone(), ptr, len })
    }

    fn to_host(&mut self, from: u64, staging: &mut PinnedHost, at: u64, bytes: u64) -> Result<(), CudaError> {
        let host = staging.at(at, bytes)?;
        self.bind()?;
        let started = Instant::now();
        // SAFETY: the destination lies inside the pinned allocation (checked by `at`), which
        // outlives the copy (the pool waits before dropping or reusing it); the source is a
        // live mapped allocation of the pool.
        let result = unsafe { sys::cuMemcpyDtoHAsync_v2(host.cast(), from, bytes as usize, self.stream.cu_stream()) };
        self.note("cuMemcpyDtoHAsync", started);
        check(result, "cuMemcpyDtoHAsync")
    }

    fn to_device(&mut self, staging: &PinnedHost, at: u64, to: u64, bytes: u64) -> Result<(), CudaError> {
        let host = staging.at(at, bytes)?;
        self.bind()?;
        let started = Instant::now();
        // SAFETY: the source lies inside the pinned allocation (checked by `at`), alive until
        // the copy completes (the pool waits); the destination is mapped (the pool restores
        // only after mapping).
        let result =
            unsafe { sys::cuMemcpyHtoDAsync_v2(to, host.cast_const().cast(), bytes as usize, self.stream.cu_stream()) };
        self.note("cuMemcpyHtoDAsync", started);
        check(result, "cuMemcpyHtoDAsync")
    }

    fn mark(&mut self) -> Result<CudaEvent, CudaError> {
        self.stream.record_event(None).call("cuEventRecord")
    }

    fn wait_for(&mut self, mark: &CudaEvent) -> Result<(), CudaError> {
        let started = Instant::now();
        let waited = mark.synchronize().call("cuEventSynchronize");
        self.note("cuEventSynchronize", started);
        waited
    }

    /// The whole context: the engine's streams (torch's) as well as the pool's.
    fn wait(&mut self) -> Result<(), CudaError> {
        let started = Instant::now();
        let waited = self.ctx.synchronize().call("cuCtxSynchronize");
        self.note("cuCtxSynchronize", started);
        waited
    }
}

#[cfg(test)]
mod tests {
    use weightlift_core::pool::{PoolError, TagOptions};

    use super::*;
    use crate::tests_gpu::{bytes as pattern, gpu};
    use crate::{CopyDesc, OwnedDeviceMemory};

    /// Copies `len` bytes between device addresses with the batched copy kernel.
    fn copy(gpu: &Gpu, dst: u64, src: u64, len: usize) {
        let desc = CopyDesc { src, dst, rows: 1, row_bytes: len as u64, src_stride: 0, dst_stride: 0 };
        gpu.run_copies(&gpu.prepare_copies(&[desc]).unwrap()).unwrap();
        gpu.synchronize().unwrap();
    }

    /// Writes `data` at pool address `va` (through a buffer of this GPU).
    fn write(gpu: &Gpu, va: u64, data: &[u8]) {
        let mut staging = gpu.alloc(data.len()).unwrap();
        staging.upload(data).unwrap();
        copy(gpu, va, staging.device_ptr(), data.len());
    }

    fn read(gpu: &Gpu, va: u64, len: usize) -> Vec<u8> {
        let staging = gpu.alloc(len).unwrap();
        copy(gpu, staging.device_ptr(), va, len);
        let mut out = vec![0u8; len];
        staging.download(&mut out).unwrap();
        out
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn a_paused_tag_gives_its_memory_back_and_resumes_bit_for_bit_at_the_same_addresses() {
        let gpu = gpu();
        let mut pool = gpu.tagged_pool(64 << 20).unwrap();
        pool.configure("weights", TagOptions { cpu_backup: true, keep_physical: false });
        let sizes = [1000usize, 3 << 20, 100 << 20];
        let addresses: Vec<u64> = sizes.iter().map(|&n| pool.alloc("weights", n as u64).unwrap()).collect();
        for (i, (&va, &n)) in addresses.iter().zip(&sizes).enumerate() {
            write(&gpu, va, &pattern(n, i as u64 + 1));
        }
        let mapped = pool.stats()[0].mapped_bytes;
        let (free_before, _) = gpu.memory_info().unwrap();
        for cycle in 0..10 {
            pool.pause("weights").unwrap();
            let (free_paused, _) = gpu.memory_info().unwrap();
            assert!(free_paused as u64 >= free_before as u64 + mapped, "cycle {cycle}: the memory was not released");
            pool.resume("weights").unwrap();
            for (i, (&va, &n)) in addresses.iter().zip(&sizes).enumerate() {
                assert!(read(&gpu, va, n) == pattern(n, i as u64 + 1), "cycle {cycle}: allocation {i} differs");
            }
            let (free_after, _) = gpu.memory_info().unwrap();
            assert_eq!(free_after, free_before, "cycle {cycle}: device memory leaked or grew");
        }
        // The two chunks lie side by side: each resume maps them from one physical allocation
        // and grants access to both in one call.
        let calls = |pool: &GpuPool, call| pool.backend().driver_times().iter().find(|t| t.0 == call).map(|t| t.1);
        let before = (calls(&pool, "cuMemSetAccess").unwrap(), calls(&pool, "cuMemCreate").unwrap());
        pool.pause("weights").unwrap();
        pool.resume("weights").unwrap();
        assert_eq!(calls(&pool, "cuMemSetAccess"), Some(before.0 + 1));
        assert_eq!(calls(&pool, "cuMemCreate"), Some(before.1 + 1));
        assert_eq!(pool.stats()[0].physical_allocations, 1);
        for va in addresses {
            pool.free(va).unwrap();
        }
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn pool_memory_is_located_and_filled_in_place_but_not_exportable() {
        let gpu = gpu();
        let mut pool = gpu.tagged_pool(4 << 20).unwrap();
        // Two chunks side by side after a resume: one physical allocation under both.
        let a = pool.alloc("weights", 4 << 20).unwrap();
        let b = pool.alloc("weights", 4 << 20).unwrap();
        assert_eq!(b, a + (4 << 20));
        pool.pause("weights").unwrap();
        pool.resume("weights").unwrap();
        let (segments, _) = gpu.locate(&[(a + 100, (8 << 20) - 100)]).unwrap_or_else(|e| panic!("{e}"));
        let crate::Sharing::Vmm { pieces } = &segments[0].sharing else { panic!("{segments:?}") };
        assert!(pieces.iter().all(|p| !p.exportable), "{pieces:?}");
        gpu.fill_region(a + 100, (8 << 20) - 100, 7).unwrap();
        gpu.synchronize().unwrap();
        assert!(read(&gpu, a + 100, (8 << 20) - 100).iter().all(|&x| x == 7));
        pool.free(a).unwrap();
        pool.free(b).unwrap();
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn a_resume_that_cannot_fit_fails_and_succeeds_once_memory_is_freed() {
        let gpu = gpu();
        let mut pool = gpu.tagged_pool(256 << 20).unwrap();
        let va = pool.alloc("kv_cache", 1 << 30).unwrap();
        pool.pause("kv_cache").unwrap();
        // Take nearly all free memory elsewhere.
        let (free, _) = gpu.memory_info().unwrap();
        let squatter = gpu.alloc(free - (512 << 20)).unwrap();
        match pool.resume("kv_cache") {
            Err(PoolError::NotEnoughMemory { needed, free, .. }) => assert!(needed > free, "{needed} vs {free}"),
            other => panic!("expected NotEnoughMemory, got {other:?}"),
        }
        assert_eq!(pool.is_paused("kv_cache"), Some(true));
        drop(squatter);
        pool.resume("kv_cache").unwrap();
        pool.free(va).unwrap();
    }
}
