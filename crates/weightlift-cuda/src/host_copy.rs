//! Host memory into device memory with the copy engines: many ranges queued at once, work done
//! on the CPU while they run, and page-locking of host memory that arrives in pieces (a
//! trainer's tensors, a mapped checkpoint) so the copies run at the pinned rate.

use cudarc::driver::result;

use crate::error::{Call, CudaError};
use crate::gpu::{Gpu, HostRegistration, OwnedDeviceMemory};

/// Bytes of a host page: what [`Gpu::pin_ranges`] rounds ranges out to.
const PAGE: usize = 4096;

/// Host ranges page-locked by [`Gpu::pin_ranges`]: the page-rounded runs, and what could not be
/// locked (copies from those run at the pageable rate, correct all the same).
pub struct PinnedRanges {
    runs: Vec<(usize, usize)>,
    _registrations: Vec<HostRegistration>,
    /// Bytes the driver would not lock.
    pub unpinned_bytes: u64,
}

impl PinnedRanges {
    /// Whether these are the runs `ranges` round out to (the same tensors at the same places).
    pub fn covers_same(&self, ranges: &[&[u8]]) -> bool {
        page_runs(ranges) == self.runs
    }

    /// Bytes in the locked runs.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|&(_, len)| len as u64).sum()
    }
}

/// `ranges` rounded out to whole pages and merged where they touch or overlap, in address
/// order: registering a page twice is an error, and tensors of one allocation share pages.
fn page_runs(ranges: &[&[u8]]) -> Vec<(usize, usize)> {
    let mut spans: Vec<(usize, usize)> = ranges
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            let start = r.as_ptr() as usize;
            (start / PAGE * PAGE, (start + r.len()).next_multiple_of(PAGE))
        })
        .collect();
    spans.sort_unstable();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (start, end) in spans {
        match runs.last_mut() {
            Some((_, last_end)) if start <= *last_end => *last_end = (*last_end).max(end),
            _ => runs.push((start, end)),
        }
    }
    runs.into_iter().map(|(start, end)| (start, end - start)).collect()
}

/// Waits for a stream when dropped: the copies queued on it read host memory borrowed only
/// until then, also when a later step returned early or panicked.
pub(crate) struct WaitOnDrop<'a>(pub(crate) &'a Gpu);

impl Drop for WaitOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.synchronize();
    }
}

