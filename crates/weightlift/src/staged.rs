//! The staged path into a GPU: buckets that arrive in host memory (a shared-memory ring, a
//! socket, an in-process ring fed from a checkpoint) are copied to a device staging buffer and
//! written into the engine's tensors there by the batched copy kernel, one launch per bucket;
//! once every bucket landed, the tensors are digested where they live, in one pass.
//!
//! A sender on the same host with the CUDA driver skips the host ring: the receiver offers two
//! device slots (shareable allocations of one bucket each), the sender copies each bucket
//! into one straight from its own memory with the copy engines, and the receiver writes it
//! into the tensors from there while the sender fills the other.
//!
//! Device memory held: one staging buffer of one bucket (two with device slots), the copy
//! descriptors and the digest batch. Everything runs on the GPU's one stream, so a bucket's
//! payload lands only after the last bucket's copies ran: those copies move device memory at
//! ~40 times the host link's rate, so overlapping them would save a few percent, not more.

use std::sync::Arc;

use weightlift_core::region::strided_copies;
use weightlift_core::Plan;
use weightlift_cuda::{
    CopyBatch, CopyDesc, CudaError, DeviceBuffer, DigestBatch, Gpu, HostRegistration, SharedAllocation,
};

use crate::gpu::LandedDigests;
use crate::protocol::DeviceSlots;
use crate::update::Schedule;

/// Device slots a receiver offers a sender that can copy into them.
pub const DEVICE_SLOTS: u32 = 2;

/// The device buffers a staging writes buckets into before their copies into the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// One buffer, for buckets copied up from host memory by this process.
    One,
    /// [`DEVICE_SLOTS`] shareable allocations a sender on this host copies into.
    Slots,
    /// Two buffers, for buckets that NCCL moves in (one lands while the other is scattered).
    Pair,
}

/// Where a bucket is written to on the device before its copies into the tensors.
enum Buffer {
    Plain(DeviceBuffer),
    /// A device slot: shareable with the sender's process.
    Slot(SharedAllocation),
}

impl Buffer {
    fn device_ptr(&self) -> u64 {
        match self {
            Buffer::Plain(b) => b.device_ptr(),
            Buffer::Slot(s) => s.device_ptr(),
        }
    }

    fn allocated_bytes(&self) -> u64 {
        match self {
            Buffer::Plain(b) => b.allocated_bytes() as u64,
            Buffer::Slot(s) => s.mapped_len() as u64,
        }
    }
}

/// What one connection keeps to write a host transport's buckets into tensors on a GPU.
pub struct Staging {
    gpu: Arc<Gpu>,
    /// One buffer, or [`DEVICE_SLOTS`] device slots (the first doubles as the buffer host
    /// copies land in, should the sender not map them).
    buffers: Vec<Buffer>,
    /// Per buffer, the copy batches of an update that skips nothing, built once per connection.
    full: Vec<Vec<CopyBatch>>,
    /// Every destination, digested after the last bucket.
    digests: Landed,
    /// For a streaming receiver: per bucket, the destinations it completes, digested as soon
    /// as it landed.
    bucket_digests: Vec<DigestBatch>,
    destinations: Vec<u64>,
    /// The host memory buckets arrive in, page-locked for the copies (best effort).
    _pinned: Vec<HostRegistration>,
}

impl Staging {
    /// Staging for `plan` into tensors at `destinations` (device addresses, in plan order),
    /// through `buffers`.
    pub fn new(
        gpu: Arc<Gpu>,
        plan: &Plan,
        full: &Schedule,
        destinations: Vec<u64>,
        bucket_bytes: u64,
        buffers: Buffers,
    ) -> Result<Staging, CudaError> {
        let plain = || gpu.alloc(bucket_bytes as usize).map(Buffer::Plain);
        let buffers = match buffers {
            Buffers::One => vec![plain()?],
            Buffers::Pair => vec![plain()?, plain()?],
            Buffers::Slots => (0..DEVICE_SLOTS)
                .map(|_| gpu.alloc_shareable(bucket_bytes as usize).map(Buffer::Slot))
                .collect::<Result<_, _>>()?,
        };
        let partial = plan.share_bytes().iter().zip(&plan.destinations).any(|(&w, d)| w < d.byte_len());
        let digests = match partial {
            // A sharded trainer's share: each destination digested as the part it writes.
            true => Landed::Parts(LandedDigests::new(&gpu, plan, &destinations)?),
            false => {
                let regions: Vec<(u64, u64)> =
                    destinations.iter().zip(&plan.destinations).map(|(&ptr, spec)| (ptr, spec.byte_len())).collect();
                Landed::Whole(gpu.prepare_digests(&regions)?)
            }
        };
        let mut staging = Staging {
            gpu,
            buffers,
            full: Vec::new(),
            digests,
            bucket_digests: Vec::new(),
            destinations,
            _pinned: Vec::new(),
        };
        staging.full = staging.batches(plan, full)?;
        Ok(staging)
    }

    /// Prepares the digests of each bucket's completed destinations (`completes[k]`, plan
    /// indices), for [`StagedUpdate::bucket_digests`].
    pub fn digest_per_bucket(&mut self, plan: &Plan, completes: &[Vec<u32>]) -> Result<(), CudaError> {
        let sizes: Vec<u64> = plan.destinations.iter().map(|d| d.byte_len()).collect();
        self.bucket_digests = completes
            .iter()
            .map(|ds| {
                let regions: Vec<(u64, u64)> =
                    ds.iter().map(|&d| (self.destinations[d as usize], sizes[d as usize])).collect();
                self.gpu.prepare_digests(&regions)
            })
            .collect::<Result<_, _>>()?;
        Ok(())
    }

