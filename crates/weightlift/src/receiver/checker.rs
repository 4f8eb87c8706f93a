//! What a checker does to the destination tensors between updates: reads the digest of every
//! tensor as its bytes are now, and overwrites them all (poison with one byte value, scramble
//! with pseudo-random bytes) to prove the next update writes everything, marking them dirty.

use weightlift_core::digest;
use weightlift_cuda::CudaError;

use super::{Receiver, Store};

impl Receiver {
    /// The digest of every tensor as its bytes are now, computed where they live.
    pub fn current_digests(&self) -> Result<Vec<u64>, CudaError> {
        self.gate().map_err(CudaError::Invalid)?;
        match &*self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner()) {
            Store::Host(tensors) => {
                Ok((0..self.shared.manifest.len()).map(|i| digest::digest(tensors.bytes(i))).collect())
            }
            Store::Device { gpu, tensors } => tensors.digests(gpu),
        }
    }

    /// Fills every tensor with `value` bytes and marks them all dirty (what a checker does to
    /// prove the next update writes everything). Waits while an update is writing.
    pub fn poison(&self, value: u8) -> Result<(), CudaError> {
        self.overwrite(|_, bytes| bytes.fill(value), |_| value)
    }

    /// Overwrites every tensor with pseudo-random bytes from `seed` (on a GPU, each tensor with
    /// one random byte value) and marks them all dirty, like [`Receiver::poison`].
    pub fn scramble(&self, seed: u64) -> Result<(), CudaError> {
        self.overwrite(|i, bytes| fill_random(bytes, seed ^ (i as u64)), |i| mix(seed ^ (i as u64)) as u8)
    }

    fn overwrite(&self, host: impl Fn(usize, &mut [u8]), device: impl Fn(usize) -> u8) -> Result<(), CudaError> {
        self.gate().map_err(CudaError::Invalid)?;
        let mut store = self.shared.tensors.lock().unwrap_or_else(|e| e.into_inner());
        match &mut *store {
            Store::Host(tensors) => tensors.all_mut().into_iter().enumerate().for_each(|(i, t)| host(i, t)),
            Store::Device { gpu, tensors } => tensors.fill_each(gpu, &device)?,
        }
        let mut state = self.state();
        state.digests.iter_mut().for_each(|d| *d = None);
        let names: Vec<String> = self.shared.manifest.iter().map(|s| s.name.clone()).collect();
        state.versions.mark_dirty(names);
        Ok(())
    }
}

/// splitmix64: a well-mixed 64-bit value from `x`.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Pseudo-random bytes (a splitmix64 stream from `seed`): what a checker reset writes.
fn fill_random(bytes: &mut [u8], seed: u64) {
    let mut state = seed;
    for chunk in bytes.chunks_mut(8) {
        state = state.wrapping_add(1);
        let word = mix(state).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}
