//! The buckets of the NCCL path on the GPUs at either end. The trainer packs each bucket on
//! its GPU into one of two send buffers (one batch of copies and casts per bucket, laid out as
//! `update::pack` lays a host payload: each op's block in the destination dtype), NCCL moves
//! it into one of the receiver's two staging buffers, and the receiver scatters it into its
//! tensors with the staged path's copy batch. [`Comm::run_buckets`] queues it all, the next
//! bucket's transfer in flight while the last one is packed or scattered.
//!
//! Device memory beyond the tensors: two buckets on the trainer's GPU ([`SenderBuckets`]), two
//! on each receiver's (its [`Staging`] of two buffers), and the copy descriptors.

use weightlift_core::region::strided_copies;
use weightlift_core::Plan;
use weightlift_cuda::{BucketStep, CastDesc, CopyBatch, CopyDesc, CudaError, DeviceBuffer, Gpu, Move};

use crate::gpu::gpu_cast;
use crate::staged::StagedUpdate;
use crate::update::Schedule;

/// The copies and casts that pack bucket `k` of `schedule` from source tensors at `sources`
/// (device addresses, in plan order) into the buffer at `buffer`, as the host's `pack` writes
/// its payload.
pub fn pack_descs(
    plan: &Plan,
    schedule: &Schedule,
    k: usize,
    sources: &[u64],
    buffer: u64,
) -> Result<(Vec<CopyDesc>, Vec<CastDesc>), CudaError> {
    let (mut copies, mut casts) = (Vec::new(), Vec::new());
    for entry in &schedule.buckets[k].entries {
        let op = &entry.op;
        let s = &plan.sources[op.src as usize].spec;
        let d = &plan.destinations[op.dst as usize];
        let (src_elt, dst_elt) = (s.dtype.size(), d.dtype.size());
        let src = *sources.get(op.src as usize).ok_or_else(|| {
            CudaError::Invalid(format!(
                "no address for source {} (`{}`)",
                op.src, plan.sources[op.src as usize].spec.name
            ))
        })?;
        let cast = gpu_cast(plan, op)?;
        let zeros = vec![0; op.extent.len()];
        let at = buffer + entry.payload_offset;
        for c in strided_copies(&s.shape, &op.src_start, &op.extent, &zeros, &op.extent) {
            let (from, to) = (src + c.src_offset * src_elt, at + c.dst_offset * dst_elt);
            match cast {
                Some(_) => casts.push(CastDesc {
                    src: from,
                    dst: to,
                    rows: c.rows,
                    row_elems: c.row_elems,
                    src_stride: c.src_stride * src_elt,
                    dst_stride: c.dst_stride * dst_elt,
                }),
                None => copies.push(CopyDesc {
                    src: from,
                    dst: to,
                    rows: c.rows,
                    row_bytes: c.row_elems * dst_elt,
                    src_stride: c.src_stride * src_elt,
                    dst_stride: c.dst_stride * dst_elt,
                }),
            }
        }
    }
    Ok((copies, casts))
}

/// The trainer's side: two send buffers of a bucket each, and per bucket the batch that packs
/// it into its buffer (`k % 2`), bound to the source tensors' addresses.
pub struct SenderBuckets {
    buffers: [DeviceBuffer; 2],
    packs: Vec<CopyBatch>,
    sizes: Vec<u64>,
    sources: Vec<u64>,
}

impl SenderBuckets {
    pub fn new(
        gpu: &Gpu,
        plan: &Plan,
        schedule: &Schedule,
        sources: &[u64],
        bucket_bytes: u64,
    ) -> Result<SenderBuckets, CudaError> {
        let buffers = [gpu.alloc(bucket_bytes as usize)?, gpu.alloc(bucket_bytes as usize)?];
        let packs = (0..schedule.buckets.len())
            .map(|k| {
                let (copies, casts) = pack_descs(plan, schedule, k, sources, buffers[k % 2].device_ptr())?;
                gpu.prepare_copies_and_casts(&copies, &casts)
            })
            .collect::<Result<_, _>>()?;
        let sizes = schedule.buckets.iter().map(|b| b.bytes).collect();
        Ok(SenderBuckets { buffers, packs, sizes, sources: sources.to_vec() })
    }

    /// Whether these batches read the tensors at `sources` (they were not moved since).
    pub fn reads(&self, sources: &[u64]) -> bool {
        self.sources == sources
    }

    pub fn device_bytes(&self) -> u64 {
        self.buffers.iter().map(|b| b.allocated_bytes() as u64).sum()
    }

    /// The buffers' device addresses.
    pub fn buffers(&self) -> [u64; 2] {
        [0, 1].map(|b| self.buffers[b].device_ptr())
    }

