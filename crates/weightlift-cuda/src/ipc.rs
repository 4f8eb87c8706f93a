//! Same-node sharing of device memory another library allocated: the memory of `cudaMalloc` /
//! `cuMemAlloc` (torch's caching allocator by default, one legacy IPC handle per allocation
//! segment), and CUDA VMM mappings side by side (torch's `expandable_segments:True`, 20 MiB
//! handles in one address range, each exported as a file descriptor). A sender names the
//! segments its tensors live in; a receiver opens each segment once and keeps the mapping for
//! as long as the segment is unchanged.

use std::sync::Arc;

use cudarc::driver::sys::{
    self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags, CUmemAllocationHandleType, CUpointer_attribute,
};
use cudarc::driver::CudaContext;

use crate::error::{Call, CudaError};
use crate::gpu::Gpu;

/// Bytes of a legacy IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// Device memory holding some of a sender's tensors: one allocation, or adjacent mappings.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Start of the range (for legacy memory, what `cuIpcGetMemHandle` needs).
    pub base: u64,
    pub bytes: u64,
    pub sharing: Sharing,
}

/// How another process maps a [`Segment`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sharing {
    /// One `cudaMalloc` allocation, through a legacy IPC handle. `buffer_id` is the driver's
    /// process-unique id of the allocation: it changes whenever the memory is freed and
    /// allocated again, even at the same address.
    Legacy { buffer_id: u64 },
    /// CUDA VMM mappings side by side (a tensor may span several), in address order.
    Vmm { pieces: Vec<Piece> },
}

/// One VMM mapping of a [`Segment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Piece {
    /// From the segment's base.
    pub offset: u64,
    pub bytes: u64,
    /// The driver's process-unique id of the physical allocation mapped there
    /// (`MEMORY_BLOCK_ID`): never reused, so a remap shows.
    pub block_id: u64,
    /// Whether that physical memory can be exported as a file descriptor (torch's expandable
    /// segments: yes; a weightlift pool, or stream-ordered memory: no).
    pub exportable: bool,
}

/// What the driver says of the memory at one address (one query for all of it).
struct Mapped {
    base: u64,
    bytes: u64,
    legacy_ipc: bool,
    buffer_id: u64,
    fd_exportable: bool,
    block_id: u64,
}

impl Mapped {
    /// This mapping as the piece of a segment at `offset`.
    fn piece(&self, offset: u64) -> Piece {
        Piece { offset, bytes: self.bytes, block_id: self.block_id, exportable: self.fd_exportable }
    }
}

/// Where each tensor lives: segment index and offset from the segment's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub segment: u32,
    pub offset: u64,
}

/// The values of `N` pointer attributes at `ptr`, each at most 8 bytes (a pointer, size_t,
/// bool, bitmask or id) read little-endian into a zeroed u64; zeros for an address the driver
/// does not know. The caller binds the context.
fn pointer_attributes<const N: usize>(ptr: u64, mut asked: [CUpointer_attribute; N]) -> Result<[u64; N], CudaError> {
    let mut values = [0u64; N];
    let mut data: [*mut std::ffi::c_void; N] = std::array::from_fn(|i| (&mut values[i] as *mut u64).cast());
    // SAFETY: `asked` and `data` both hold N entries; each data pointer is a live, zeroed
    // 8-byte slot, enough for its attribute.
    unsafe { sys::cuPointerGetAttributes(N as u32, asked.as_mut_ptr(), data.as_mut_ptr(), ptr) }
        .result()
        .call("cuPointerGetAttributes")?;
    Ok(values)
}

/// The ordinal (in this process's numbering) of the GPU whose UUID is `uuid`.
pub fn ordinal_with_uuid(uuid: &[u8; 16]) -> Result<usize, CudaError> {
    for ordinal in 0..crate::device_count()? {
        let ctx = cudarc::driver::CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
        if ctx.uuid().call("cuDeviceGetUuid")?.bytes.map(|b| b as u8) == *uuid {
            return Ok(ordinal);
        }
    }
    Err(CudaError::Invalid(format!("no GPU of this process has UUID {}", uuid.map(|b| format!("{b:02x}")).concat())))
}

impl Gpu {
    /// The 16-byte UUID of this GPU: the same in every process, whatever `CUDA_VISIBLE_DEVICES`.
    pub fn uuid(&self) -> Result<[u8; 16], CudaError> {
        let uuid = self.context().uuid().call("cuDeviceGetUuid")?;
        Ok(uuid.bytes.map(|b| b as u8))
    }

