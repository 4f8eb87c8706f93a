//! Plans executed on a GPU: tensors in device memory, a plan's copies and digests prepared
//! once, then each update is one copy launch and one digest launch however many tensors.

use std::collections::BTreeSet;
use weightlift_core::{Manifest, Plan};

use weightlift_cuda::{
    CopyBatch, CopyDesc, CudaError, DeviceBuffer, DigestBatch, FusedRun, Gpu, UpdateBatch, CHUNK_BYTES,
};

use crate::tensors::HostTensors;

/// Alignment of each tensor in a [`GpuTensors`] allocation (as torch's allocator gives).
const ALIGN: u64 = 256;

/// Tensors of a manifest laid out in one device allocation.
pub struct GpuTensors {
    buffer: DeviceBuffer,
    manifest: Manifest,
    offsets: Vec<u64>,
}

impl GpuTensors {
    pub fn alloc(gpu: &Gpu, manifest: &Manifest) -> Result<GpuTensors, CudaError> {
        let mut offsets = Vec::with_capacity(manifest.len());
        let mut at = 0u64;
        for spec in manifest {
            offsets.push(at);
            at = (at + spec.byte_len()).div_ceil(ALIGN) * ALIGN;
        }
        Ok(GpuTensors { buffer: gpu.alloc(at as usize)?, manifest: manifest.clone(), offsets })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Device address of tensor `i`.
    pub fn ptr(&self, i: usize) -> u64 {
        self.buffer.device_ptr() + self.offsets[i]
    }

    /// Every tensor as (address, bytes).
    pub fn regions(&self) -> Vec<(u64, u64)> {
        self.manifest.iter().enumerate().map(|(i, s)| (self.ptr(i), s.byte_len())).collect()
    }

    pub fn fill(&mut self, gpu: &Gpu, value: u8) -> Result<(), CudaError> {
        self.buffer.fill(gpu, value)
    }

    /// Copies host tensors (same manifest) to the device.
    pub fn upload(&mut self, host: &HostTensors) -> Result<(), CudaError> {
        let (manifest, data) = host.clone().into_parts();
        if manifest != self.manifest {
            return Err(CudaError::Invalid("host tensors have a different manifest".into()));
        }
        let mut staging = vec![0u8; self.buffer.len()];
        for (i, bytes) in data.iter().enumerate() {
            let at = self.offsets[i] as usize;
            staging[at..at + bytes.len()].copy_from_slice(bytes);
        }
        self.buffer.upload(&staging)
    }

    /// Copies the tensors back to host memory.
    pub fn download(&self) -> Result<HostTensors, CudaError> {
        let mut staging = vec![0u8; self.buffer.len()];
        self.buffer.download(&mut staging)?;
        let data = self
            .manifest
            .iter()
            .enumerate()
            .map(|(i, s)| staging[self.offsets[i] as usize..(self.offsets[i] + s.byte_len()) as usize].to_vec())
            .collect();
        HostTensors::new(self.manifest.clone(), data).map_err(|e| CudaError::Invalid(e.to_string()))
    }
}

/// A plan bound to device tensors: the update (fused copy+digest where the bytes allow it),
/// and for measurement its copies alone and its digests alone.
pub struct GpuPlan {
    copies: CopyBatch,
    digests: DigestBatch,
    update: UpdateBatch,
    pub copy_count: usize,
    /// Destination bytes copied and digested in one pass (the rest: copied, then digested).
    pub fused_bytes: u64,
}

impl GpuPlan {
    /// Binds `plan` to `sources` (indexed like `plan.sources`) and `destinations` (like
    /// `plan.destinations`). Plans with dtype casts are not run on the GPU yet.
    pub fn new(gpu: &Gpu, plan: &Plan, sources: &GpuTensors, destinations: &GpuTensors) -> Result<GpuPlan, CudaError> {
        if let Some(op) = plan.ops.iter().find(|op| plan.cast(op).is_some()) {
            let name = &plan.destinations[op.dst as usize].name;
            return Err(CudaError::Invalid(format!("`{name}` needs a dtype cast, which the GPU path does not do yet")));
        }
        let tensor_bytes: Vec<u64> = plan.destinations.iter().map(|d| d.byte_len()).collect();
        let mut fusion = Fusion::new(&tensor_bytes);
        let mut descs = Vec::with_capacity(plan.ops.len());
        for op in &plan.ops {
            let t = op.dst as usize;
            let elt = plan.destinations[t].dtype.size();
            let (src, dst) = (sources.ptr(op.src as usize), destinations.ptr(t));
            for c in plan.strided(op) {
                let desc = CopyDesc {
                    src: src + c.src_offset * elt,
                    dst: dst + c.dst_offset * elt,
                    rows: c.rows,
                    row_bytes: c.row_elems * elt,
                    src_stride: c.src_stride * elt,
                    dst_stride: c.dst_stride * elt,
                };
                descs.push(desc);
                fusion.add(t, dst, c.dst_offset * elt, desc);
            }
        }
        let copy_count = descs.len();
        let regions = destinations.regions();
        let fallback_chunks = fusion.fallback_regions(&regions);
        let fused_bytes = fusion.fused.iter().map(|r| r.bytes).sum();
        Ok(GpuPlan {
            copies: gpu.prepare_copies(&descs)?,
            digests: gpu.prepare_digests(&regions)?,
            update: gpu.prepare_update(&fusion.fused, &fusion.fallback, &fallback_chunks, &tensor_bytes)?,
            copy_count,
            fused_bytes,
        })
    }

    /// One update: every copy, and every destination's digest as it then is.
    pub fn update(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_update(&self.update)
    }