    /// Packs and broadcasts every bucket from `root` (this rank) on `comm`.
    pub fn steps(&self, root: u32) -> Vec<BucketStep<'_>> {
        let moves = self.buffers().map(|buffer| Move::Broadcast { buffer, root });
        self.packs
            .iter()
            .zip(&self.sizes)
            .map(|(pack, &bytes)| BucketStep { bytes, pack: Some(pack), moves, scatter: None })
            .collect()
    }
}

/// The receiver's steps of an update through `update` (a staging of two buffers): every bucket
/// broadcast from `root` into buffer `k % 2`, then scattered into the tensors.
pub fn receiver_steps<'a>(
    update: &'a StagedUpdate<'_>,
    schedule: &Schedule,
    root: u32,
) -> Result<Vec<BucketStep<'a>>, CudaError> {
    let [a, b] = update.buffer_pair()?;
    let moves = [Move::Broadcast { buffer: a, root }, Move::Broadcast { buffer: b, root }];
    (0..schedule.buckets.len())
        .map(|k| {
            let scatter = update.scatter(k % 2, k)?;
            Ok(BucketStep { bytes: schedule.buckets[k].bytes, pack: None, moves, scatter: Some(scatter) })
        })
        .collect()
}

/// Whether receivers planned as `a` and `b` take the same bytes, so that one broadcast feeds
/// both: the same source pieces copied by the same ops into destinations of the same dtypes and
/// shapes. Their buckets at one bucket size, their scatters and their digests are then the
/// same; names may differ.
pub fn same_bytes(a: &Plan, b: &Plan) -> bool {
    a.sources == b.sources
        && a.ops == b.ops
        && a.destinations.len() == b.destinations.len()
        && a.destinations.iter().zip(&b.destinations).all(|(x, y)| x.dtype == y.dtype && x.shape == y.shape)
}

