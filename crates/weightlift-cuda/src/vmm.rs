//! Device memory shareable between processes (and GPUs) through the CUDA virtual memory
//! management API, with POSIX file descriptors as the shareable handles.
//!
//! One physical allocation ([`cuMemCreate`](sys::cuMemCreate)) per [`SharedAllocation`], mapped
//! at an address range of its own and readable and writable by the GPU that owns it. Its
//! [`export_fd`](SharedAllocation::export_fd) gives a file descriptor that another process
//! receives (over a Unix socket, SCM_RIGHTS) and maps with [`Gpu::import_shareable`]; the importer
//! may be another GPU of the host, which then reads and writes the memory over NVLink. Unlike
//! legacy CUDA IPC, a process may also import its own descriptors (the tests do).
//!
//! Sizes are rounded up to the allocation granularity (2 MiB on H100/H200): [`SharedAllocation::len`]
//! is what was asked for, [`SharedAllocation::mapped_len`] what was mapped, and the importer must
//! be told the latter.

use std::ffi::{c_int, c_void};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use cudarc::driver::sys::{
    self, CUdeviceptr, CUmemAccessDesc, CUmemAccess_flags, CUmemAllocationGranularity_flags, CUmemAllocationHandleType,
    CUmemAllocationProp, CUmemAllocationProp_st__bindgen_ty_1, CUmemAllocationType, CUmemGenericAllocationHandle,
    CUmemLocation, CUmemLocationType, CUresult,
};
use cudarc::driver::CudaContext;

use crate::error::{Call, CudaError};
use crate::gpu::Gpu;

const POSIX_FD: CUmemAllocationHandleType = CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;

/// A driver result as weightlift's error, naming the call.
pub(crate) fn check(result: CUresult, call: &'static str) -> Result<(), CudaError> {
    if result == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver { call, code: result })
    }
}

/// The location "device `ordinal`".
pub(crate) fn device_location(ordinal: usize) -> CUmemLocation {
    CUmemLocation { type_: CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: ordinal as c_int }
}

/// Properties of a pinned device allocation on device `ordinal`, shareable through
/// `handle_types` (none for memory only this process maps).
pub(crate) fn pinned_prop(ordinal: usize, handle_types: CUmemAllocationHandleType) -> CUmemAllocationProp {
    CUmemAllocationProp {
        type_: CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: handle_types,
        location: device_location(ordinal),
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// The granularity (`flag`: minimum or recommended) of allocations with `prop`, never 0; the
/// caller has bound the context.
pub(crate) fn allocation_granularity(
    prop: &CUmemAllocationProp,
    flag: CUmemAllocationGranularity_flags,
) -> Result<usize, CudaError> {
    let mut granularity: usize = 0;
    // SAFETY: both pointers are valid for the duration of the call.
    let result = unsafe { sys::cuMemGetAllocationGranularity(&mut granularity, prop, flag) };
    check(result, "cuMemGetAllocationGranularity")?;
    if granularity == 0 {
        return Err(CudaError::Invalid("cuMemGetAllocationGranularity returned 0".into()));
    }
    Ok(granularity)
}

/// A pinned device allocation on device `ordinal`, exportable as a POSIX fd.
fn shareable_prop(ordinal: usize) -> CUmemAllocationProp {
    pinned_prop(ordinal, POSIX_FD)
}

/// Grants device `ordinal` read/write access to `[ptr, ptr + size)`, one or more whole mappings
/// of one reservation (the context is bound by the caller).
pub(crate) fn grant_access(ptr: CUdeviceptr, size: usize, ordinal: usize) -> Result<(), CudaError> {
    let access = CUmemAccessDesc {
        location: device_location(ordinal),
        flags: CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    };
    // SAFETY: callers pass only ranges they have fully mapped; one access descriptor, count one.
    check(unsafe { sys::cuMemSetAccess(ptr, size, &access, 1) }, "cuMemSetAccess")
}

/// Physical device memory (made with `cuMemCreate`, imported from a file descriptor, or a
/// reference retained to another allocator's); released when dropped. Mappings made from it
/// keep the memory until they are unmapped too.
pub struct PhysicalMemory {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) handle: CUmemGenericAllocationHandle,
}

impl Drop for PhysicalMemory {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the handle came from cuMemCreate, cuMemImportFromShareableHandle or
        // cuMemRetainAllocationHandle and is released exactly once, here; the driver keeps
        // mapped memory until its last mapping goes.
        let _ = unsafe { sys::cuMemRelease(self.handle) };
    }
}