    /// Lets this GPU reach the memory of the GPU whose UUID is `uuid` directly (NVLink), for
    /// memory of this process on another GPU; a no-op for this GPU itself or when enabled.
    pub fn enable_peer_access_to(&self, uuid: &[u8; 16]) -> Result<(), CudaError> {
        if &self.uuid()? == uuid {
            return Ok(());
        }
        for ordinal in 0..crate::device_count()? {
            let peer = cudarc::driver::CudaContext::new(ordinal).call("cuDevicePrimaryCtxRetain")?;
            if peer.uuid().call("cuDeviceGetUuid")?.bytes.map(|b| b as u8) != *uuid {
                continue;
            }
            self.context().bind_to_thread().call("cuCtxSetCurrent")?;
            // SAFETY: both contexts are live (ours, and `peer` retained above); flags must be 0.
            let result = unsafe { sys::cuCtxEnablePeerAccess(peer.cu_ctx(), 0) };
            return match result {
                sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
                other => other.result().call("cuCtxEnablePeerAccess"),
            };
        }
        Err(CudaError::Invalid(format!(
            "no GPU of this process has UUID {}",
            uuid.map(|b| format!("{b:02x}")).concat()
        )))
    }

    /// The allocation, or VMM mapping, that contains `ptr`: one driver call.
    fn mapped_at(&self, ptr: u64) -> Result<Mapped, CudaError> {
        use CUpointer_attribute::*;
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let values = pointer_attributes(
            ptr,
            [
                CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                CU_POINTER_ATTRIBUTE_RANGE_SIZE,
                CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE,
                CU_POINTER_ATTRIBUTE_BUFFER_ID,
                CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES,
                CU_POINTER_ATTRIBUTE_MEMORY_BLOCK_ID,
                CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR,
                CU_POINTER_ATTRIBUTE_MAPPING_SIZE,
            ],
        )?;
        let fd = u64::from(CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR.0);
        let legacy_ipc = values[2] & 0xff != 0;
        // For VMM memory the address range may span several mappings side by side (measured
        // on driver 580): a piece is the one mapping, one physical allocation.
        let (base, bytes) = if legacy_ipc { (values[0], values[1]) } else { (values[6], values[7]) };
        Ok(Mapped {
            base,
            bytes,
            legacy_ipc,
            buffer_id: values[3],
            fd_exportable: values[4] & fd != 0,
            block_id: values[5],
        })
    }

    /// The segment that contains `ptr`: its allocation, or for VMM memory its mapping (see
    /// [`Gpu::locate`] for segments of several mappings).
    pub fn segment_of(&self, ptr: u64) -> Result<Segment, CudaError> {
        let mapped = self.mapped_at(ptr)?;
        if mapped.bytes == 0 {
            // cuPointerGetAttributes answers zeros, not an error, for an address it does not know.
            return Err(CudaError::Invalid(format!("{ptr:#x} is not device memory of this process")));
        }
        let sharing = if mapped.legacy_ipc {
            Sharing::Legacy { buffer_id: mapped.buffer_id }
        } else {
            Sharing::Vmm { pieces: vec![mapped.piece(0)] }
        };
        Ok(Segment { base: mapped.base, bytes: mapped.bytes, sharing })
    }

    /// Extends a VMM segment by the mappings that follow it until it reaches `end`: they must
    /// be VMM mappings too, side by side.
    fn extend_to(&self, segment: &mut Segment, end: u64) -> Result<bool, CudaError> {
        let Sharing::Vmm { pieces } = &mut segment.sharing else { return Ok(false) };
        while segment.base + segment.bytes < end {
            let next = segment.base + segment.bytes;
            let mapped = match self.mapped_at(next) {
                Ok(m) if !m.legacy_ipc && m.base == next && m.bytes > 0 => m,
                _ => return Ok(false),
            };
            pieces.push(mapped.piece(segment.bytes));
            segment.bytes += mapped.bytes;
        }
        Ok(true)
    }