/// The receivers of one update (by their plans) in fan-out classes: the receivers of a class
/// take the same bytes (one communicator, one broadcast per bucket); classes in the order of
/// their first receiver, receivers in the order given.
pub fn fan_out_classes(plans: &[&Plan]) -> Vec<Vec<usize>> {
    let mut classes: Vec<Vec<usize>> = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        match classes.iter_mut().find(|class| same_bytes(plans[class[0]], plan)) {
            Some(class) => class.push(i),
            None => classes.push(vec![i]),
        }
    }
    classes
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use weightlift_core::models::synthetic;
    use weightlift_core::{destination_manifest, plan, DType, PresetOptions, SourceSet, TpRank};
    use weightlift_cuda::Comm;

    use super::*;
    use crate::tensors::HostTensors;
    use crate::update::pack;

    /// A synthetic model (its sources f32 where `cast`), its rules and its sources.
    fn model_case(model: &str, cast: bool) -> (weightlift_core::ModelConfig, weightlift_core::RuleSet, SourceSet) {
        let mut config = synthetic(model).unwrap();
        if cast {
            config.dtype = DType::F32;
        }
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        (config.clone(), rules, SourceSet::single(config.source_manifest()))
    }

    /// Runs copy and cast descriptors over host memory laid out at fake device addresses, as
    /// the batched kernels do (casts as the host's, which the GPU's match bit for bit).
    fn run_on_host(memory: &mut [u8], copies: &[CopyDesc], casts: &[CastDesc]) {
        for c in copies {
            for r in 0..c.rows {
                let (from, to) = ((c.src + r * c.src_stride) as usize, (c.dst + r * c.dst_stride) as usize);
                memory.copy_within(from..from + c.row_bytes as usize, to);
            }
        }
        for c in casts {
            for r in 0..c.rows {
                let n = c.row_elems as usize;
                let from = (c.src + r * c.src_stride) as usize;
                let row = memory[from..from + 4 * n].to_vec();
                let to = (c.dst + r * c.dst_stride) as usize;
                let cast = weightlift_core::Cast { from: DType::F32, to: DType::BF16 };
                weightlift_core::dtype::convert(cast, &row, &mut memory[to..to + 2 * n], n);
            }
        }
    }

    /// Packing on the GPU writes every bucket's payload as the host's `pack` does: the
    /// descriptors, run over host memory standing in for the GPU's, give the same bytes, for
    /// tensor-parallel slices (strided blocks), stacked experts, f32 sources cast to bf16 and
    /// buckets of any size.
    fn check_packing(model: &str, tp_size: u32, cast: bool, bucket_bytes: u64) {
        let (config, rules, source) = model_case(model, cast);
        let trainer = HostTensors::synthetic(&config, 3);
        for tp in TpRank::all(tp_size) {
            let dest = destination_manifest(&source, &rules, tp, cast.then_some(DType::BF16), false).unwrap();
            let plan = plan(&source, &dest, &rules, tp).unwrap();
            let schedule = Schedule::new(&plan, &[], bucket_bytes).unwrap();
            // The sources side by side from address 0, then the bucket buffer.
            let mut memory = Vec::new();
            let mut sources = Vec::new();
            for bytes in trainer.data() {
                sources.push(memory.len() as u64);
                memory.extend_from_slice(bytes);
            }
            let buffer = memory.len() as u64;
            memory.resize(memory.len() + bucket_bytes as usize, 0);
            let mut digests = schedule.digests(&plan);
            for k in 0..schedule.buckets.len() {
                let (copies, casts) = pack_descs(&plan, &schedule, k, &sources, buffer).unwrap();
                memory[buffer as usize..].fill(0xa5);
                run_on_host(&mut memory, &copies, &casts);
                let size = schedule.buckets[k].bytes as usize;
                let mut payload = vec![0u8; size];
                pack(&plan, &schedule, k, &trainer, &mut payload, &mut digests, 1);
                let got = &memory[buffer as usize..buffer as usize + size];
                assert!(got == payload.as_slice(), "{model} {tp} cast {cast}: bucket {k} packs differently");
            }
        }
    }

    #[test]
    fn gpu_packing_lays_buckets_out_as_the_host_packs_them() {
        check_packing("qwen3-tiny", 2, false, 64 << 10);
        check_packing("qwen3-moe-tiny", 2, true, 20_000);
        check_packing("qwen2-tiny", 4, false, 1 << 20);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn gpu_packing_matches_the_host_for_any_bucket_size(
            model in prop::sample::select(vec!["qwen3-tiny", "qwen3-moe-tiny"]),
            tp_size in 1u32..=2,
            cast in any::<bool>(),
            bucket_bytes in 64u64..200_000,
        ) {
            check_packing(model, tp_size, cast, bucket_bytes);
        }
    }

    /// The plans of receivers at the given TP sizes and ranks (and engine dtypes) of one
    /// synthetic model.
    fn receiver_plans(model: &str, receivers: &[(u32, u32, Option<DType>)]) -> Vec<Plan> {
        let (_, rules, source) = model_case(model, false);
        receivers
            .iter()
            .map(|&(size, rank, dtype)| {
                let tp = TpRank { rank, size };
                let dest = destination_manifest(&source, &rules, tp, dtype, false).unwrap();
                plan(&source, &dest, &rules, tp).unwrap()
            })
            .collect()
    }

    /// Replicas that hold the same bytes share a class (one broadcast feeds them), whatever
    /// else they are: three TP 1 replicas are one class; two TP 2 replicas make two classes,
    /// one per rank; an engine that casts to another dtype is a class of its own.
    #[test]
    fn replicas_that_hold_the_same_bytes_share_one_broadcast() {
        let receivers = [
            (1, 0, None),
            (2, 0, None),
            (2, 1, None),
            (1, 0, None),
            (2, 1, None),
            (2, 0, None),
            (1, 0, Some(DType::F32)),
            (1, 0, None),
        ];
        for model in ["qwen3-tiny", "qwen3-moe-tiny"] {
            let plans = receiver_plans(model, &receivers);
            let refs: Vec<&Plan> = plans.iter().collect();
            assert_eq!(fan_out_classes(&refs), vec![vec![0, 3, 7], vec![1, 5], vec![2, 4], vec![6]], "{model}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        /// For any mix of replicas, the classes partition the receivers, and two receivers
        /// share one exactly when they are the same rank of the same TP size (the synthetic
        /// models' ranks all hold different bytes).
        #[test]
        fn fan_out_classes_are_the_receivers_of_one_tp_rank(
            picks in prop::collection::vec((0u32..3, 0u32..4), 1..10),
        ) {
            let receivers: Vec<(u32, u32, Option<DType>)> =
                picks.iter().map(|&(log, rank)| (1 << log, rank % (1 << log), None)).collect();
            let plans = receiver_plans("qwen3-tiny", &receivers);
            let refs: Vec<&Plan> = plans.iter().collect();
            let classes = fan_out_classes(&refs);
            let mut seen: Vec<usize> = classes.iter().flatten().copied().collect();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..receivers.len()).collect::<Vec<_>>());
            for (a, class) in classes.iter().enumerate() {
                for &i in class {
                    prop_assert_eq!(receivers[i].0, receivers[class[0]].0);
                    prop_assert_eq!(receivers[i].1, receivers[class[0]].1);
                }
                for other in &classes[a + 1..] {
                    prop_assert!(receivers[other[0]] != receivers[class[0]]);
                }
            }
        }
    }

    #[test]
    fn a_cast_the_gpu_cannot_do_names_the_tensor() {
        let mut config = synthetic("qwen3-tiny").unwrap();
        config.dtype = DType::F32;
        let rules =
            config.preset.rules(PresetOptions { head_dim: Some(config.head_dim), expert_parallel: false }).unwrap();
        let source = SourceSet::single(config.source_manifest());
        let tp = TpRank { rank: 0, size: 1 };
        let dest = destination_manifest(&source, &rules, tp, Some(DType::F16), false).unwrap();
        let plan = plan(&source, &dest, &rules, tp).unwrap();
        let schedule = Schedule::new(&plan, &[], 1 << 20).unwrap();
        let sources = vec![0; plan.sources.len()];
        let err = pack_descs(&plan, &schedule, 0, &sources, 0).unwrap_err().to_string();
        assert!(err.contains("F32 -> F16") && err.contains('`'), "{err}");
    }

    /// The NCCL path end to end on one GPU, as one rank sending to itself: buckets packed on
    /// the GPU from the trainer's tensors, moved by NCCL (grouped send and receive) through
    /// two buffers a side, scattered into the engine's tensors; the tensors equal the host's
    /// execution of the plan bit for bit, and their digests on the GPU equal the host's.
    #[test]
    #[ignore = "needs a GPU and NCCL: run scripts/gpu-tests.sh on a GPU machine"]
    fn buckets_packed_moved_by_nccl_and_scattered_on_the_gpu_equal_the_host() {
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use weightlift_core::exec;
        use weightlift_cuda::UniqueId;

        use crate::gpu::GpuTensors;
        use crate::staged::{Buffers, Staging};

        let gpu = Arc::new(Gpu::open(0).unwrap_or_else(|e| panic!("needs a GPU: {e}")));
        let id = UniqueId::new().unwrap_or_else(|e| panic!("needs NCCL: {e}"));
        let mut comm = Comm::init(&gpu, &id, 0, 1, Duration::from_secs(60)).unwrap();
        // (model, TP size, f32 sources cast to bf16, bucket bytes)
        let cases = [
            ("qwen3-tiny", 2, false, 64u64 << 10),
            ("qwen3-moe-tiny", 1, true, 20_000),
            ("qwen3-moe-tiny", 2, false, 4096),
            ("qwen3-0.6b", 2, false, 8 << 20),
        ];
        for (model, tp_size, cast, bucket_bytes) in cases {
            let (config, rules, source) = model_case(model, cast);
            let mut trainer = HostTensors::synthetic(&config, 11);
            for tp in TpRank::all(tp_size) {
                let label = format!("{model} {tp} cast {cast} buckets of {bucket_bytes}");
                let dest = destination_manifest(&source, &rules, tp, cast.then_some(DType::BF16), false).unwrap();
                let plan = plan(&source, &dest, &rules, tp).unwrap();
                let schedule = Schedule::new(&plan, &[], bucket_bytes).unwrap();
                let mut src = GpuTensors::alloc(&gpu, trainer.manifest()).unwrap();
                let mut dst = GpuTensors::alloc(&gpu, &dest).unwrap();
                let sender = SenderBuckets::new(&gpu, &plan, &schedule, &src.ptrs(), bucket_bytes).unwrap();
                let staging =
                    Staging::new(gpu.clone(), &plan, &schedule, dst.ptrs(), bucket_bytes, Buffers::Pair).unwrap();
                let update = staging.update(&plan, &schedule, false).unwrap();
                let (from, to) = (sender.buffers(), update.buffer_pair().unwrap());
                let moves = [0, 1].map(|b| Move::ToSelf { from: from[b], to: to[b] });
                // Three updates with changing weights, everything bound once.
                for _ in 0..3 {
                    trainer.perturb();
                    src.upload(&trainer).unwrap();
                    dst.fill(&gpu, 0x5a).unwrap();
                    let steps: Vec<BucketStep> = (0..schedule.buckets.len())
                        .map(|k| BucketStep {
                            bytes: schedule.buckets[k].bytes,
                            pack: Some(&sender.packs[k]),
                            moves,
                            scatter: Some(update.scatter(k % 2, k).unwrap()),
                        })
                        .collect();
                    comm.run_buckets(&gpu, &steps, Instant::now() + Duration::from_secs(30)).unwrap();
                    let ours = update.digests().unwrap();
                    let refs: Vec<&[u8]> = trainer.data().iter().map(Vec::as_slice).collect();
                    let mut expected: Vec<Vec<u8>> = dest.iter().map(|d| vec![0; d.byte_len() as usize]).collect();
                    exec::execute(&plan, &refs, &mut expected).unwrap();
                    let (_, got) = dst.download().unwrap().into_parts();
                    let wrong: Vec<&str> = (0..got.len())
                        .filter(|&d| got[d] != expected[d])
                        .map(|d| plan.destinations[d].name.as_str())
                        .collect();
                    assert!(wrong.is_empty(), "{label}: bytes differ in {wrong:?}");
                    let host: Vec<u64> = expected.iter().map(|b| weightlift_core::digest::digest(b)).collect();
                    assert_eq!(ours, host, "{label}: digests differ");
                }
            }
        }
    }
}
