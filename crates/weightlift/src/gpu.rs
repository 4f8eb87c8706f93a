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
/// (at most nine per wave of up to 8 GiB) however many tensors, and its extra device memory is
/// bounded (descriptors and one wave's chunk digests), never a staging copy of the model.
pub struct GpuPlan {
    update: UpdateBatch,
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
    /// Written into the destination tensors at these addresses.
    Tensors(&'a [u64]),
    /// Only digested, as they would be written: the sender's digests of what it means to send.
    /// Bytes that cannot be digested straight from the sources are assembled in `scratch`.
    DigestOnly { scratch: u64 },
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
        check_counts(plan, sources, Some(destinations))?;
        let work = Fusion::of(plan, sources, wave_chunks, source_gpu.wave_order())?;
        let waves = work.waves(Target::Tensors(destinations));
        let descs = work.all_copies(destinations);
        Ok(GpuPlan {
            update: gpu.prepare_update(&waves, source_gpu)?,
            copy_count: descs.len(),
            descs,
            destinations: destinations.iter().zip(&work.tensor_bytes).map(|(&p, &b)| (p, b)).collect(),
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
        check_counts(plan, sources, None)?;
        // A sender digests its own tensors, on its own GPU.
        let work = Fusion::of(plan, sources, wave_chunks, SourceGpu::This.wave_order())?;
        let scratch = gpu.alloc(work.scratch_bytes() as usize)?;
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

fn check_counts(plan: &Plan, sources: &[u64], destinations: Option<&[u64]>) -> Result<(), CudaError> {
    if sources.len() != plan.sources.len() || destinations.is_some_and(|d| d.len() != plan.destinations.len()) {
        return Err(CudaError::Invalid(format!(
            "the plan has {} sources and {} destinations; got {} and {} addresses",
            plan.sources.len(),
            plan.destinations.len(),
            sources.len(),
            destinations.map_or(0, <[u64]>::len)
        )));
    }
    Ok(())
}

/// One destination tensor's share of the work, with addresses relative to the tensor's start
/// (`dst` fields hold offsets until the work is placed).
#[derive(Default)]
struct TensorWork {
    /// Whole chunks copied and digested in one pass; `out` is the tensor's chunk index.
    fused: Vec<FusedRun>,
    copies: Vec<CopyDesc>,
    casts: Vec<CastDesc>,
    /// Chunks the copies and casts write: digested after them.
    fallback_chunks: BTreeSet<u64>,
}

/// A plan's copies sorted, per destination tensor, into fused runs (whole destination chunks
/// from one contiguous source run) and fallback copies and casts.
struct Fusion {
    tensor_bytes: Vec<u64>,
    tensors: Vec<TensorWork>,
    /// The tensors of each wave (see [`waves_of`]).
    waves: Vec<Vec<usize>>,
}

impl Fusion {
    fn of(plan: &Plan, sources: &[u64], wave_chunks: u64, order: WaveOrder) -> Result<Fusion, CudaError> {
        let tensor_bytes: Vec<u64> = plan.destinations.iter().map(|d| d.byte_len()).collect();
        let tensors = (0..tensor_bytes.len()).map(|_| TensorWork::default()).collect();
        let waves = waves_of(&tensor_bytes, wave_chunks, order);
        let mut fusion = Fusion { tensors, tensor_bytes, waves };
        for op in &plan.ops {
            let t = op.dst as usize;
            let dst_elt = plan.destinations[t].dtype.size();
            let src_elt = plan.sources[op.src as usize].spec.dtype.size();
            let src = sources[op.src as usize];
            let cast = plan.cast(op);
            if let Some(cast) = cast {
                if (cast.from, cast.to) != (DType::F32, DType::BF16) {
                    let name = &plan.destinations[t].name;
                    return Err(CudaError::Invalid(format!(
                        "`{name}` needs a {} -> {} cast; the GPU path casts F32 -> BF16 only",
                        cast.from, cast.to
                    )));
                }
            }
            for c in plan.strided(op) {
                if cast.is_some() {
                    fusion.add_cast(
                        t,
                        CastDesc {
                            src: src + c.src_offset * src_elt,
                            dst: c.dst_offset * dst_elt,
                            rows: c.rows,
                            row_elems: c.row_elems,
                            src_stride: c.src_stride * src_elt,
                            dst_stride: c.dst_stride * dst_elt,
                        },
                    );
                } else {
                    fusion.add(
                        t,
                        CopyDesc {
                            src: src + c.src_offset * src_elt,
                            dst: c.dst_offset * dst_elt,
                            rows: c.rows,
                            row_bytes: c.row_elems * dst_elt,
                            src_stride: c.src_stride * src_elt,
                            dst_stride: c.dst_stride * dst_elt,
                        },
                    );
                }
            }
        }
        Ok(fusion)
    }

    fn fused_bytes(&self) -> u64 {
        self.tensors.iter().flat_map(|w| &w.fused).map(|r| r.bytes).sum()
    }

    /// Adds one strided copy into tensor `t` (`c.dst` is the offset in the tensor).
    fn add(&mut self, t: usize, c: CopyDesc) {
        let dst_contiguous = c.rows <= 1 || c.dst_stride == c.row_bytes;
        if !dst_contiguous {
            // Interleaved destination rows: copy, then digest every chunk it spans.
            let end = c.dst + (c.rows - 1) * c.dst_stride + c.row_bytes;
            self.tensors[t].fallback_chunks.extend(c.dst / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES));
            self.tensors[t].copies.push(c);
            return;
        }
        if c.rows <= 1 || c.src_stride == c.row_bytes {
            self.add_run(t, c.dst, c.src, c.rows.max(1) * c.row_bytes);
        } else {
            // A row-parallel slice: each row is contiguous on both sides.
            for r in 0..c.rows {
                self.add_run(t, c.dst + r * c.row_bytes, c.src + r * c.src_stride, c.row_bytes);
            }
        }
    }

    fn add_cast(&mut self, t: usize, c: CastDesc) {
        let end = c.dst + (c.rows.max(1) - 1) * c.dst_stride + c.row_elems * 2;
        self.tensors[t].fallback_chunks.extend(c.dst / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES));
        self.tensors[t].casts.push(c);
    }

    /// A contiguous run at `offset` of tensor `t`: its whole chunks are fused; bytes of chunks
    /// it shares with other runs go the slow way.
    fn add_run(&mut self, t: usize, offset: u64, src: u64, len: u64) {
        let end = offset + len;
        let body_start = offset.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
        let body_end = if end == self.tensor_bytes[t] { end } else { end / CHUNK_BYTES * CHUNK_BYTES };
        let plain = |from: u64, to: u64| CopyDesc {
            src: src + (from - offset),
            dst: from,
            rows: 1,
            row_bytes: to - from,
            src_stride: 0,
            dst_stride: 0,
        };
        let work = &mut self.tensors[t];
        if body_start >= body_end {
            work.copies.push(plain(offset, end));
            work.fallback_chunks.extend(offset / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES));
            return;
        }
        work.fused.push(FusedRun {
            src: src + (body_start - offset),
            dst: body_start,
            bytes: body_end - body_start,
            out: body_start / CHUNK_BYTES,
        });
        if offset < body_start {
            work.copies.push(plain(offset, body_start));
            work.fallback_chunks.insert(offset / CHUNK_BYTES);
        }
        if body_end < end {
            work.copies.push(plain(body_end, end));
            work.fallback_chunks.insert(body_end / CHUNK_BYTES);
        }
    }

    /// Tensor `t`'s fallback chunks as byte ranges of the tensor (consecutive chunks merged).
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

    /// Scratch a digest-only run needs: the largest wave's fallback bytes.
    fn scratch_bytes(&self) -> u64 {
        self.waves
            .iter()
            .map(|tensors| tensors.iter().flat_map(|&t| self.fallback_ranges(t)).map(|(s, e)| e - s).sum::<u64>())
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
                    // Where each fallback range's bytes are written, and where a byte at
                    // tensor offset `o` (inside range `i`) goes.
                    let bases: Vec<u64> = match target {
                        Target::Tensors(ptrs) => ranges.iter().map(|r| ptrs[t] + r.0).collect(),
                        Target::DigestOnly { scratch } => ranges
                            .iter()
                            .map(|r| {
                                let at = scratch + scratch_at;
                                scratch_at += r.1 - r.0;
                                at
                            })
                            .collect(),
                    };
                    let place = |o: u64| {
                        let i = ranges.partition_point(|r| r.1 <= o);
                        bases[i] + (o - ranges[i].0)
                    };
                    for r in &work.fused {
                        let dst = match target {
                            Target::Tensors(ptrs) => ptrs[t] + r.dst,
                            Target::DigestOnly { .. } => 0,
                        };
                        wave.fused.push(FusedRun { dst, out: first_chunk + r.out, ..*r });
                    }
                    wave.copies.extend(work.copies.iter().map(|c| CopyDesc { dst: place(c.dst), ..*c }));
                    wave.casts.extend(work.casts.iter().map(|c| CastDesc { dst: place(c.dst), ..*c }));
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
}