    /// The segments holding `ptrs` (each with `len` bytes) and where each pointer lies in
    /// them. One driver query per allocation or mapping, not per pointer: tensors of one are
    /// found by address once its range is known. VMM mappings side by side make one segment
    /// as far as tensors span them.
    pub fn locate(&self, regions: &[(u64, u64)]) -> Result<(Vec<Segment>, Vec<Located>), CudaError> {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].0);
        let mut segments: Vec<Segment> = Vec::new();
        let mut located = vec![Located { segment: 0, offset: 0 }; regions.len()];
        for i in order {
            let (ptr, len) = regions[i];
            let end = ptr + len;
            let starts_in = |s: &Segment| ptr >= s.base && ptr < s.base + s.bytes.max(1);
            let fits = |s: &Segment| starts_in(s) && end <= s.base + s.bytes;
            let last_fits = match segments.last_mut() {
                // Regions come in address order: one that starts in the last segment and runs
                // past it extends it (VMM mappings only).
                Some(last) if starts_in(last) => fits(last) || self.extend_to(last, end)?,
                _ => false,
            };
            if !last_fits {
                let mut segment = self.segment_of(ptr)?;
                if !fits(&segment) && !self.extend_to(&mut segment, end)? {
                    let (base, bytes) = (segment.base, segment.bytes);
                    return Err(CudaError::OutsideAllocation { index: i, ptr, len, base, bytes });
                }
                segments.push(segment);
            }
            let segment = segments.len() - 1;
            located[i] = Located { segment: segment as u32, offset: ptr - segments[segment].base };
        }
        Ok((segments, located))
    }

    /// Whether every segment [`Gpu::locate`] found is still the same memory: each allocation
    /// at its place with its extent and id, each VMM piece mapped at its place to the same
    /// physical allocation. One driver query of three attributes per allocation or piece,
    /// whatever the number of tensors (2,912 pieces: 0.38 ms on an H200 host, against 0.55 ms
    /// asking all eight of [`Gpu::locate`]'s; from several threads it took longer).
    pub fn still_mapped(&self, segments: &[Segment]) -> Result<bool, CudaError> {
        use CUpointer_attribute::*;
        const ALLOCATION: [CUpointer_attribute; 3] =
            [CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, CU_POINTER_ATTRIBUTE_RANGE_SIZE, CU_POINTER_ATTRIBUTE_BUFFER_ID];
        const PIECE: [CUpointer_attribute; 3] = [
            CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR,
            CU_POINTER_ATTRIBUTE_MAPPING_SIZE,
            CU_POINTER_ATTRIBUTE_MEMORY_BLOCK_ID,
        ];
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        // (address, bytes, id) as locate found them: ids are never reused, so an equal id is
        // the same memory.
        let expected = segments.iter().flat_map(|s| {
            let (allocation, pieces) = match &s.sharing {
                Sharing::Legacy { buffer_id } => (Some(([s.base, s.bytes, *buffer_id], ALLOCATION)), &[][..]),
                Sharing::Vmm { pieces } => (None, pieces.as_slice()),
            };
            allocation.into_iter().chain(pieces.iter().map(|p| ([s.base + p.offset, p.bytes, p.block_id], PIECE)))
        });
        for (values, asked) in expected {
            if pointer_attributes(values[0], asked)? != values {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A handle another process can open to map the allocation starting at `base`.
    pub fn ipc_handle(&self, base: u64) -> Result<[u8; IPC_HANDLE_BYTES], CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut handle = CUipcMemHandle { reserved: [0; IPC_HANDLE_BYTES] };
        // SAFETY: `handle` is a valid out-parameter; the driver rejects addresses that are not
        // the base of an IPC-capable allocation.
        unsafe { sys::cuIpcGetMemHandle(&mut handle, base) }.result().call("cuIpcGetMemHandle")?;
        Ok(handle.reserved.map(|b| b as u8))
    }

    /// Maps another process's allocation into this GPU's context. The memory may live on
    /// another GPU of this node: peer access (NVLink) is enabled for it.
    pub fn open_ipc(&self, handle: &[u8; IPC_HANDLE_BYTES]) -> Result<IpcMapping, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let handle = CUipcMemHandle { reserved: handle.map(|b| b as _) };
        let mut ptr: CUdeviceptr = 0;
        let flags = CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `ptr` is a valid out-parameter; the driver validates the handle. The mapping
        // is owned by the returned value and closed exactly once, in its Drop.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, flags) }.result().call("cuIpcOpenMemHandle")?;
        // Owned from here, so closed should the query fail.
        let mut mapping = IpcMapping { ptr, len: 0, ctx: self.context().clone() };
        [mapping.len] = pointer_attributes(ptr, [CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE])?;
        Ok(mapping)
    }
}

/// Another process's allocation mapped into this one; unmapped when dropped.
pub struct IpcMapping {
    ptr: CUdeviceptr,
    /// Bytes of the allocation mapped, as the driver reports them here.
    len: u64,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    /// Where the allocation's first byte is mapped in this process.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes mapped: a sender naming more of this allocation is wrong about it.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the pointer came from cuIpcOpenMemHandle in this context and is closed
            // only here; kernels using it were synchronized by the update that ran them.
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

// SAFETY: a mapped address is valid in every thread once the context is bound, which every
// user of it does first.
unsafe impl Send for IpcMapping {}
// SAFETY: shared references only read the address.
unsafe impl Sync for IpcMapping {}