impl Gpu {
    /// Page-locks the host memory of `ranges` (rounded out to pages, merged where they touch)
    /// for copies to this GPU. Memory that is already locked (a torch pinned tensor, say)
    /// needs nothing; a read-only mapping (a checkpoint) is locked read-only; what the driver
    /// refuses stays pageable and is counted in [`PinnedRanges::unpinned_bytes`].
    ///
    /// The ranges must stay mapped while the result lives (the driver keeps pages of memory
    /// unmapped meanwhile locked, never reaching them through the registration).
    pub fn pin_ranges(&self, ranges: &[&[u8]]) -> Result<PinnedRanges, CudaError> {
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let runs = page_runs(ranges);
        let mut registrations = Vec::new();
        let mut unpinned_bytes = 0;
        for &(start, len) in &runs {
            let ptr = start as *mut std::ffi::c_void;
            let mut outcome = cudarc::driver::sys::CUresult::CUDA_SUCCESS;
            for flags in [0, cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY] {
                // SAFETY: [start, start + len) is whole pages of live host memory (the caller's
                // ranges rounded out to their pages); registering only locks them, nothing is
                // read or written through the registration.
                outcome = unsafe { cudarc::driver::sys::cuMemHostRegister_v2(ptr, len, flags) };
                if outcome == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                    registrations.push(HostRegistration::adopt(self.context().clone(), start));
                    break;
                }
                if outcome == cudarc::driver::sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
                    break;
                }
            }
            if !matches!(
                outcome,
                cudarc::driver::sys::CUresult::CUDA_SUCCESS
                    | cudarc::driver::sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED
            ) {
                unpinned_bytes += len as u64;
            }
        }
        Ok(PinnedRanges { runs, _registrations: registrations, unpinned_bytes })
    }

    /// Bytes of `ranges` that are not page-locked for CUDA (neither allocated page-locked, as
    /// torch's `pin_memory()` tensors are, nor registered): what the copy engines could only
    /// copy at the driver's pageable rate. Asks the driver about each range's first byte: one
    /// allocation or registration covers a tensor whole.
    pub fn unlocked_bytes(&self, ranges: &[&[u8]]) -> Result<u64, CudaError> {
        use cudarc::driver::sys;
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let mut unlocked = 0;
        for range in ranges.iter().filter(|r| !r.is_empty()) {
            let mut kind = 0u32;
            // SAFETY: a query about an address, with a u32 to write the memory type into (the
            // attribute's documented type); nothing is read or written through the address.
            let outcome = unsafe {
                sys::cuPointerGetAttribute(
                    (&mut kind as *mut u32).cast(),
                    sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                    range.as_ptr() as sys::CUdeviceptr,
                )
            };
            let locked = outcome == sys::CUresult::CUDA_SUCCESS && kind == sys::CUmemorytype::CU_MEMORYTYPE_HOST as u32;
            if !locked {
                unlocked += range.len() as u64;
            }
        }
        Ok(unlocked)
    }

    /// Copies each `(offset, bytes)` of `copies` from host memory to `offset` in `dst` with the
    /// copy engines, runs `meanwhile` on this thread while they run, and returns once both are
    /// done (the host memory may then be reused). Every range is checked to fit `dst` before
    /// anything is queued.
    pub fn copy_ranges_from_host<M: OwnedDeviceMemory, R>(
        &self,
        dst: &M,
        copies: &[(usize, &[u8])],
        meanwhile: impl FnOnce() -> R,
    ) -> Result<R, CudaError> {
        let (base, len) = dst.range();
        for &(at, bytes) in copies {
            if at.checked_add(bytes.len()).is_none_or(|end| end > len) {
                return Err(CudaError::Invalid(format!(
                    "{} bytes at offset {at} exceed a {len}-byte buffer",
                    bytes.len()
                )));
            }
        }
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        // Declared before anything is queued: however this returns, the stream is waited for
        // before the borrowed host slices are given back.
        let wait = WaitOnDrop(self);
        for &(at, bytes) in copies {
            if bytes.is_empty() {
                continue;
            }
            // SAFETY: the destination range lies inside `dst`, memory this crate owns and that
            // stays live while borrowed (checked above); `bytes` is a live host slice that
            // stays borrowed until `wait` has synchronized the stream the copy runs on.
            unsafe { result::memcpy_htod_async(base + at as u64, bytes, self.stream().cu_stream()) }
                .call("cuMemcpyHtoDAsync")?;
        }
        let value = meanwhile();
        self.synchronize()?;
        drop(wait);
        Ok(value)
    }
}

impl Gpu {
    /// Copies each `(device address, host buffer)` of `regions` from this GPU into the buffer
    /// (filling it) with the copy engines, and waits for all of them. The device ranges are
    /// memory this process allocated some other way (a trainer's tensors); each must lie inside
    /// live memory of this GPU, which is checked before anything is queued.
    pub fn download_regions(&self, regions: &mut [(u64, &mut [u8])]) -> Result<(), CudaError> {
        let spans: Vec<(u64, u64)> =
            regions.iter().filter(|(_, b)| !b.is_empty()).map(|(ptr, b)| (*ptr, b.len() as u64)).collect();
        if spans.is_empty() {
            return Ok(());
        }
        self.locate(&spans)?;
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        let wait = WaitOnDrop(self);
        for (ptr, buffer) in regions.iter_mut() {
            if buffer.is_empty() {
                continue;
            }
            // SAFETY: the device range lies inside live memory of this context (checked above);
            // `buffer` is a live, exclusively borrowed host slice that stays borrowed until
            // `wait` has synchronized the stream the copy runs on.
            unsafe { result::memcpy_dtoh_async(buffer, *ptr, self.stream().cu_stream()) }.call("cuMemcpyDtoHAsync")?;
        }
        self.synchronize()?;
        drop(wait);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_round_out_and_merge_touching_ranges() {
        let memory = vec![0u8; 8 * PAGE];
        let base = memory.as_ptr() as usize;
        let first = base.next_multiple_of(PAGE);
        let at = |offset: usize, len: usize| &memory[first - base + offset..first - base + offset + len];
        // Two tensors sharing a page, one a page further on, one far away, one empty.
        let ranges = [at(10, 100), at(200, PAGE), at(3 * PAGE + 5, 10), at(0, 0)];
        assert_eq!(page_runs(&ranges), vec![(first, 2 * PAGE), (first + 3 * PAGE, PAGE)]);
        // Order does not matter; a range inside another adds nothing.
        let reversed = [at(3 * PAGE + 5, 10), at(200, PAGE), at(10, 100), at(300, 5)];
        assert_eq!(page_runs(&reversed), page_runs(&ranges));
    }
}