impl PhysicalMemory {
    /// `bytes` (a multiple of the granularity for `prop`) of new physical memory; the context
    /// is bound by the caller.
    pub(crate) fn create(ctx: &Arc<CudaContext>, bytes: usize, prop: &CUmemAllocationProp) -> Result<Self, CudaError> {
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` is a valid out-pointer, `prop` a fully initialised property struct,
        // flags must be 0; a size that is not a multiple of the granularity is refused.
        check(unsafe { sys::cuMemCreate(&mut handle, bytes, prop, 0) }, "cuMemCreate")?;
        Ok(PhysicalMemory { ctx: ctx.clone(), handle })
    }

    /// A new POSIX file descriptor for this memory, to send to another process (or map again
    /// in this one). Each call gives a new descriptor; closing it does not free the memory.
    pub fn export_fd(&self) -> Result<OwnedFd, CudaError> {
        self.ctx.bind_to_thread().call("cuCtxSetCurrent")?;
        let mut fd: c_int = -1;
        // SAFETY: for POSIX_FD the driver writes one int (the new descriptor) through the
        // pointer, which points at `fd`; the handle is live (owned by `self`).
        let result = unsafe {
            sys::cuMemExportToShareableHandle((&mut fd as *mut c_int).cast::<c_void>(), self.handle, POSIX_FD, 0)
        };
        check(result, "cuMemExportToShareableHandle")?;
        if fd < 0 {
            return Err(CudaError::Invalid(format!("cuMemExportToShareableHandle returned descriptor {fd}")));
        }
        // SAFETY: the driver just opened this descriptor for the caller; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

/// Physical allocations mapped side by side in one reserved range of their own (one, for
/// weightlift's shareable allocations; 20 MiB handles, as torch's expandable segments map
/// them); unmapped and unreserved when dropped.
pub struct MappedPieces {
    ctx: Arc<CudaContext>,
    ptr: CUdeviceptr,
    size: usize,
    /// (address, bytes) of each mapping made.
    mapped: Vec<(CUdeviceptr, usize)>,
}

impl Drop for MappedPieces {
    fn drop(&mut self) {
        // Tear down even if binding failed: the VMM calls below name everything explicitly.
        let _ = self.ctx.bind_to_thread();
        for &(ptr, size) in &self.mapped {
            // SAFETY: each range was mapped by `Gpu::map_pieces` and is unmapped once, here.
            let _ = unsafe { sys::cuMemUnmap(ptr, size) };
        }
        if self.ptr != 0 {
            // SAFETY: reserved by `Gpu::map_pieces` with this size, freed once, after the unmaps.
            let _ = unsafe { sys::cuMemAddressFree(self.ptr, self.size) };
        }
    }
}

impl MappedPieces {
    /// Where the first piece is mapped in this process.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.size
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// One physical allocation mapped at an address range of its own. The mapping goes before the
/// memory is released (fields drop in order), also when a later step of making it failed.
struct Mapping {
    range: MappedPieces,
    physical: PhysicalMemory,
}

impl Mapping {
    /// Maps the first `size` bytes of `physical` (all of it; a larger size is refused by the
    /// driver) for `gpu`, read/write.
    fn new(gpu: &Gpu, physical: PhysicalMemory, size: usize) -> Result<Mapping, CudaError> {
        let range = gpu.map_pieces(size as u64, &[(0, size as u64, &physical)])?;
        Ok(Mapping { range, physical })
    }
}

/// Device memory of one GPU that other processes and GPUs can map: unmapped, its address range
/// freed and its handle released when dropped (the memory itself lives on while an importer
/// still has it mapped).
pub struct SharedAllocation {
    mapping: Mapping,
    len: usize,
}

impl crate::gpu::OwnedDeviceMemory for SharedAllocation {
    fn range(&self) -> (u64, usize) {
        (self.mapping.range.ptr, self.len)
    }

    fn owner(&self) -> &Arc<CudaContext> {
        &self.mapping.range.ctx
    }
}

impl SharedAllocation {
    /// The start of the mapping on the owning GPU.
    pub fn device_ptr(&self) -> u64 {
        self.mapping.range.ptr
    }

    /// The bytes asked for.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes mapped: [`len`](Self::len) rounded up to the allocation granularity (at least
    /// one granule). An importer passes this to [`Gpu::import_shareable`].
    pub fn mapped_len(&self) -> usize {
        self.mapping.range.size
    }

    /// A new POSIX file descriptor for the physical memory (see [`PhysicalMemory::export_fd`]).
    pub fn export_fd(&self) -> Result<OwnedFd, CudaError> {
        self.mapping.physical.export_fd()
    }
}

/// Another allocation's memory (of this process or another, of this GPU or another) mapped for
/// this GPU: unmapped, its address range freed and its handle released when dropped.
pub struct ImportedAllocation {
    mapping: Mapping,
}

impl crate::gpu::OwnedDeviceMemory for ImportedAllocation {
    fn range(&self) -> (u64, usize) {
        (self.mapping.range.ptr, self.mapping.range.size)
    }

    fn owner(&self) -> &Arc<CudaContext> {
        &self.mapping.range.ctx
    }
}

impl ImportedAllocation {
    /// The start of the mapping, valid on the importing GPU.
    pub fn device_ptr(&self) -> u64 {
        self.mapping.range.ptr
    }

    /// The bytes mapped (the exporter's [`SharedAllocation::mapped_len`]).
    pub fn len(&self) -> usize {
        self.mapping.range.size
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.range.size == 0
    }
}

/// Physical allocations of this process mapped side by side in one range, each exportable as a
/// file descriptor: what torch's expandable segments make (for tests and benchmarks of senders
/// whose tensors span several handles).
pub struct SharedPieces {
    mapped: MappedPieces,
    /// Released after the mappings go (fields drop in order).
    _physical: Vec<PhysicalMemory>,
}

impl crate::gpu::OwnedDeviceMemory for SharedPieces {
    fn range(&self) -> (u64, usize) {
        (self.mapped.ptr, self.mapped.size)
    }

    fn owner(&self) -> &Arc<CudaContext> {
        &self.mapped.ctx
    }
}

impl SharedPieces {
    pub fn device_ptr(&self) -> u64 {
        self.mapped.ptr
    }

    pub fn len(&self) -> usize {
        self.mapped.size
    }

    pub fn is_empty(&self) -> bool {
        self.mapped.size == 0
    }
}

// These types hold only integers and `Arc<CudaContext>`s (Send + Sync), so they are Send and
// Sync without an `unsafe impl`; this keeps it that way, so a field added later that is neither
// fails the build here instead of being papered over.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<SharedAllocation>();
    send_sync::<ImportedAllocation>();
    send_sync::<SharedPieces>();
    send_sync::<PhysicalMemory>();
};

impl Gpu {
    /// The granularity shareable allocations on this GPU are rounded up to (the driver's minimum
    /// for pinned device memory with POSIX-fd handles).
    pub fn shareable_granularity(&self) -> Result<usize, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        allocation_granularity(
            &shareable_prop(self.ordinal()),
            CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    }

    /// `bytes` of device memory on this GPU (rounded up to the granularity; 0 bytes take one
    /// granule), mapped read/write for this GPU and exportable as a POSIX file descriptor.
    pub fn alloc_shareable(&self, bytes: usize) -> Result<SharedAllocation, CudaError> {
        let granularity = self.shareable_granularity()?;
        let mapped_len = bytes
            .max(1)
            .checked_next_multiple_of(granularity)
            .ok_or_else(|| CudaError::Invalid(format!("{bytes} bytes cannot be rounded up to the granularity")))?;
        let physical = PhysicalMemory::create(self.context(), mapped_len, &shareable_prop(self.ordinal()))?;
        Ok(SharedAllocation { mapping: Mapping::new(self, physical, mapped_len)?, len: bytes })
    }

    /// Maps memory exported by [`SharedAllocation::export_fd`] (in this process or another, on
    /// this GPU or another GPU of the host) for this GPU, read/write. `mapped_len` is the
    /// exporter's [`SharedAllocation::mapped_len`]. The descriptor stays the caller's: it may be
    /// closed as soon as this returns.
    pub fn import_shareable(&self, fd: BorrowedFd<'_>, mapped_len: usize) -> Result<ImportedAllocation, CudaError> {
        if mapped_len == 0 {
            return Err(CudaError::Invalid("cannot import a shareable allocation of 0 bytes".into()));
        }
        let physical = self.import_handle(fd)?;
        Ok(ImportedAllocation { mapping: Mapping::new(self, physical, mapped_len)? })
    }

    /// A file descriptor for the physical memory mapped at `ptr`, VMM memory of this process
    /// made exportable as one (another library's, such as torch's expandable segments).
    pub fn export_mapping_fd(&self, ptr: u64) -> Result<OwnedFd, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` is a valid out-pointer; the driver checks that `ptr` is mapped VMM
        // memory. The reference it takes is released when `retained` drops, whatever the
        // export does (the allocator that made the memory keeps its own).
        let result = unsafe { sys::cuMemRetainAllocationHandle(&mut handle, ptr as *mut c_void) };
        check(result, "cuMemRetainAllocationHandle")?;
        let retained = PhysicalMemory { ctx: self.context().clone(), handle };
        retained.export_fd()
    }