    /// Queues every copy (one launch), without digests: for measurement.
    pub fn copy(&self, gpu: &Gpu) -> Result<(), CudaError> {
        gpu.run_copies(&self.copies)
    }

    /// Digests every destination as it now is (two launches), waiting for queued copies.
    pub fn digests(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_digests(&self.digests)
    }
}

/// Sorts a plan's copies into fused runs (whole destination chunks from one contiguous
/// source run) and fallback copies, and records which chunks the fallback copies write.
struct Fusion {
    tensor_bytes: Vec<u64>,
    /// Index of each tensor's first chunk in the update's chunk array.
    first_chunk: Vec<u64>,
    fused: Vec<FusedRun>,
    fallback: Vec<CopyDesc>,
    fallback_chunks: Vec<BTreeSet<u64>>,
}

impl Fusion {
    fn new(tensor_bytes: &[u64]) -> Fusion {
        let mut first_chunk = Vec::with_capacity(tensor_bytes.len());
        let mut at = 0;
        for b in tensor_bytes {
            first_chunk.push(at);
            at += b.div_ceil(CHUNK_BYTES);
        }
        Fusion {
            tensor_bytes: tensor_bytes.to_vec(),
            first_chunk,
            fused: Vec::new(),
            fallback: Vec::new(),
            fallback_chunks: vec![BTreeSet::new(); tensor_bytes.len()],
        }
    }

    /// Adds one strided copy into tensor `t` (at device address `base`), whose first byte lands
    /// at byte `offset` of the tensor.
    fn add(&mut self, t: usize, base: u64, offset: u64, c: CopyDesc) {
        let dst_contiguous = c.rows <= 1 || c.dst_stride == c.row_bytes;
        if !dst_contiguous {
            // Interleaved destination rows: copy, then digest every chunk it spans.
            let end = offset + (c.rows - 1) * c.dst_stride + c.row_bytes;
            self.fallback.push(c);
            self.fallback_chunks[t].extend(offset / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES));
            return;
        }
        if c.rows <= 1 || c.src_stride == c.row_bytes {
            self.add_run(t, base, offset, c.src, c.rows.max(1) * c.row_bytes);
        } else {
            // A row-parallel slice: each row is contiguous on both sides.
            for r in 0..c.rows {
                self.add_run(t, base, offset + r * c.row_bytes, c.src + r * c.src_stride, c.row_bytes);
            }
        }
    }

    /// A contiguous run: its whole chunks are fused; bytes of chunks it shares go the slow way.
    fn add_run(&mut self, t: usize, base: u64, offset: u64, src: u64, len: u64) {
        let end = offset + len;
        let body_start = offset.div_ceil(CHUNK_BYTES) * CHUNK_BYTES;
        let body_end = if end == self.tensor_bytes[t] { end } else { end / CHUNK_BYTES * CHUNK_BYTES };
        let plain = |from: u64, to: u64| CopyDesc {
            src: src + (from - offset),
            dst: base + from,
            rows: 1,
            row_bytes: to - from,
            src_stride: 0,
            dst_stride: 0,
        };
        if body_start >= body_end {
            self.fallback.push(plain(offset, end));
            self.fallback_chunks[t].extend(offset / CHUNK_BYTES..end.div_ceil(CHUNK_BYTES));
            return;
        }
        self.fused.push(FusedRun {
            src: src + (body_start - offset),
            dst: base + body_start,
            bytes: body_end - body_start,
            out: self.first_chunk[t] + body_start / CHUNK_BYTES,
        });
        if offset < body_start {
            self.fallback.push(plain(offset, body_start));
            self.fallback_chunks[t].insert(offset / CHUNK_BYTES);
        }
        if body_end < end {
            self.fallback.push(plain(body_end, end));
            self.fallback_chunks[t].insert(body_end / CHUNK_BYTES);
        }
    }

    /// The fallback chunks as regions to digest: (address, bytes, first out slot).
    fn fallback_regions(&self, regions: &[(u64, u64)]) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        for (t, chunks) in self.fallback_chunks.iter().enumerate() {
            let mut iter = chunks.iter().copied().peekable();
            while let Some(first) = iter.next() {
                let mut last = first;
                while iter.peek() == Some(&(last + 1)) {
                    last = iter.next().expect("peeked");
                }
                let start = first * CHUNK_BYTES;
                let end = ((last + 1) * CHUNK_BYTES).min(self.tensor_bytes[t]);
                out.push((regions[t].0 + start, end - start, self.first_chunk[t] + first));
            }
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
        for (model, tp_size) in [("qwen3-tiny", 1), ("qwen3-moe-tiny", 2), ("qwen2-tiny", 4), ("qwen3-0.6b", 2)] {
            let config = synthetic(model).unwrap();
            let rules =
                config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
            let source = SourceSet::single(config.source_manifest());
            for tp in TpRank::all(tp_size) {
                let dest = destination_manifest(&source, &rules, tp, None, false).unwrap();
                let plan = plan(&source, &dest, &rules, tp).unwrap();
                let mut trainer = HostTensors::synthetic(&config, 5);
                let mut src = GpuTensors::alloc(&gpu, &config.source_manifest()).unwrap();
                let mut dst = GpuTensors::alloc(&gpu, &dest).unwrap();
                dst.fill(&gpu, 0).unwrap();
                let bound = GpuPlan::new(&gpu, &plan, &src, &dst).unwrap();
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
                    // The unfused path (copy, then digest) agrees.
                    dst.fill(&gpu, 0).unwrap();
                    bound.copy(&gpu).unwrap();
                    assert_eq!(bound.digests(&gpu).unwrap(), cpu, "{model} {tp}: unfused digests differ");
                }
            }
        }
    }
}
