//! Same-node sharing of device memory through legacy CUDA IPC handles: the memory of
//! `cudaMalloc` / `cuMemAlloc` (what torch's caching allocator hands out, one handle per
//! allocation segment). A sender names the segments its tensors live in; a receiver opens each
//! segment once and keeps the mapping for as long as the segment is unchanged.

use std::sync::Arc;

use cudarc::driver::sys::{self, CUdeviceptr, CUipcMemHandle, CUipcMem_flags, CUpointer_attribute};
use cudarc::driver::CudaContext;

use crate::error::{Call, CudaError};
use crate::gpu::Gpu;

/// Bytes of a legacy IPC memory handle.
pub const IPC_HANDLE_BYTES: usize = 64;

/// One allocation holding some of a sender's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Start of the allocation (what `cuIpcGetMemHandle` needs).
    pub base: u64,
    pub bytes: u64,
    /// The driver's process-unique id of the allocation: it changes whenever the memory is
    /// freed and allocated again, even at the same address.
    pub buffer_id: u64,
}

/// Where each tensor lives: segment index and offset from the segment's base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    pub segment: u32,
    pub offset: u64,
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

    /// The allocation that contains `ptr`.
    pub fn segment_of(&self, ptr: u64) -> Result<Segment, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let (mut base, mut bytes): (CUdeviceptr, usize) = (0, 0);
        // SAFETY: plain queries about an address; the out-pointers are valid locals.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut bytes, ptr) }.result().call("cuMemGetAddressRange")?;
        let mut buffer_id: u64 = 0;
        // SAFETY: BUFFER_ID is an unsigned long long written into `buffer_id`.
        unsafe {
            sys::cuPointerGetAttribute(
                (&mut buffer_id as *mut u64).cast(),
                CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
                ptr,
            )
        }
        .result()
        .call("cuPointerGetAttribute(BUFFER_ID)")?;
        Ok(Segment { base, bytes: bytes as u64, buffer_id })
    }

    /// The segments holding `ptrs` (each with `len` bytes) and where each pointer lies in
    /// them. One driver query per segment, not per pointer: tensors of one allocation are
    /// found by address once its range is known.
    pub fn locate(&self, regions: &[(u64, u64)]) -> Result<(Vec<Segment>, Vec<Located>), CudaError> {
        let mut order: Vec<usize> = (0..regions.len()).collect();
        order.sort_by_key(|&i| regions[i].0);
        let mut segments: Vec<Segment> = Vec::new();
        let mut located = vec![Located { segment: 0, offset: 0 }; regions.len()];
        for i in order {
            let (ptr, len) = regions[i];
            let inside = |s: &Segment| ptr >= s.base && ptr + len <= s.base + s.bytes;
            if !segments.last().is_some_and(inside) {
                let segment = self.segment_of(ptr)?;
                if !inside(&segment) {
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
        Ok(IpcMapping { ptr, ctx: self.context().clone() })
    }
}

/// Another process's allocation mapped into this one; unmapped when dropped.
pub struct IpcMapping {
    ptr: CUdeviceptr,
    ctx: Arc<CudaContext>,
}

impl IpcMapping {
    /// Where the allocation's first byte is mapped in this process.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
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