    /// Physical memory from a descriptor of [`Gpu::export_mapping_fd`] or
    /// [`SharedAllocation::export_fd`], to map with [`Gpu::map_pieces`]. The descriptor stays
    /// the caller's.
    pub fn import_handle(&self, fd: BorrowedFd<'_>) -> Result<PhysicalMemory, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut handle: CUmemGenericAllocationHandle = 0;
        // SAFETY: for POSIX_FD the driver takes the descriptor's value in place of the pointer
        // (`(void *)(uintptr_t)fd`) and only reads it; the descriptor is open for the duration
        // of the call (borrowed); `handle` is a valid out-pointer.
        let result = unsafe {
            sys::cuMemImportFromShareableHandle(&mut handle, fd.as_raw_fd() as usize as *mut c_void, POSIX_FD)
        };
        check(result, "cuMemImportFromShareableHandle")?;
        Ok(PhysicalMemory { ctx: self.context().clone(), handle })
    }

    /// Maps `pieces` ((offset, bytes, handle), each handle's whole size) side by side in one
    /// new range of `total` bytes, readable and writable by this GPU (over NVLink if the
    /// memory is another GPU's). The pieces must tile the range exactly, in order. On an error
    /// nothing stays mapped or reserved.
    pub fn map_pieces(&self, total: u64, pieces: &[(u64, u64, &PhysicalMemory)]) -> Result<MappedPieces, CudaError> {
        let mut at = 0;
        for &(offset, bytes, _) in pieces {
            if offset != at || bytes == 0 {
                return Err(CudaError::Invalid(format!(
                    "pieces must tile their range in order: {bytes} bytes at offset {offset}, expected offset {at}"
                )));
            }
            at += bytes;
        }
        if at != total || total == 0 {
            return Err(CudaError::Invalid(format!("pieces of {at} bytes in all for a range of {total}")));
        }
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut mapped = MappedPieces { ctx: self.context().clone(), ptr: 0, size: total as usize, mapped: Vec::new() };
        let mut ptr: CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid out-pointer; alignment 0 picks the default (the granularity),
        // address 0 lets the driver choose, flags must be 0; sizes that are not a multiple of
        // the granularity are refused. Freed by `mapped`'s Drop.
        check(unsafe { sys::cuMemAddressReserve(&mut ptr, total as usize, 0, 0, 0) }, "cuMemAddressReserve")?;
        mapped.ptr = ptr;
        for &(offset, bytes, handle) in pieces {
            // SAFETY: [ptr + offset, + bytes) lies in the range reserved above and holds no
            // mapping yet (the pieces tile it, checked above); the handle is live, and a size
            // past its end is refused by the driver.
            check(unsafe { sys::cuMemMap(ptr + offset, bytes as usize, 0, handle.handle, 0) }, "cuMemMap")?;
            mapped.mapped.push((ptr + offset, bytes as usize));
        }
        grant_access(ptr, total as usize, self.ordinal())?;
        Ok(mapped)
    }

