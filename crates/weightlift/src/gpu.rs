//! Plans executed on a GPU: tensors in device memory, a plan's copies and digests prepared
//! once, then each update is one copy launch and one digest launch however many tensors.

use std::collections::BTreeSet;
use weightlift_core::{Manifest, Plan};

use weightlift_core::DType;
use weightlift_cuda::{
    waves_of, CastDesc, CopyBatch, CopyDesc, CudaError, DeviceBuffer, DigestBatch, FusedKernel, FusedRun, Gpu,
    LaunchedUpdate, OwnedDeviceMemory, SharedAllocation, SharedPieces, SourceGpu, UpdateBatch, Wave, WaveOrder,
    CHUNK_BYTES, WAVE_CHUNKS,
};

use crate::cuda_ipc::{next_allocation_id, DeviceTensors};

use crate::tensors::{HostTensors, SourceTensors};

/// Alignment of each tensor in a [`GpuTensors`] allocation (as torch's allocator gives).
const ALIGN: u64 = 256;

/// Tensors of a manifest laid out in one device allocation.
pub struct GpuTensors {
    memory: Memory,
    manifest: Manifest,
    offsets: Vec<u64>,
}

enum Memory {
    /// cuMemAlloc: shared with other processes through legacy CUDA IPC handles.
    Plain(DeviceBuffer),
    /// CUDA VMM: shared as a file descriptor; `u64` is its process-unique id.
    Shareable(u64, SharedAllocation),
    /// CUDA VMM in pieces side by side, as torch's expandable segments map memory: shared as
    /// one file descriptor per piece, found by address like another allocator's memory.
    Pieces(SharedPieces),
}

impl Memory {
    fn owned(&self) -> &dyn OwnedDeviceMemory {
        match self {
            Memory::Plain(b) => b,
            Memory::Shareable(_, a) => a,
            Memory::Pieces(p) => p,
        }
    }

    fn owned_mut(&mut self) -> &mut dyn OwnedDeviceMemory {
        match self {
            Memory::Plain(b) => b,
            Memory::Shareable(_, a) => a,
            Memory::Pieces(p) => p,
        }
    }
}

impl GpuTensors {
    /// Tensors in memory from cuMemAlloc (what torch's allocator gives).
    pub fn alloc(gpu: &Gpu, manifest: &Manifest) -> Result<GpuTensors, CudaError> {
        let (offsets, bytes) = layout(manifest);
        Ok(GpuTensors { memory: Memory::Plain(gpu.alloc(bytes as usize)?), manifest: manifest.clone(), offsets })
    }

    /// Tensors in VMM memory, shared with receivers as a file descriptor.
    pub fn alloc_shareable(gpu: &Gpu, manifest: &Manifest) -> Result<GpuTensors, CudaError> {
        let (offsets, bytes) = layout(manifest);
        let memory = Memory::Shareable(next_allocation_id(), gpu.alloc_shareable(bytes as usize)?);
        Ok(GpuTensors { memory, manifest: manifest.clone(), offsets })
    }

    /// Tensors in VMM memory mapped as pieces of `piece_bytes` side by side (torch's
    /// expandable segments use 20 MiB), tensors spanning pieces.
    pub fn alloc_pieces(gpu: &Gpu, manifest: &Manifest, piece_bytes: usize) -> Result<GpuTensors, CudaError> {
        let (offsets, bytes) = layout(manifest);
        let piece = piece_bytes.max(1).next_multiple_of(gpu.shareable_granularity()?);
        let memory = Memory::Pieces(gpu.alloc_shareable_pieces(piece, (bytes as usize).div_ceil(piece))?);
        Ok(GpuTensors { memory, manifest: manifest.clone(), offsets })
    }

    fn base(&self) -> u64 {
        self.memory.owned().range().0
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Device address of tensor `i`.
    pub fn ptr(&self, i: usize) -> u64 {
        self.base() + self.offsets[i]
    }

    /// Every tensor's address.
    pub fn ptrs(&self) -> Vec<u64> {
        (0..self.manifest.len()).map(|i| self.ptr(i)).collect()
    }

    /// Every tensor as (address, bytes).
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.manifest.iter().enumerate().map(|(i, s)| (self.ptr(i), s.byte_len())).collect()
    }

    pub fn fill(&mut self, gpu: &Gpu, value: u8) -> Result<(), CudaError> {
        self.memory.owned_mut().fill(gpu, value)
    }

    /// Copies host tensors (same manifest; a checkpoint straight from its mapping) to the device.
    pub fn upload(&mut self, host: &dyn SourceTensors) -> Result<(), CudaError> {
        if host.manifest() != &self.manifest {
            return Err(CudaError::Invalid("host tensors have a different manifest".into()));
        }
        for i in 0..self.manifest.len() {
            self.memory.owned_mut().upload_at(self.offsets[i] as usize, host.bytes(i))?;
        }
        Ok(())
    }

    /// Copies the tensors back to host memory.
    pub fn download(&self) -> Result<HostTensors, CudaError> {
        let mut data = Vec::with_capacity(self.manifest.len());
        for (i, spec) in self.manifest.iter().enumerate() {
            let mut bytes = vec![0u8; spec.byte_len() as usize];
            self.memory.owned().download_at(self.offsets[i] as usize, &mut bytes)?;
            data.push(bytes);
        }
        HostTensors::new(self.manifest.clone(), data).map_err(|e| CudaError::Invalid(e.to_string()))
    }
}

impl DeviceTensors for GpuTensors {
    fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn device_ptrs(&self) -> Vec<u64> {
        self.ptrs()
    }

    fn shareable(&self) -> Vec<(u64, &SharedAllocation)> {
        match &self.memory {
            Memory::Shareable(id, a) => vec![(*id, a)],
            Memory::Plain(_) | Memory::Pieces(_) => Vec::new(),
        }
    }
}

/// Offset of each tensor and the bytes of the whole layout.
pub(crate) fn layout(manifest: &Manifest) -> (Vec<u64>, u64) {
    let mut offsets = Vec::with_capacity(manifest.len());
    let mut at = 0u64;
    for spec in manifest {
        offsets.push(at);
        at = (at + spec.byte_len()).div_ceil(ALIGN) * ALIGN;
    }
    (offsets, at)
}

