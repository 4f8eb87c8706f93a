//! Plans executed on a GPU: tensors in device memory, a plan's copies and digests prepared
//! once, then each update is one copy launch and one digest launch however many tensors.

use weightlift_core::{Manifest, Plan};
use weightlift_cuda::{CopyBatch, CopyDesc, CudaError, DeviceBuffer, DigestBatch, Gpu};

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

/// A plan bound to device tensors: its copies and the digests of its destinations.
pub struct GpuPlan {
    copies: CopyBatch,
    digests: DigestBatch,
    pub copy_count: usize,
}

impl GpuPlan {
    /// Binds `plan` to `sources` (indexed like `plan.sources`) and `destinations` (like
    /// `plan.destinations`). Plans with dtype casts are not run on the GPU yet.
    pub fn new(gpu: &Gpu, plan: &Plan, sources: &GpuTensors, destinations: &GpuTensors) -> Result<GpuPlan, CudaError> {
        if let Some(op) = plan.ops.iter().find(|op| plan.cast(op).is_some()) {
            let name = &plan.destinations[op.dst as usize].name;
            return Err(CudaError::Invalid(format!("`{name}` needs a dtype cast, which the GPU path does not do yet")));
        }
        let mut descs = Vec::with_capacity(plan.ops.len());
        for op in &plan.ops {
            let elt = plan.destinations[op.dst as usize].dtype.size();
            let (src, dst) = (sources.ptr(op.src as usize), destinations.ptr(op.dst as usize));
            for c in plan.strided(op) {
                descs.push(CopyDesc {
                    src: src + c.src_offset * elt,
                    dst: dst + c.dst_offset * elt,
                    rows: c.rows,
                    row_bytes: c.row_elems * elt,
                    src_stride: c.src_stride * elt,
                    dst_stride: c.dst_stride * elt,
                });
            }
        }
        let copy_count = descs.len();
        Ok(GpuPlan {
            copies: gpu.prepare_copies(&descs)?,
            digests: gpu.prepare_digests(&destinations.regions())?,
            copy_count,
        })
    }

    /// Queues every copy of the update (one launch).
    pub fn copy(&self, gpu: &Gpu) -> Result<(), CudaError> {
        gpu.run_copies(&self.copies)
    }

    /// Digests every destination as it now is (two launches), waiting for queued copies.
    pub fn digests(&self, gpu: &Gpu) -> Result<Vec<u64>, CudaError> {
        gpu.run_digests(&self.digests)
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
        for (model, tp_size) in [("qwen3-tiny", 1), ("qwen3-moe-tiny", 2), ("qwen2-tiny", 4)] {
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
                    bound.copy(&gpu).unwrap();
                    let digests = bound.digests(&gpu).unwrap();
                    let (_, data) = trainer.clone().into_parts();
                    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
                    let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
                    exec::execute(&plan, &refs, &mut expected).unwrap();
                    let (_, got) = dst.download().unwrap().into_parts();
                    assert!(got == expected, "{model} {tp}: bytes differ");
                    let cpu: Vec<u64> = expected.iter().map(|b| weightlift_core::digest::digest(b)).collect();
                    assert_eq!(digests, cpu, "{model} {tp}: digests differ");
                }
            }
        }
    }
}
