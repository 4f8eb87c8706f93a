//! The staged path into a GPU: buckets that arrive in host memory (a shared-memory ring, a
//! socket, an in-process ring fed from a checkpoint) are copied to a device staging buffer and
//! written into the engine's tensors there by the batched copy kernel, one launch per bucket;
//! once every bucket landed, the tensors are digested where they live, in one pass.
//!
//! Device memory held: one staging buffer of one bucket, the copy descriptors and the digest
//! batch. Everything runs on the GPU's one stream, so a bucket's payload lands only after the
//! last bucket's copies ran: those copies move device memory at ~40 times the host link's rate,
//! so a second buffer to overlap them would save a few percent, not more.

use std::sync::Arc;

use weightlift_core::region::strided_copies;
use weightlift_core::Plan;
use weightlift_cuda::{CopyBatch, CopyDesc, CudaError, DeviceBuffer, DigestBatch, Gpu, HostRegistration};

use crate::update::Schedule;

/// What one connection keeps to write a host transport's buckets into tensors on a GPU.
pub struct Staging {
    gpu: Arc<Gpu>,
    buffer: DeviceBuffer,
    /// The copy batches of an update that skips nothing, built once per connection.
    full: Vec<CopyBatch>,
    /// Every destination, digested after the last bucket.
    digests: DigestBatch,
    destinations: Vec<u64>,
    /// The host memory buckets arrive in, page-locked for the copies (best effort).
    _pinned: Vec<HostRegistration>,
}

impl Staging {
    /// Staging for `plan` into tensors at `destinations` (device addresses, in plan order).
    pub fn new(
        gpu: Arc<Gpu>,
        plan: &Plan,
        full: &Schedule,
        destinations: Vec<u64>,
        bucket_bytes: u64,
    ) -> Result<Staging, CudaError> {
        let buffer = gpu.alloc(bucket_bytes as usize)?;
        let regions: Vec<(u64, u64)> =
            destinations.iter().zip(&plan.destinations).map(|(&ptr, spec)| (ptr, spec.byte_len())).collect();
        let digests = gpu.prepare_digests(&regions)?;
        let mut staging = Staging { gpu, buffer, full: Vec::new(), digests, destinations, _pinned: Vec::new() };
        staging.full = staging.batches(plan, full)?;
        Ok(staging)
    }

    /// Page-locks host memory that buckets arrive in, so their copies run at the pinned rate.
    /// A range the driver will not lock (already registered, say) is copied from as it is.
    pub fn pin(&mut self, memory: &[u8]) {
        match self.gpu.register_host(memory) {
            Ok(registration) => self._pinned.push(registration),
            Err(e) => tracing::debug!("bucket memory stays pageable: {e}"),
        }
    }

    /// Device memory this staging holds.
    pub fn device_bytes(&self) -> u64 {
        self.buffer.allocated_bytes() as u64
    }

    /// The writer of one update following `schedule` (`skips`: it leaves some tensors alone,
    /// so its buckets differ from the full schedule's).
    pub fn update<'a>(&'a self, plan: &Plan, schedule: &Schedule, skips: bool) -> Result<StagedUpdate<'a>, CudaError> {
        let batches = if skips { Batches::Own(self.batches(plan, schedule)?) } else { Batches::Full };
        Ok(StagedUpdate { staging: self, batches })
    }

    /// One copy batch per bucket: from the staging buffer to the bucket's destinations, as
    /// `exec::unpack` writes them on the host.
    fn batches(&self, plan: &Plan, schedule: &Schedule) -> Result<Vec<CopyBatch>, CudaError> {
        schedule
            .buckets
            .iter()
            .map(|bucket| {
                let staged = self.buffer.device_ptr();
                let mut descs = Vec::new();
                for entry in &bucket.entries {
                    let op = &entry.op;
                    let spec = &plan.destinations[op.dst as usize];
                    let elem = spec.dtype.size();
                    let zeros = vec![0; op.extent.len()];
                    let base = self.destinations[op.dst as usize];
                    for c in strided_copies(&op.extent, &zeros, &spec.shape, &op.dst_start, &op.extent) {
                        descs.push(CopyDesc {
                            src: staged + entry.payload_offset + c.src_offset * elem,
                            dst: base + c.dst_offset * elem,
                            rows: c.rows,
                            row_bytes: c.row_elems * elem,
                            src_stride: c.src_stride * elem,
                            dst_stride: c.dst_stride * elem,
                        });
                    }
                }
                self.gpu.prepare_copies(&descs)
            })
            .collect()
    }
}

/// One update's way through [`Staging`].
pub struct StagedUpdate<'a> {
    staging: &'a Staging,
    batches: Batches,
}

/// The copy batches of an update: the connection's full ones, or its own (a delta update).
enum Batches {
    Full,
    Own(Vec<CopyBatch>),
}

impl StagedUpdate<'_> {
    /// Copies bucket `k`'s payload to the GPU and queues its copies into the tensors; returns
    /// once the payload was read (its host memory may be reused), the copies still running.
    pub fn bucket(&self, k: usize, payload: &[u8]) -> Result<(), CudaError> {
        let batches = match &self.batches {
            Batches::Full => &self.staging.full,
            Batches::Own(own) => own,
        };
        let batch = batches.get(k).ok_or_else(|| CudaError::Invalid(format!("no bucket {k} in this update")))?;
        let gpu = &self.staging.gpu;
        gpu.copy_from_host(&self.staging.buffer, 0, payload)?;
        gpu.run_copies(batch)
    }

    /// Waits for the last copies and digests every destination where it lives.
    pub fn digests(&self) -> Result<Vec<u64>, CudaError> {
        let gpu = &self.staging.gpu;
        gpu.synchronize()?;
        gpu.run_digests(&self.staging.digests)
    }
}