    /// `pieces` physical allocations of `piece_bytes` (rounded up to the granularity), each
    /// exportable as a file descriptor, mapped side by side in one range of this GPU.
    pub fn alloc_shareable_pieces(&self, piece_bytes: usize, pieces: usize) -> Result<SharedPieces, CudaError> {
        let granularity = self.shareable_granularity()?;
        let piece = piece_bytes.max(1).next_multiple_of(granularity);
        piece
            .checked_mul(pieces.max(1))
            .ok_or_else(|| CudaError::Invalid(format!("{pieces} pieces of {piece} bytes overflow")))?;
        let prop = shareable_prop(self.ordinal());
        let physical: Vec<PhysicalMemory> = (0..pieces.max(1))
            .map(|_| PhysicalMemory::create(self.context(), piece, &prop))
            .collect::<Result<_, _>>()?;
        let step = piece as u64;
        let parts: Vec<(u64, u64, &PhysicalMemory)> =
            physical.iter().enumerate().map(|(k, p)| (k as u64 * step, step, p)).collect();
        let mapped = self.map_pieces(step * physical.len() as u64, &parts)?;
        Ok(SharedPieces { mapped, _physical: physical })
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::device_count;
    use crate::tests_gpu::{bytes as pattern, gpu};
    use crate::OwnedDeviceMemory;

    const SIZES: [usize; 2] = [1, 3 * 1024 * 1024 + 5];

    fn read(memory: &dyn OwnedDeviceMemory, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        memory.download(&mut out).unwrap();
        out
    }

    pub(super) fn assert_memory_returned(gpu: &Gpu, free_before: usize) {
        let granularity = gpu.shareable_granularity().unwrap();
        let (free_after, _) = gpu.memory_info().unwrap();
        assert!(
            free_after + granularity >= free_before,
            "device memory not returned: {free_before} bytes free before, {free_after} after"
        );
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn vmm_shareable_round_trip_same_gpu() {
        let gpu = gpu();
        let granularity = gpu.shareable_granularity().unwrap();
        let (free_before, _) = gpu.memory_info().unwrap();
        for (i, &size) in SIZES.iter().enumerate() {
            let mut shared = gpu.alloc_shareable(size).unwrap();
            assert_eq!(shared.len(), size);
            assert!(shared.mapped_len() >= size);
            assert_eq!(shared.mapped_len() % granularity, 0);
            assert!(shared.mapped_len() - size.max(1) < granularity, "rounded up by more than one granule");
            assert_ne!(shared.device_ptr(), 0);

            let data = pattern(size, i as u64 + 1);
            shared.upload(&data).unwrap();
            let fd = shared.export_fd().unwrap();
            let mut imported = gpu.import_shareable(fd.as_fd(), shared.mapped_len()).unwrap();
            drop(fd); // the import keeps the memory; the descriptor is no longer needed
            assert_eq!(imported.len(), shared.mapped_len());
            assert_ne!(imported.device_ptr(), shared.device_ptr(), "a mapping of its own");
            assert_eq!(read(&imported, size), data, "size {size}: read through the import");

            // Writes through the import land in the exporter's memory too.
            let back = pattern(size, i as u64 + 100);
            imported.upload(&back).unwrap();
            assert_eq!(read(&shared, size), back, "size {size}: write through the import");

            // The memory outlives the exporter while the import holds it.
            drop(shared);
            assert_eq!(read(&imported, size), back, "size {size}: after the exporter dropped");
            drop(imported);
        }
        assert_memory_returned(&gpu, free_before);
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn vmm_shareable_import_on_peer_gpu() {
        let gpu = gpu();
        if device_count().unwrap() < 2 {
            eprintln!("vmm_shareable_import_on_peer_gpu: one GPU only, nothing to check");
            return;
        }
        let peer = Gpu::open(1).unwrap();
        let (free_before, _) = gpu.memory_info().unwrap();
        for (i, &size) in SIZES.iter().enumerate() {
            let mut shared = gpu.alloc_shareable(size).unwrap();
            let data = pattern(size, i as u64 + 7);
            shared.upload(&data).unwrap();
            let fd = shared.export_fd().unwrap();
            let mut imported = peer.import_shareable(fd.as_fd(), shared.mapped_len()).unwrap();
            assert_eq!(read(&imported, size), data, "size {size}: GPU 1 reads GPU 0's memory");
            let back = pattern(size, i as u64 + 700);
            imported.upload(&back).unwrap();
            assert_eq!(read(&shared, size), back, "size {size}: GPU 1 writes GPU 0's memory");
            drop(imported);
            drop(shared);
        }
        assert_memory_returned(&gpu, free_before);
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn vmm_import_of_a_bad_size_is_an_error() {
        let gpu = gpu();
        let shared = gpu.alloc_shareable(1).unwrap();
        let fd = shared.export_fd().unwrap();
        assert!(matches!(gpu.import_shareable(fd.as_fd(), 0), Err(CudaError::Invalid(_))));
        // Larger than the physical allocation: the driver refuses the mapping, and the imported
        // handle and reserved range are released again (no leak, no panic).
        let err = gpu.import_shareable(fd.as_fd(), shared.mapped_len() * 2).err().expect("mapping past the end");
        assert!(matches!(err, CudaError::Driver { .. }), "{err}");
    }
}

#[cfg(test)]
mod pieces_tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::ipc::{Segment, Sharing};
    use crate::tests_gpu::{bytes as pattern, gpu};
    use crate::OwnedDeviceMemory;

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn pieces_side_by_side_are_one_segment_exported_and_mapped_again_bit_for_bit() {
        let gpu = gpu();
        let g = gpu.shareable_granularity().unwrap();
        let (free_before, _) = gpu.memory_info().unwrap();
        let mut shared = gpu.alloc_shareable_pieces(2 * g, 3).unwrap();
        let (base, total) = (shared.device_ptr(), shared.len() as u64);
        assert_eq!(total, 6 * g as u64);
        let data = pattern(total as usize, 5);
        shared.upload(&data).unwrap();

        // A region spanning all three pieces, and one inside the last: one segment of three.
        let (segments, located) = gpu.locate(&[(base + 4096, total - 8192), (base + total - 100, 50)]).unwrap();
        assert_eq!(segments.len(), 1, "{segments:?}");
        assert_eq!((segments[0].base, segments[0].bytes), (base, total));
        let Sharing::Vmm { pieces } = &segments[0].sharing else { panic!("{segments:?}") };
        assert_eq!(
            pieces.iter().map(|p| (p.offset, p.bytes)).collect::<Vec<_>>(),
            [(0, 2 * g as u64), (2 * g as u64, 2 * g as u64), (4 * g as u64, 2 * g as u64)]
        );
        let mut ids: Vec<u64> = pieces.iter().map(|p| p.block_id).collect();
        ids.dedup();
        assert_eq!(ids.len(), 3, "one physical allocation each");
        assert_eq!((located[1].segment, located[1].offset), (0, total - 100));
        // cudaMalloc memory is a legacy segment, and a region past its end is refused.
        let plain = gpu.alloc(4096).unwrap();
        assert!(matches!(gpu.segment_of(plain.device_ptr()).unwrap().sharing, Sharing::Legacy { .. }));
        let past = gpu.locate(&[(plain.device_ptr(), 1 << 30)]).unwrap_err();
        assert!(matches!(past, CudaError::OutsideAllocation { .. }), "{past}");

        // Exported piece by piece, imported and mapped side by side: the same bytes, both ways.
        let fds: Vec<OwnedFd> = pieces.iter().map(|p| gpu.export_mapping_fd(base + p.offset).unwrap()).collect();
        let handles: Vec<PhysicalMemory> = fds.iter().map(|fd| gpu.import_handle(fd.as_fd()).unwrap()).collect();
        let parts: Vec<(u64, u64, &PhysicalMemory)> =
            pieces.iter().zip(&handles).map(|(p, h)| (p.offset, p.bytes, h)).collect();
        assert!(gpu.map_pieces(total, &parts[1..]).is_err(), "pieces must tile the range from 0");
        let mapped = gpu.map_pieces(total, &parts).unwrap();
        drop(handles); // the mappings keep the memory
        let mut back = vec![0u8; total as usize];
        let staging = gpu.alloc(total as usize).unwrap();
        let copy = |dst: u64, src: u64| {
            let desc = crate::CopyDesc { src, dst, rows: 1, row_bytes: total, src_stride: 0, dst_stride: 0 };
            gpu.run_copies(&gpu.prepare_copies(&[desc]).unwrap()).unwrap();
            gpu.synchronize().unwrap();
        };
        copy(staging.device_ptr(), mapped.device_ptr());
        staging.download(&mut back).unwrap();
        assert!(back == data, "read through the mapping of the pieces");
        drop(shared); // the exporter lets go: the importer's mapping still holds the memory
        copy(staging.device_ptr(), mapped.device_ptr());
        staging.download(&mut back).unwrap();
        assert!(back == data, "after the exporter dropped its pieces");
        drop((mapped, staging, plain, fds)); // an exported descriptor holds the memory too
        super::tests::assert_memory_returned(&gpu, free_before);
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn still_mapped_sees_every_reallocation_of_pieces_and_allocations() {
        let gpu = gpu();
        let g = gpu.shareable_granularity().unwrap();
        let count = 768;
        let shared = gpu.alloc_shareable_pieces(g, count).unwrap();
        let plain = gpu.alloc(3 << 20).unwrap();
        let regions = [(shared.device_ptr(), shared.len() as u64), (plain.device_ptr() + 64, 1 << 20)];
        let (segments, _) = gpu.locate(&regions).unwrap();
        assert_eq!(segments.len(), 2, "{segments:?}");
        assert!(gpu.still_mapped(&segments).unwrap(), "nothing changed");
        let (pieces, legacy): (Vec<Segment>, Vec<Segment>) =
            segments.into_iter().partition(|s| matches!(s.sharing, Sharing::Vmm { .. }));
        // Freed and made again (the driver tends to hand back the same addresses): new
        // physical memory, a new allocation id.
        drop(shared);
        let again = gpu.alloc_shareable_pieces(g, count).unwrap();
        assert!(
            !gpu.still_mapped(&pieces).unwrap(),
            "pieces made again (same addresses: {})",
            again.device_ptr() == regions[0].0
        );
        assert!(gpu.still_mapped(&legacy).unwrap());
        drop(plain);
        let plain_again = gpu.alloc(3 << 20).unwrap();
        assert!(
            !gpu.still_mapped(&legacy).unwrap(),
            "allocation made again (same address: {})",
            plain_again.device_ptr() + 64 == regions[1].0
        );
    }
}