/// A plan bound to device addresses, prepared once: each update is a handful of launches
/// (at most ten per wave of up to 8 GiB) however many tensors, and its extra device memory is
/// bounded (descriptors and one wave's chunk digests), never a staging copy of the model.
pub struct GpuPlan {
    update: UpdateBatch,
    /// Where bytes of a share's part that are digested in another order than they lie are
    /// gathered (see [`Target::Tensors`]); None when the plan writes whole destinations.
    _scratch: Option<DeviceBuffer>,
    /// Every strided copy of the plan (kept to build the copy-only batch for measurement).
    descs: Vec<CopyDesc>,
    destinations: Vec<(u64, u64)>,
    pub copy_count: usize,
    /// Destination bytes copied and digested in one pass (the rest: copied, then digested).
    pub fused_bytes: u64,
}

/// How a plan's destination bytes are produced.
#[derive(Clone, Copy)]
enum Target<'a> {
    /// Written into the destination tensors at `ptrs`. A destination the plan writes only part
    /// of (a sharded trainer's share) is digested as its part, the ops' blocks one after another
    /// (as the host paths digest it): its bytes that cannot be digested as they are copied are
    /// gathered from where they landed into `scratch` and digested there.
    Tensors { ptrs: &'a [u64], scratch: u64 },
    /// Only digested, as they would be written: the sender's digests of what it means to send.
    /// Bytes that cannot be digested straight from the sources are assembled in `scratch`.
    DigestOnly { scratch: u64 },
    /// Already written into the destination tensors at `ptrs` (by another path): digested
    /// where they landed, a part's bytes that lie out of its order gathered into `scratch`.
    Landed { ptrs: &'a [u64], scratch: u64 },
}

impl GpuPlan {
    /// Binds `plan` to source tensors at `sources` (indexed like `plan.sources`, on this GPU or
    /// on the peer GPU `source_gpu` says) and destination tensors at `destinations` (like
    /// `plan.destinations`, on this GPU).
    pub fn new(
        gpu: &Gpu,
        plan: &Plan,
        sources: &[u64],
        source_gpu: SourceGpu,
        destinations: &[u64],
    ) -> Result<GpuPlan, CudaError> {
        GpuPlan::with_wave_chunks(gpu, plan, sources, source_gpu, destinations, WAVE_CHUNKS)
    }

    fn with_wave_chunks(
        gpu: &Gpu,
        plan: &Plan,
        sources: &[u64],
        source_gpu: SourceGpu,
        destinations: &[u64],
        wave_chunks: u64,
    ) -> Result<GpuPlan, CudaError> {
        check_counts(plan, Some(sources), Some(destinations))?;
        let work = Fusion::of(plan, sources, wave_chunks, source_gpu.wave_order())?;
        let scratch = match work.scratch_bytes(false) {
            0 => None,
            bytes => Some(gpu.alloc(bytes as usize)?),
        };
        let at = scratch.as_ref().map_or(0, DeviceBuffer::device_ptr);
        let waves = work.waves(Target::Tensors { ptrs: destinations, scratch: at });
        let descs = work.all_copies(destinations);
        Ok(GpuPlan {
            update: gpu.prepare_update(&waves, source_gpu)?,
            _scratch: scratch,
            copy_count: descs.len(),
            descs,
            destinations: destinations.iter().zip(&plan.destinations).map(|(&p, d)| (p, d.byte_len())).collect(),
            fused_bytes: work.fused_bytes(),
        })
    }

    /// One update: every copy, and every destination's digest as it then is.
    pub fn update(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_update(&self.update)
    }

    /// [`GpuPlan::update`] queued, not waited for: the digests come with
    /// [`LaunchedUpdate::wait`] (another plan's update may be queued meanwhile).
    pub fn launch<'a>(&'a self, gpu: &'a Gpu) -> Result<LaunchedUpdate<'a>, CudaError> {
        gpu.launch_update(&self.update)
    }

    /// Device memory the prepared update holds.
    pub fn device_bytes(&self) -> u64 {
        self.update.device_bytes()
    }

    /// Leaves the update's folds on the side stream (see `UpdateBatch::set_fold_aside`): a
    /// streamed bucket, whose fold then runs while the next bucket copies.
    pub fn set_fold_aside(&mut self) {
        self.update.set_fold_aside(true);
    }

    /// Runs the update's fused runs with `kernel` (to compare kernels on one bound plan).
    pub fn set_fused_kernel(&mut self, gpu: &Gpu, kernel: FusedKernel) -> Result<(), CudaError> {
        self.update.set_fused_kernel(gpu, kernel)
    }

    pub fn fused_kernel(&self) -> FusedKernel {
        self.update.fused_kernel()
    }

    pub fn launches(&self) -> usize {
        self.update.launches()
    }

    /// For measurement: the plan's copies alone, as one batch.
    pub fn copy_batch(&self, gpu: &Gpu) -> Result<CopyBatch, CudaError> {
        gpu.prepare_copies(&self.descs)
    }

    /// For measurement: digests of the destinations alone.
    pub fn digest_batch(&self, gpu: &Gpu) -> Result<DigestBatch, CudaError> {
        gpu.prepare_digests(&self.destinations)
    }
}

/// The digests of a plan's destinations as they are now, where another path wrote them (a
/// destination the plan writes part of: that part, as [`GpuPlan`] digests it).
pub struct LandedDigests {
    batch: UpdateBatch,
    _scratch: Option<DeviceBuffer>,
}

impl LandedDigests {
    pub fn new(gpu: &Gpu, plan: &Plan, destinations: &[u64]) -> Result<LandedDigests, CudaError> {
        check_counts(plan, None, Some(destinations))?;
        let work = Fusion::landed(plan, WAVE_CHUNKS)?;
        let scratch = match work.scratch_bytes(false) {
            0 => None,
            bytes => Some(gpu.alloc(bytes as usize)?),
        };
        let at = scratch.as_ref().map_or(0, DeviceBuffer::device_ptr);
        let waves = work.waves(Target::Landed { ptrs: destinations, scratch: at });
        Ok(LandedDigests { batch: gpu.prepare_update(&waves, SourceGpu::This)?, _scratch: scratch })
    }

    pub fn run(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_update(&self.batch)
    }
}

/// The digests a plan's destinations will have, computed from the sources where they live,
/// without writing any destination: what a sender compares the receiver's digests with.
pub struct ExpectedDigests {
    batch: UpdateBatch,
    scratch: DeviceBuffer,
}

impl ExpectedDigests {
    pub fn new(gpu: &Gpu, plan: &Plan, sources: &[u64]) -> Result<ExpectedDigests, CudaError> {
        ExpectedDigests::with_wave_chunks(gpu, plan, sources, WAVE_CHUNKS)
    }

    fn with_wave_chunks(
        gpu: &Gpu,
        plan: &Plan,
        sources: &[u64],
        wave_chunks: u64,
    ) -> Result<ExpectedDigests, CudaError> {
        check_counts(plan, Some(sources), None)?;
        // A sender digests its own tensors, on its own GPU.
        let work = Fusion::of(plan, sources, wave_chunks, SourceGpu::This.wave_order())?;
        let scratch = gpu.alloc(work.scratch_bytes(true) as usize)?;
        let waves = work.waves(Target::DigestOnly { scratch: scratch.device_ptr() });
        Ok(ExpectedDigests { batch: gpu.prepare_update(&waves, SourceGpu::This)?, scratch })
    }

    /// Every destination's digest as the plan would write it from the sources as they are now.
    pub fn run(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_update(&self.batch)
    }

    /// [`ExpectedDigests::run`] queued, not waited for (several are queued back to back).
    pub fn launch<'a>(&'a self, gpu: &'a Gpu) -> Result<LaunchedUpdate<'a>, CudaError> {
        gpu.launch_update(&self.batch)
    }

    pub fn device_bytes(&self) -> u64 {
        self.batch.device_bytes() + self.scratch.allocated_bytes() as u64
    }
}

/// The addresses given (None: not needed) are one per source and one per destination.
/// The cast `op` needs on the GPU, if any: the kernels cast F32 -> BF16 only, and any other is
/// an error naming the destination.
pub(crate) fn gpu_cast(plan: &Plan, op: &weightlift_core::CopyOp) -> Result<Option<weightlift_core::Cast>, CudaError> {
    match plan.cast(op) {
        Some(cast) if (cast.from, cast.to) != (DType::F32, DType::BF16) => {
            let name = &plan.destinations[op.dst as usize].name;
            Err(CudaError::Invalid(format!(
                "`{name}` needs a {} -> {} cast; the GPU path casts F32 -> BF16 only",
                cast.from, cast.to
            )))
        }
        cast => Ok(cast),
    }
}

fn check_counts(plan: &Plan, sources: Option<&[u64]>, destinations: Option<&[u64]>) -> Result<(), CudaError> {
    let fits = |given: Option<&[u64]>, wanted: usize| given.is_none_or(|g| g.len() == wanted);
    if !fits(sources, plan.sources.len()) || !fits(destinations, plan.destinations.len()) {
        return Err(CudaError::Invalid(format!(
            "the plan has {} sources and {} destinations; got {} and {} addresses",
            plan.sources.len(),
            plan.destinations.len(),
            sources.map_or(0, <[u64]>::len),
            destinations.map_or(0, <[u64]>::len)
        )));
    }
    Ok(())
}

/// One destination tensor's share of the work, with addresses relative to the tensor's start
/// (`dst` fields hold offsets until the work is placed). Chunks count in the tensor's digest
/// unit: the tensor, or for a destination the plan writes only part of, that part.
#[derive(Default)]
struct TensorWork {
    /// Whole chunks copied and digested in one pass; `out` is the unit's chunk index.
    fused: Vec<FusedRun>,
    copies: Vec<CopyDesc>,
    casts: Vec<CastDesc>,
    /// Chunks the copies and casts write: digested after them.
    fallback_chunks: BTreeSet<u64>,
    /// For a part of the destination: the bytes of the copies and casts, where they lie in the
    /// part (they are digested from scratch, not where they landed).
    part: Option<Vec<PartPiece>>,
}

/// Bytes of a destination's part that a copy or a cast writes: where they lie in the part, and
/// how they get into scratch (gathered from where the pull wrote them, or, digesting only,
/// read from the sources).
struct PartPiece {
    /// Offset in the part.
    at: u64,
    /// Where they landed: `src` is the offset in the tensor, `dst` the offset in the part.
    landed: CopyDesc,
    from_source: FromSource,
}

/// A part's bytes read from the sources into scratch (`dst` is the offset in the part).
enum FromSource {
    Copy(CopyDesc),
    Cast(CastDesc),
}

/// A plan's copies sorted, per destination tensor, into fused runs (whole chunks of its digest
/// unit from one contiguous source run) and fallback copies and casts.
struct Fusion {
    /// Bytes of each destination's digest unit (the tensor, or the part the plan writes).
    tensor_bytes: Vec<u64>,
    tensors: Vec<TensorWork>,
    /// The tensors of each wave (see [`waves_of`]).
    waves: Vec<Vec<usize>>,
}

impl Fusion {
    /// The work of digesting `plan`'s destinations where another path wrote them
    /// ([`Target::Landed`]): the sources are not read, and casts are copies of what landed.
    fn landed(plan: &Plan, wave_chunks: u64) -> Result<Fusion, CudaError> {
        Fusion::build(plan, None, wave_chunks, WaveOrder::LargestFirst)
    }

    fn of(plan: &Plan, sources: &[u64], wave_chunks: u64, order: WaveOrder) -> Result<Fusion, CudaError> {
        Fusion::build(plan, Some(sources), wave_chunks, order)
    }

    fn build(plan: &Plan, sources: Option<&[u64]>, wave_chunks: u64, order: WaveOrder) -> Result<Fusion, CudaError> {
        let written = plan.share_bytes();
        let partial: Vec<bool> = plan.destinations.iter().zip(&written).map(|(d, &w)| w < d.byte_len()).collect();
        let tensor_bytes: Vec<u64> = written;
        let tensors = partial.iter().map(|&p| TensorWork { part: p.then(Vec::new), ..TensorWork::default() }).collect();
        let waves = waves_of(&tensor_bytes, wave_chunks, order);
        let mut fusion = Fusion { tensors, tensor_bytes, waves };
        // Where the next op's block starts in its destination's part.
        let mut part_at = vec![0u64; plan.destinations.len()];
        for op in &plan.ops {
            let t = op.dst as usize;
            let dst_elt = plan.destinations[t].dtype.size();
            let src_elt = plan.sources[op.src as usize].spec.dtype.size();
            let src = sources.map_or(0, |s| s[op.src as usize]);
            let cast = match sources {
                Some(_) => gpu_cast(plan, op)?,
                None => None,
            };
            // The block's 2-D pieces follow one another in its row-major order.
            let mut at = part_at[t];
            for c in plan.strided(op) {
                let piece_bytes = c.rows * c.row_elems * dst_elt;
                if cast.is_some() {
                    let desc = CastDesc {
                        src: src + c.src_offset * src_elt,
                        dst: c.dst_offset * dst_elt,
                        rows: c.rows,
                        row_elems: c.row_elems,
                        src_stride: c.src_stride * src_elt,
                        dst_stride: c.dst_stride * dst_elt,
                    };
                    fusion.add_cast(t, desc, at);
                } else {
                    let desc = CopyDesc {
                        src: src + c.src_offset * src_elt,
                        dst: c.dst_offset * dst_elt,
                        rows: c.rows,
                        row_bytes: c.row_elems * dst_elt,
                        src_stride: c.src_stride * src_elt,
                        dst_stride: c.dst_stride * dst_elt,
                    };
                    fusion.add(t, desc, at);
                }
                at += piece_bytes;
            }
            part_at[t] = at;
        }
        Ok(fusion)
    }

    fn fused_bytes(&self) -> u64 {
        self.tensors.iter().flat_map(|w| &w.fused).map(|r| r.bytes).sum()
    }

    /// Adds one strided copy into tensor `t` (`c.dst` is the offset in the tensor; `at` where
    /// its bytes start in the part, for a part).
    fn add(&mut self, t: usize, c: CopyDesc, at: u64) {
        let dst_contiguous = c.rows <= 1 || c.dst_stride == c.row_bytes;
        if !dst_contiguous {
            // Interleaved destination rows: copy, then digest every chunk it spans.
            let (len, end) = (c.rows * c.row_bytes, c.dst + (c.rows - 1) * c.dst_stride + c.row_bytes);
            let landed = CopyDesc { src: c.dst, dst: at, src_stride: c.dst_stride, dst_stride: c.row_bytes, ..c };
            let from_source = FromSource::Copy(CopyDesc { dst: at, dst_stride: c.row_bytes, ..c });
            self.fallback(t, c.dst, (end, at, len), &landed, from_source);
            self.tensors[t].copies.push(c);
            return;
        }
        if c.rows <= 1 || c.src_stride == c.row_bytes {
            self.add_run(t, c.dst, at, c.src, c.rows.max(1) * c.row_bytes);
        } else {
            // A row-parallel slice: each row is contiguous on both sides.
            for r in 0..c.rows {
                self.add_run(t, c.dst + r * c.row_bytes, at + r * c.row_bytes, c.src + r * c.src_stride, c.row_bytes);
            }
        }
    }

    fn add_cast(&mut self, t: usize, c: CastDesc, at: u64) {
        let row_bytes = c.row_elems * 2;
        let end = c.dst + (c.rows.max(1) - 1) * c.dst_stride + row_bytes;
        let landed =
            CopyDesc { src: c.dst, dst: at, rows: c.rows, row_bytes, src_stride: c.dst_stride, dst_stride: row_bytes };
        let from_source = FromSource::Cast(CastDesc { dst: at, dst_stride: row_bytes, ..c });
        self.fallback(t, c.dst, (end, at, c.rows.max(1) * row_bytes), &landed, from_source);
        self.tensors[t].casts.push(c);
    }

    /// Marks the chunks a copy or cast writes for digesting after it: of the tensor from
    /// `start` to `end` (`span`: end, start in the part, bytes), or of the part. `landed` is
    /// where the bytes lie in the tensor (`src`: offset) and in the part (`dst`).
    fn fallback(&mut self, t: usize, start: u64, span: (u64, u64, u64), landed: &CopyDesc, from_source: FromSource) {
        let (end, at, len) = span;
        let work = &mut self.tensors[t];
        match &mut work.part {
            None => work.fallback_chunks.extend(start / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES)),
            Some(pieces) => {
                work.fallback_chunks.extend(at / CHUNK_BYTES..(at + len).div_ceil(CHUNK_BYTES));
                let landed = CopyDesc { dst: at, ..*landed };
                pieces.push(PartPiece { at, landed, from_source });
            }
        }
    }

    /// A contiguous run at `offset` of tensor `t` (at `at` of its part, for a part): its whole
    /// chunks of the digest unit are fused; bytes of chunks it shares with other runs go the
    /// slow way.
    fn add_run(&mut self, t: usize, offset: u64, at: u64, src: u64, len: u64) {
        // Chunks count in the unit: the tensor's offsets, or the part's.
        let unit = if self.tensors[t].part.is_some() { at } else { offset };
        let end = unit + len;
        let body_start = unit.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
        let body_end = if end == self.tensor_bytes[t] { end } else { end / CHUNK_BYTES * CHUNK_BYTES };
        let slow = |fusion: &mut Fusion, from: u64, to: u64| {
            let (dst, len) = (offset + (from - unit), to - from);
            let plain =
                CopyDesc { src: src + (from - unit), dst, rows: 1, row_bytes: len, src_stride: 0, dst_stride: 0 };
            let from_source = FromSource::Copy(CopyDesc { dst: at + (from - unit), ..plain });
            let landed = CopyDesc { src: dst, ..plain };
            fusion.fallback(t, dst, (dst + len, at + (from - unit), len), &landed, from_source);
            fusion.tensors[t].copies.push(plain);
        };
        if body_start >= body_end {
            slow(self, unit, end);
            return;
        }
        self.tensors[t].fused.push(FusedRun {
            src: src + (body_start - unit),
            dst: offset + (body_start - unit),
            bytes: body_end - body_start,
            out: body_start / CHUNK_BYTES,
        });
        if unit < body_start {
            slow(self, unit, body_start);
        }
        if body_end < end {
            slow(self, body_end, end);
        }
    }

    /// Tensor `t`'s fallback chunks as byte ranges of its unit (consecutive chunks merged).
    fn fallback_ranges(&self, t: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &chunk in &self.tensors[t].fallback_chunks {
            let (start, end) = (chunk * CHUNK_BYTES, ((chunk + 1) * CHUNK_BYTES).min(self.tensor_bytes[t]));
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        out
    }

    /// Scratch a run needs: the largest wave's fallback bytes digested from scratch (every
    /// tensor's when only digesting, else the parts').
    fn scratch_bytes(&self, digest_only: bool) -> u64 {
        let in_scratch = |t: usize| digest_only || self.tensors[t].part.is_some();
        self.waves
            .iter()
            .map(|tensors| {
                let ranges = tensors.iter().filter(|&&t| in_scratch(t)).flat_map(|&t| self.fallback_ranges(t));
                ranges.map(|(s, e)| e - s).sum::<u64>()
            })
            .max()
            .unwrap_or(0)
    }

    /// The work placed at real addresses, in waves.
    fn waves(&self, target: Target<'_>) -> Vec<Wave> {
        self.waves
            .iter()
            .map(|tensors| {
                let mut wave = Wave::default();
                let (mut first_chunk, mut scratch_at) = (0u64, 0u64);
                for &t in tensors {
                    let work = &self.tensors[t];
                    let ranges = self.fallback_ranges(t);
                    // Where each fallback range's bytes are digested: where they landed in a
                    // whole tensor; in scratch only digesting, or for a part.
                    let bases: Vec<u64> = match (target, work.part.is_some()) {
                        (Target::Tensors { ptrs, .. } | Target::Landed { ptrs, .. }, false) => {
                            ranges.iter().map(|r| ptrs[t] + r.0).collect()
                        }
                        (Target::Tensors { scratch, .. } | Target::Landed { scratch, .. }, true)
                        | (Target::DigestOnly { scratch }, _) => ranges
                            .iter()
                            .map(|r| {
                                let at = scratch + scratch_at;
                                scratch_at += r.1 - r.0;
                                at
                            })
                            .collect(),
                    };
                    // Where a byte at unit offset `o` (inside range `i`) is digested.
                    let place = |o: u64| {
                        let i = ranges.partition_point(|r| r.1 <= o);
                        bases[i] + (o - ranges[i].0)
                    };
                    for r in &work.fused {
                        let (src, dst) = match target {
                            Target::Tensors { ptrs, .. } => (r.src, ptrs[t] + r.dst),
                            Target::DigestOnly { .. } => (r.src, 0),
                            Target::Landed { ptrs, .. } => (ptrs[t] + r.dst, 0),
                        };
                        wave.fused.push(FusedRun { src, dst, out: first_chunk + r.out, ..*r });
                    }
                    // A part's bytes that were not digested as they were copied: gathered
                    // from where they landed into scratch, in the part's order.
                    if let (Target::Tensors { ptrs, .. } | Target::Landed { ptrs, .. }, Some(pieces)) =
                        (target, &work.part)
                    {
                        wave.gathers.extend(pieces.iter().map(|piece| CopyDesc {
                            src: ptrs[t] + piece.landed.src,
                            dst: place(piece.at),
                            ..piece.landed
                        }));
                    }
                    match (target, &work.part) {
                        // Written already: nothing to copy.
                        (Target::Landed { .. }, _) => {}
                        (Target::Tensors { ptrs, .. }, part) => {
                            let dst = |o: u64| match part {
                                Some(_) => ptrs[t] + o,
                                None => place(o),
                            };
                            wave.copies.extend(work.copies.iter().map(|c| CopyDesc { dst: dst(c.dst), ..*c }));
                            wave.casts.extend(work.casts.iter().map(|c| CastDesc { dst: dst(c.dst), ..*c }));
                        }
                        (Target::DigestOnly { .. }, None) => {
                            wave.copies.extend(work.copies.iter().map(|c| CopyDesc { dst: place(c.dst), ..*c }));
                            wave.casts.extend(work.casts.iter().map(|c| CastDesc { dst: place(c.dst), ..*c }));
                        }
                        (Target::DigestOnly { .. }, Some(pieces)) => {
                            for piece in pieces {
                                match &piece.from_source {
                                    FromSource::Copy(c) => wave.copies.push(CopyDesc { dst: place(c.dst), ..*c }),
                                    FromSource::Cast(c) => wave.casts.push(CastDesc { dst: place(c.dst), ..*c }),
                                }
                            }
                        }
                    }
                    for (r, base) in ranges.iter().zip(&bases) {
                        wave.after.push((*base, r.1 - r.0, first_chunk + r.0 / CHUNK_BYTES));
                    }
                    wave.tensors.push(t);
                    wave.tensor_bytes.push(self.tensor_bytes[t]);
                    first_chunk += self.tensor_bytes[t].div_ceil(CHUNK_BYTES);
                }
                wave
            })
            .collect()
    }

    /// Every copy of the plan at the destinations' addresses (casts left out), unfused.
    fn all_copies(&self, destinations: &[u64]) -> Vec<CopyDesc> {
        let mut out = Vec::new();
        for (t, work) in self.tensors.iter().enumerate() {
            for r in &work.fused {
                let (src, dst) = (r.src, destinations[t] + r.dst);
                out.push(CopyDesc { src, dst, rows: 1, row_bytes: r.bytes, src_stride: 0, dst_stride: 0 });
            }
            out.extend(work.copies.iter().map(|c| CopyDesc { dst: destinations[t] + c.dst, ..*c }));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weightlift_core::{destination_manifest, exec, plan, synthetic, PresetOptions, SourceSet, TpRank};

    /// Device memory stood in for by host buffers at made-up addresses, to run a plan's waves
    /// as the kernels would (without casts), here, without a GPU.
    struct FakeMemory(Vec<(u64, Vec<u8>)>);

    impl FakeMemory {
        /// Buffers of `sizes` at addresses from `base` (each on its own 2^36 bytes).
        fn add(&mut self, base: u64, sizes: impl IntoIterator<Item = u64>) -> Vec<u64> {
            let mut ptrs = Vec::new();
            for (i, n) in sizes.into_iter().enumerate() {
                let at = base + ((i as u64) << 36);
                self.0.push((at, vec![0x5a; n as usize]));
                ptrs.push(at);
            }
            ptrs
        }

        fn region(&mut self, addr: u64, len: u64) -> &mut [u8] {
            let (base, bytes) = self
                .0
                .iter_mut()
                .find(|(b, v)| *b <= addr && addr + len <= *b + v.len() as u64)
                .unwrap_or_else(|| panic!("{len} bytes at {addr:#x} lie in no buffer"));
            let at = (addr - *base) as usize;
            &mut bytes[at..at + len as usize]
        }

        fn copy(&mut self, c: &CopyDesc) {
            for r in 0..c.rows.max(1) {
                let row = self.region(c.src + r * c.src_stride, c.row_bytes).to_vec();
                self.region(c.dst + r * c.dst_stride, c.row_bytes).copy_from_slice(&row);
            }
        }

        /// Runs `waves` in launch order; the digest of every tensor, by its index.
        fn run(&mut self, waves: &[Wave]) -> Vec<(usize, u64)> {
            let mut digests = Vec::new();
            for wave in waves {
                assert!(wave.casts.is_empty(), "casts run on a GPU only");
                let mut chunks = std::collections::HashMap::new();
                for r in &wave.fused {
                    let bytes = self.region(r.src, r.bytes).to_vec();
                    if r.dst != 0 {
                        self.region(r.dst, r.bytes).copy_from_slice(&bytes);
                    }
                    for (i, c) in weightlift_core::digest::chunk_digests(&bytes).into_iter().enumerate() {
                        assert!(chunks.insert(r.out + i as u64, c).is_none(), "chunk {} twice", r.out + i as u64);
                    }
                }
                wave.copies.iter().chain(&wave.gathers).for_each(|c| self.copy(c));
                for &(addr, bytes, out) in &wave.after {
                    let bytes = self.region(addr, bytes).to_vec();
                    for (i, c) in weightlift_core::digest::chunk_digests(&bytes).into_iter().enumerate() {
                        assert!(chunks.insert(out + i as u64, c).is_none(), "chunk {} twice", out + i as u64);
                    }
                }
                let mut first = 0;
                for (&t, &bytes) in wave.tensors.iter().zip(&wave.tensor_bytes) {
                    let n = bytes.div_ceil(CHUNK_BYTES);
                    let folded: Vec<u64> = (first..first + n).map(|c| chunks[&c]).collect();
                    digests.push((t, weightlift_core::digest::combine(&folded)));
                    first += n;
                }
            }
            digests.sort_unstable();
            digests
        }
    }

    /// Each rank's pieces of `whole`: of tensor `i` FSDP's dim-0 chunks, or where `last_dim(i)`
    /// chunks of the last dim (pieces that land strided in most engine tensors).
    fn rank_cuts(
        whole: &HostTensors,
        world: u32,
        last_dim: &dyn Fn(usize) -> bool,
    ) -> Vec<(HostTensors, Vec<Option<weightlift_core::Placement>>)> {
        (0..world)
            .map(|r| {
                let mut boxes = crate::tensors::fsdp_boxes(whole.manifest(), r, world);
                for (i, ((offset, shape), spec)) in boxes.iter_mut().zip(whole.manifest().iter()).enumerate() {
                    if !last_dim(i) {
                        continue;
                    }
                    offset.iter_mut().for_each(|o| *o = 0);
                    shape.clone_from(&spec.shape);
                    if let (Some(o), Some(n)) = (offset.last_mut(), shape.last_mut()) {
                        let each = n.div_ceil(u64::from(world));
                        *o = (each * u64::from(r)).min(*n);
                        *n = each.min(*n - *o);
                    }
                }
                whole.cut(&boxes)
            })
            .collect()
    }

    /// A synthetic model's tensors cut over `world` ranks (see [`rank_cuts`]), held in f32 when
    /// `cast` (the engine then in bf16): each rank's pieces, and per TP rank the engine's
    /// tensors and the plan over every rank's pieces.
    struct ShardedCase {
        ranks: Vec<(HostTensors, Vec<Option<weightlift_core::Placement>>)>,
        sources: SourceSet,
        whole_source: SourceSet,
        rules: weightlift_core::RuleSet,
        engine_dtype: Option<weightlift_core::DType>,
    }

    impl ShardedCase {
        fn new(model: &str, world: u32, last_dim: &dyn Fn(usize) -> bool, cast: bool) -> ShardedCase {
            let mut config = synthetic(model).unwrap();
            if cast {
                config.dtype = weightlift_core::DType::F32;
            }
            let rules =
                config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
            let mut whole = HostTensors::synthetic(&config, 11);
            whole.perturb();
            let ranks = rank_cuts(&whole, world, last_dim);
            let (manifests, placements) = ranks.iter().map(|(t, p)| (t.manifest().clone(), p.clone())).unzip();
            ShardedCase {
                ranks,
                sources: SourceSet::placed(manifests, placements).unwrap(),
                whole_source: SourceSet::single(config.source_manifest()),
                rules,
                engine_dtype: cast.then_some(weightlift_core::DType::BF16),
            }
        }

        /// TP rank `tp`'s tensors and its plan over every rank's pieces.
        fn plan(&self, tp: TpRank) -> (Manifest, Plan) {
            let dest = destination_manifest(&self.whole_source, &self.rules, tp, self.engine_dtype, false).unwrap();
            let plan = plan(&self.sources, &dest, &self.rules, tp).unwrap();
            (dest, plan)
        }
    }

    /// The host's digests of `share` from the destinations as they landed: the whole tensor,
    /// or the share's op blocks read back one after another.
    fn host_share_digests(share: &Plan, landed: &[Vec<u8>]) -> Vec<u64> {
        let written = share.share_bytes();
        (0..share.destinations.len())
            .map(|d| {
                if written[d] == share.destinations[d].byte_len() {
                    return weightlift_core::digest::digest(&landed[d]);
                }
                let mut part = Vec::new();
                for op in share.ops.iter().filter(|op| op.dst as usize == d) {
                    let mut block = vec![0u8; share.op_bytes(op) as usize];
                    exec::gather(share, op, &landed[d], &mut block).unwrap();
                    part.extend_from_slice(&block);
                }
                weightlift_core::digest::digest(&part)
            })
            .collect()
    }

    /// Runs each rank's share of `model` cut over `world` ranks (`last_dim` as for
    /// [`rank_cuts`]) into every rank of TP `tp_size`, as the GPU would run its waves (pulled
    /// into the destinations, and digested from the sources alone); panics, naming the case,
    /// unless the ranks together write the whole plan and each share's digests (its part of
    /// each destination, the ops' blocks one after another, as the host paths digest it) agree
    /// on both sides.
    fn check_shares_on_fake_gpu(
        model: &str,
        world: u32,
        tp_size: u32,
        last_dim: &dyn Fn(usize) -> bool,
        wave_chunks: u64,
    ) {
        let case = ShardedCase::new(model, world, last_dim, false);
        for tp in TpRank::all(tp_size) {
            let label = format!("{model} {world} ranks {tp} waves of {wave_chunks} chunks");
            let (dest, plan) = case.plan(tp);
            let mut memory = FakeMemory(Vec::new());
            let dst = memory.add(1 << 56, dest.iter().map(|d| d.byte_len()));
            let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
            for (r, (tensors, _)) in case.ranks.iter().enumerate() {
                let share = plan.share_of(r as u32);
                let src = memory.add((r as u64 + 1) << 48, tensors.manifest().iter().map(|s| s.byte_len()));
                for (i, &at) in src.iter().enumerate() {
                    memory.region(at, tensors.data()[i].len() as u64).copy_from_slice(&tensors.data()[i]);
                }
                let refs: Vec<&[u8]> = tensors.data().iter().map(Vec::as_slice).collect();
                exec::execute(&share, &refs, &mut expected).unwrap();
                let work = Fusion::of(&share, &src, wave_chunks, WaveOrder::LargestFirst).unwrap();
                let pulled = memory.add(1 << 60, [work.scratch_bytes(false).max(1)])[0];
                let ours = memory.run(&work.waves(Target::Tensors { ptrs: &dst, scratch: pulled }));
                let scratch = memory.add(1 << 61, [work.scratch_bytes(true).max(1)])[0];
                let theirs = memory.run(&work.waves(Target::DigestOnly { scratch }));
                let scratch = memory.add(1 << 62, [work.scratch_bytes(false).max(1)])[0];
                let landed_work = Fusion::landed(&share, wave_chunks).unwrap();
                let landed_digests = memory.run(&landed_work.waves(Target::Landed { ptrs: &dst, scratch }));
                memory.0.retain(|(b, _)| *b < 1 << 60);
                let landed: Vec<Vec<u8>> =
                    (0..dest.len()).map(|d| memory.region(dst[d], dest.specs()[d].byte_len()).to_vec()).collect();
                let host: Vec<(usize, u64)> = host_share_digests(&share, &landed).into_iter().enumerate().collect();
                assert_eq!(ours, host, "{label}: rank {r}'s pull digests differ from the host's");
                assert_eq!(theirs, host, "{label}: rank {r}'s own digests differ from the host's");
                assert_eq!(landed_digests, host, "{label}: rank {r}'s digests of what landed differ from the host's");
            }
            for (d, want) in expected.iter().enumerate() {
                let got = memory.region(dst[d], want.len() as u64);
                assert!(got == want.as_slice(), "{label}: `{}`", dest.specs()[d].name);
            }
        }
    }

    /// Shares as the GPU would run them: cuts along dim 0 (FSDP) and along the last dim, into
    /// TP 1, 2 and 4, in small waves; a world of one is a whole plan.
    #[test]
    fn shares_run_as_their_waves_write_every_byte_once_and_digest_as_the_host() {
        for (model, world, tp_size, last_dim, wave_chunks) in [
            ("qwen3-moe-tiny", 4u32, 1, false, WAVE_CHUNKS),
            ("qwen3-moe-tiny", 3, 2, false, 9),
            ("qwen3-tiny", 2, 2, true, 5),
            ("qwen3-tiny", 1, 2, false, 7),
            ("qwen2-tiny", 3, 4, true, WAVE_CHUNKS),
        ] {
            check_shares_on_fake_gpu(model, world, tp_size, &|_| last_dim, wave_chunks);
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// The same for random cuts: each tensor cut along dim 0 or its last dim, 1 to 4 ranks,
        /// TP 1 or 2, waves of any size.
        #[test]
        fn random_cuts_run_as_their_waves_and_digest_as_the_host(
            model in proptest::sample::select(vec!["qwen3-tiny", "qwen3-moe-tiny", "qwen2-tiny"]),
            world in 1u32..=4,
            tp_size in 1u32..=2,
            cuts in proptest::prelude::any::<u64>(),
            wave_chunks in proptest::sample::select(vec![3u64, 11, 64, WAVE_CHUNKS]),
        ) {
            check_shares_on_fake_gpu(model, world, tp_size, &|i| cuts >> (i % 64) & 1 == 1, wave_chunks);
        }
    }

    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn plans_run_on_the_gpu_bit_exact_with_matching_digests() {
        let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
        // Tiny shapes exercise the fallback paths (unaligned parts, row-parallel slices of
        // 64-byte rows); qwen3-0.6b's real shapes mostly fuse.
        // (model, TP size, f32 sources cast to bf16, chunks per wave: small bounds split even
        // tiny models into many waves).
        let cases = [
            ("qwen3-tiny", 1, false, WAVE_CHUNKS),
            ("qwen3-moe-tiny", 2, false, 7),
            ("qwen2-tiny", 4, false, WAVE_CHUNKS),
            ("qwen3-0.6b", 2, false, 20_000),
            ("qwen3-tiny", 2, true, 5),
            ("qwen3-moe-tiny", 1, true, WAVE_CHUNKS),
        ];
        for (case, (model, tp_size, cast, wave_chunks)) in cases.into_iter().enumerate() {
            // Sources read as local memory, or with the loads used for a peer GPU's (same
            // results; a second GPU exercises the real thing in tests/gpu_ipc.rs).
            let source_gpu = if case % 2 == 0 { SourceGpu::This } else { SourceGpu::Peer };
            let mut config = synthetic(model).unwrap();
            if cast {
                config.dtype = weightlift_core::DType::F32;
            }
            let engine_dtype = cast.then_some(weightlift_core::DType::BF16);
            let rules =
                config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
            let source = SourceSet::single(config.source_manifest());
            for tp in TpRank::all(tp_size) {
                let dest = destination_manifest(&source, &rules, tp, engine_dtype, false).unwrap();
                let plan = plan(&source, &dest, &rules, tp).unwrap();
                let mut trainer = HostTensors::synthetic(&config, 5);
                let mut src = GpuTensors::alloc(&gpu, &config.source_manifest()).unwrap();
                let mut dst = GpuTensors::alloc(&gpu, &dest).unwrap();
                dst.fill(&gpu, 0).unwrap();
                let bound =
                    GpuPlan::with_wave_chunks(&gpu, &plan, &src.ptrs(), source_gpu, &dst.ptrs(), wave_chunks).unwrap();
                let expected_digests =
                    ExpectedDigests::with_wave_chunks(&gpu, &plan, &src.ptrs(), wave_chunks).unwrap();
                let (copies, digest_batch) = (bound.copy_batch(&gpu).unwrap(), bound.digest_batch(&gpu).unwrap());
                // Five updates with changing weights, the plan bound once.
                for _ in 0..5 {
                    trainer.perturb();
                    src.upload(&trainer).unwrap();
                    dst.fill(&gpu, 0).unwrap();
                    let digests = bound.update(&gpu).unwrap();
                    let (_, data) = trainer.clone().into_parts();
                    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                    let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
                    exec::execute(&plan, &refs, &mut expected).unwrap();
                    let (_, got) = dst.download().unwrap().into_parts();
                    assert!(got == expected, "{model} {tp}: bytes differ");
                    let cpu: Vec<u64> = expected.iter().map(|b| weightlift_core::digest::digest(b)).collect();
                    assert_eq!(digests, cpu, "{model} {tp}: digests differ");
                    // The sender's digests, from the sources alone, agree.
                    assert_eq!(expected_digests.run(&gpu).unwrap(), cpu, "{model} {tp}: expected digests differ");
                    // The unfused path (copy, then digest; measurement only, no casts) agrees.
                    if !cast {
                        dst.fill(&gpu, 0).unwrap();
                        gpu.run_copies(&copies).unwrap();
                        let unfused = gpu.run_digests(&digest_batch).unwrap();
                        assert_eq!(unfused, cpu, "{model} {tp}: unfused digests differ");
                    }
                }
            }
        }
    }

    /// Each rank of a sharded trainer moves its share on the GPU: the ranks' pulls together
    /// write the whole plan bit for bit, and each share's digests (the part of a destination it
    /// writes, its ops' blocks one after another) equal the host's and the sender's own. Cuts
    /// along dim 0 (FSDP, uneven), along the last dim (row-parallel pieces, which land strided),
    /// with f32 sources cast to bf16, and tiny waves.
    #[test]
    #[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
    fn shares_of_a_sharded_trainer_pull_and_digest_on_the_gpu_as_on_the_host() {
        let gpu = Gpu::open(0).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
        // (model, ranks, TP size, cut the last dim instead of dim 0, f32 cast to bf16, chunks per wave)
        let cases = [
            ("qwen3-moe-tiny", 4, 1, false, false, WAVE_CHUNKS),
            ("qwen3-moe-tiny", 3, 2, false, false, 9),
            ("qwen3-tiny", 2, 2, true, false, WAVE_CHUNKS),
            ("qwen3-tiny", 3, 1, false, true, 5),
            ("qwen3-0.6b", 4, 2, false, false, 20_000),
        ];
        for (model, world, tp_size, last_dim, cast, wave_chunks) in cases {
            let case = ShardedCase::new(model, world, &|_| last_dim, cast);
            for tp in TpRank::all(tp_size) {
                let label = format!("{model} {world} ranks {tp} last dim {last_dim} cast {cast}");
                let (dest, plan) = case.plan(tp);
                let mut dst = GpuTensors::alloc(&gpu, &dest).unwrap();
                dst.fill(&gpu, 0x33).unwrap();
                let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
                let mut shares = Vec::new();
                for (r, (tensors, _)) in case.ranks.iter().enumerate() {
                    let share = plan.share_of(r as u32);
                    let mut src = GpuTensors::alloc(&gpu, tensors.manifest()).unwrap();
                    src.upload(tensors).unwrap();
                    let refs: Vec<&[u8]> = tensors.data().iter().map(Vec::as_slice).collect();
                    exec::execute(&share, &refs, &mut expected).unwrap();
                    let bound =
                        GpuPlan::with_wave_chunks(&gpu, &share, &src.ptrs(), SourceGpu::This, &dst.ptrs(), wave_chunks)
                            .unwrap();
                    let sender = ExpectedDigests::with_wave_chunks(&gpu, &share, &src.ptrs(), wave_chunks).unwrap();
                    shares.push((share, src, bound, sender));
                }
                for (r, (share, _src, bound, sender)) in shares.iter().enumerate() {
                    let ours = bound.update(&gpu).unwrap();
                    let (_, landed) = dst.download().unwrap().into_parts();
                    let host = host_share_digests(share, &landed);
                    assert_eq!(ours, host, "{label}: rank {r}'s share digests differ from the host's");
                    assert_eq!(sender.run(&gpu).unwrap(), host, "{label}: rank {r}'s own digests differ");
                }
                let (_, got) = dst.download().unwrap().into_parts();
                assert!(got == expected, "{label}: bytes differ");
            }
        }
    }
}