    /// The device slots to offer a sender, and their descriptors (none without slots).
    pub fn offer(&self, bucket_bytes: u64) -> Result<Option<(DeviceSlots, Vec<std::os::fd::OwnedFd>)>, CudaError> {
        let slots: Vec<&SharedAllocation> = self
            .buffers
            .iter()
            .filter_map(|b| match b {
                Buffer::Slot(s) => Some(s),
                Buffer::Plain(_) => None,
            })
            .collect();
        let Some(first) = slots.first() else { return Ok(None) };
        let fds = slots.iter().map(|s| s.export_fd()).collect::<Result<Vec<_>, _>>()?;
        let device = crate::cuda_ipc::hex(&self.gpu.uuid()?);
        let info = DeviceSlots {
            device,
            count: slots.len() as u32,
            slot_bytes: bucket_bytes,
            mapped_bytes: first.mapped_len() as u64,
        };
        Ok(Some((info, fds)))
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
        self.buffers.iter().map(Buffer::allocated_bytes).sum()
    }

    /// The writer of one update following `schedule` (`skips`: it leaves some tensors alone,
    /// so its buckets differ from the full schedule's).
    pub fn update<'a>(&'a self, plan: &Plan, schedule: &Schedule, skips: bool) -> Result<StagedUpdate<'a>, CudaError> {
        let batches = if skips { Batches::Own(self.batches(plan, schedule)?) } else { Batches::Full };
        Ok(StagedUpdate { staging: self, batches })
    }

    /// Per buffer, one copy batch per bucket: from the buffer to the bucket's destinations, as
    /// `exec::unpack` writes them on the host.
    fn batches(&self, plan: &Plan, schedule: &Schedule) -> Result<Vec<Vec<CopyBatch>>, CudaError> {
        self.buffers.iter().map(|buffer| self.batches_from(buffer.device_ptr(), plan, schedule)).collect()
    }

    fn batches_from(&self, staged: u64, plan: &Plan, schedule: &Schedule) -> Result<Vec<CopyBatch>, CudaError> {
        schedule
            .buckets
            .iter()
            .map(|bucket| {
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

/// The copy batches of an update (per buffer, per bucket): the connection's full ones, or its
/// own (a delta update).
enum Batches {
    Full,
    Own(Vec<Vec<CopyBatch>>),
}

impl StagedUpdate<'_> {
    fn batch(&self, buffer: usize, k: usize) -> Result<&CopyBatch, CudaError> {
        let batches = match &self.batches {
            Batches::Full => &self.staging.full,
            Batches::Own(own) => own,
        };
        batches
            .get(buffer)
            .and_then(|b| b.get(k))
            .ok_or_else(|| CudaError::Invalid(format!("no bucket {k} in buffer {buffer} of this update")))
    }

    /// Copies bucket `k`'s payload to the GPU and queues its copies into the tensors; returns
    /// once the payload was read (its host memory may be reused), the copies still running.
    pub fn bucket(&self, k: usize, payload: &[u8]) -> Result<(), CudaError> {
        let batch = self.batch(0, k)?;
        let gpu = &self.staging.gpu;
        match &self.staging.buffers[0] {
            Buffer::Plain(b) => gpu.copy_from_host(b, 0, payload)?,
            Buffer::Slot(s) => gpu.copy_from_host(s, 0, payload)?,
        }
        gpu.run_copies(batch)
    }

    /// Writes bucket `k`, which the sender copied into device slot `slot`, into the tensors;
    /// returns once the slot was read (the sender may fill it again).
    pub fn bucket_in_slot(&self, k: usize, slot: u32) -> Result<(), CudaError> {
        if !matches!(self.staging.buffers.get(slot as usize), Some(Buffer::Slot(_))) {
            return Err(CudaError::Invalid(format!("no device slot {slot}")));
        }
        let gpu = &self.staging.gpu;
        gpu.run_copies(self.batch(slot as usize, k)?)?;
        gpu.synchronize()
    }

    /// The copy batch that scatters bucket `k` from buffer `buffer` into the tensors.
    pub fn scatter(&self, buffer: usize, k: usize) -> Result<&CopyBatch, CudaError> {
        self.batch(buffer, k)
    }

    /// The device addresses of a staging of [`Buffers::Pair`].
    pub fn buffer_pair(&self) -> Result<[u64; 2], CudaError> {
        match self.staging.buffers.as_slice() {
            [a @ Buffer::Plain(_), b @ Buffer::Plain(_)] => Ok([a.device_ptr(), b.device_ptr()]),
            _ => Err(CudaError::Invalid("this staging has no pair of buffers for NCCL".into())),
        }
    }

    /// Waits for bucket `k`'s copies and digests the destinations it completes (in the order
    /// given to [`Staging::digest_per_bucket`]).
    pub fn bucket_digests(&self, k: usize) -> Result<Vec<u64>, CudaError> {
        let gpu = &self.staging.gpu;
        let batch = self
            .staging
            .bucket_digests
            .get(k)
            .ok_or_else(|| CudaError::Invalid(format!("no digests prepared for bucket {k}")))?;
        gpu.synchronize()?;
        gpu.run_digests(batch)
    }

    /// Waits for the last copies and digests every destination where it lives.
    pub fn digests(&self) -> Result<Vec<u64>, CudaError> {
        let gpu = &self.staging.gpu;
        gpu.synchronize()?;
        match &self.staging.digests {
            Landed::Whole(batch) => gpu.run_digests(batch),
            Landed::Parts(parts) => parts.run(gpu),
        }
    }
}

/// The digests of what landed: whole destinations, or the parts a share writes.
enum Landed {
    Whole(DigestBatch),
    Parts(LandedDigests),
}
