//! GPU tests: ignored by default (`cargo test` shows why), run on a GPU machine with
//! `scripts/gpu-tests.sh`. Each also checks at run time that a GPU is there.

use weightlift_core::digest::digest;

use crate::{
    device_count, driver_present, CopyDesc, CudaError, FusedKernel, FusedRun, Gpu, Lane, OwnedDeviceMemory, SourceGpu,
    Wave,
};

const NEEDS_GPU: &str = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine";

/// GPU 0, for the crate's GPU tests.
pub(crate) fn gpu() -> Gpu {
    match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => panic!("{NEEDS_GPU}: {e}"),
    }
}

/// Deterministic bytes that differ everywhere.
pub(crate) fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn without_a_driver_every_entry_point_says_so() {
    if driver_present() {
        return; // Only meaningful where there is no driver (CI); the GPU tests cover the rest.
    }
    assert!(matches!(Gpu::open(0), Err(CudaError::NoDriver)));
    assert!(matches!(device_count(), Err(CudaError::NoDriver)));
    assert_eq!(Gpu::open(0).err().unwrap().to_string(), "no CUDA driver found (libcuda.so could not be loaded)");
}

/// Sizes from 0 to 5 MiB: empty, under a stripe, around stripes and the kernel's 128-byte
/// step, around chunks, and odd sizes.
const SIZES: [usize; 24] = [
    0,
    1,
    7,
    8,
    31,
    32,
    33,
    63,
    255,
    256,
    257,
    4095,
    4096,
    4097,
    4127,
    8191,
    12_289,
    65_536 + 5,
    65_536 + 256 + 31,
    100_000,
    (1 << 20) + 3,
    (3 << 20) + 4096 + 224,
    (5 << 20) - 1,
    5 << 20,
];

/// (source, destination) offsets from a 256-byte boundary: 8-byte aligned pairs (the fast
/// path) and every misalignment, from either side. 13 of them, so that the cases that are
/// only digested (every third) meet each of them too.
const OFFSETS: [(usize, usize); 13] =
    [(0, 0), (8, 0), (0, 8), (4, 12), (3, 0), (0, 5), (16, 1), (2, 6), (12, 4), (1, 7), (32, 48), (24, 40), (0, 0)];

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn gpu_digest_equals_cpu_digest_for_many_sizes_and_alignments() {
    let gpu = gpu();
    let data = bytes((6 << 20) + 64, 7);
    let mut buf = gpu.alloc(data.len()).unwrap();
    buf.upload(&data).unwrap();
    // Regions at aligned and unaligned offsets in one batch.
    let mut regions = Vec::new();
    let mut expected = Vec::new();
    for (i, &len) in SIZES.iter().enumerate() {
        let offset = [0usize, 8, 3, 256, 4, 12, 1, 16, 2][i % 9];
        regions.push((buf.device_ptr() + offset as u64, len as u64));
        expected.push(digest(&data[offset..offset + len]));
    }
    let batch = gpu.prepare_digests(&regions).unwrap();
    assert_eq!(gpu.run_digests(&batch).unwrap(), expected);
    // Reused batches give the same answer (a plan's digests are prepared once).
    assert_eq!(gpu.run_digests(&batch).unwrap(), expected);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn raw_chunk_digests_equal_the_hosts_and_the_digester_grows() {
    let gpu = gpu();
    let data = bytes((6 << 20) + 64, 11);
    let mut buf = gpu.alloc(data.len()).unwrap();
    buf.upload(&data).unwrap();
    let mut digester = crate::ChunkDigester::default();
    // One region first (small buffers), then many at odd offsets (the buffers grow).
    let mut cases: Vec<Vec<(usize, usize)>> = vec![vec![(0, 4096)]];
    cases.push(SIZES.iter().enumerate().map(|(i, &len)| ([0usize, 8, 3, 256, 4, 12, 1, 16, 2][i % 9], len)).collect());
    cases.push(vec![(0, 0)]);
    for regions in cases {
        let expected: Vec<u64> =
            regions.iter().flat_map(|&(at, len)| weightlift_core::digest::chunk_digests(&data[at..at + len])).collect();
        let device: Vec<(u64, u64)> =
            regions.iter().map(|&(at, len)| (buf.device_ptr() + at as u64, len as u64)).collect();
        assert_eq!(gpu.chunk_digests(&mut digester, &device).unwrap(), expected);
    }
    assert!(digester.device_bytes() > 0);
}

/// The runs of one destination tensor: split at a chunk in the middle (with an empty run
/// between) when it has two chunks or more, so runs start at chunks other than 0.
fn runs_of(src: u64, dst: u64, len: u64, out: u64) -> Vec<FusedRun> {
    let chunks = len.div_ceil(4096);
    if chunks < 2 {
        return if len == 0 { vec![] } else { vec![FusedRun { src, dst, bytes: len, out }] };
    }
    let m = chunks / 2;
    let dst_at = |d: u64| if dst == 0 { 0 } else { dst + d };
    vec![
        FusedRun { src, dst, bytes: m * 4096, out },
        FusedRun { src: src + m * 4096, dst: dst_at(m * 4096), bytes: 0, out: out + m },
        FusedRun { src: src + m * 4096, dst: dst_at(m * 4096), bytes: len - m * 4096, out: out + m },
    ]
}

/// Copies and digests `cases` (source offset, destination offset or None to only digest,
/// length) as one wave of fused runs, twice; checks every digest against the CPU and every
/// byte of the destination buffer (copies exact, nothing else written).
fn check_fused(gpu: &Gpu, cases: &[(usize, Option<usize>, usize)], seed: u64) {
    let src_len = cases.iter().map(|c| c.0 + c.2).max().unwrap_or(0) + 64;
    let dst_len = cases.iter().filter_map(|c| c.1.map(|d| d + c.2)).max().unwrap_or(0) + 64;
    let data = bytes(src_len, seed);
    let mut src = gpu.alloc(src_len).unwrap();
    src.upload(&data).unwrap();
    let mut dst = gpu.alloc(dst_len).unwrap();
    let (s, d) = (src.device_ptr(), dst.device_ptr());
    let (mut fused, mut tensor_bytes, mut out) = (Vec::new(), Vec::new(), 0u64);
    let mut expected_digests = Vec::new();
    let mut expected_dst = vec![0x5au8; dst_len];
    for &(so, dof, len) in cases {
        let dst_addr = dof.map_or(0, |o| d + o as u64);
        fused.extend(runs_of(s + so as u64, dst_addr, len as u64, out));
        out += (len as u64).div_ceil(4096);
        tensor_bytes.push(len as u64);
        expected_digests.push(digest(&data[so..so + len]));
        if let Some(o) = dof {
            expected_dst[o..o + len].copy_from_slice(&data[so..so + len]);
        }
    }
    let wave = Wave { tensors: (0..tensor_bytes.len()).collect(), fused, tensor_bytes, ..Wave::default() };
    // Every fused kernel this GPU can run (the staged one from compute capability 9.0, the
    // direct ones with block and plain loads everywhere), each batch run twice.
    let local = gpu.prepare_update(std::slice::from_ref(&wave), SourceGpu::This).unwrap().fused_kernel();
    let (major, _) = gpu.context().compute_capability().unwrap();
    assert_eq!(local, if major >= 9 { FusedKernel::Staged } else { FusedKernel::BlockLoads });
    let peer = gpu.prepare_update(std::slice::from_ref(&wave), SourceGpu::Peer).unwrap().fused_kernel();
    assert_eq!(peer, FusedKernel::PlainLoads);
    assert_eq!(gpu.fused_kernels().contains(&FusedKernel::Staged), major >= 9);
    // With the folds joined at the end and left aside (a streamed bucket's).
    for (kernel, aside) in gpu.fused_kernels().into_iter().flat_map(|k| [(k, false), (k, true)]) {
        let mut batch = gpu.prepare_update(std::slice::from_ref(&wave), SourceGpu::This).unwrap();
        batch.set_fused_kernel(gpu, kernel).unwrap();
        batch.set_fold_aside(aside);
        for run in 0..2 {
            dst.fill(gpu, 0x5a).unwrap();
            let label = format!("{kernel:?}, folds aside {aside}, run {run}");
            assert_eq!(gpu.run_update(&batch).unwrap(), expected_digests, "{label}");
            let mut got = vec![0u8; dst_len];
            dst.download(&mut got).unwrap();
            let first_bad = got.iter().zip(&expected_dst).position(|(g, e)| g != e);
            assert!(first_bad.is_none(), "{label}: destination byte {first_bad:?} differs");
        }
    }
}

/// Updates queued back to back (a streamed bucket launched before the last one is waited for)
/// each give their own digests; a batch launched again before it was waited for is refused.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn updates_launched_ahead_give_their_own_digests_and_one_batch_runs_once_at_a_time() {
    let gpu = gpu();
    let len = (5 << 20) + 77;
    let data = bytes(2 * len, 21);
    let mut src = gpu.alloc(2 * len).unwrap();
    src.upload(&data).unwrap();
    let dst = gpu.alloc(2 * len).unwrap();
    let batch_of = |at: usize| {
        let (s, d) = (src.device_ptr() + at as u64, dst.device_ptr() + at as u64);
        let wave = Wave {
            tensors: vec![0],
            fused: runs_of(s, d, len as u64, 0),
            tensor_bytes: vec![len as u64],
            ..Wave::default()
        };
        let mut batch = gpu.prepare_update(&[wave], SourceGpu::This).unwrap();
        batch.set_fold_aside(true);
        batch
    };
    let (first, second) = (batch_of(0), batch_of(len));
    for _ in 0..3 {
        let a = gpu.launch_update(&first).unwrap();
        assert!(gpu.launch_update(&first).is_err(), "the same batch twice in flight");
        let b = gpu.launch_update(&second).unwrap();
        assert_eq!(a.wait().unwrap(), [digest(&data[..len])]);
        assert_eq!(b.wait().unwrap(), [digest(&data[len..])]);
    }
    let mut got = vec![0u8; 2 * len];
    dst.download(&mut got).unwrap();
    assert!(got == data);
    // Dropped unwaited, it still waits: the batch can be launched again at once.
    drop(gpu.launch_update(&first).unwrap());
    assert_eq!(gpu.run_update(&first).unwrap(), [digest(&data[..len])]);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn fused_copy_and_digest_match_the_host_at_every_alignment() {
    let gpu = gpu();
    let (mut src_at, mut dst_at) = (0usize, 0usize);
    let cases: Vec<(usize, Option<usize>, usize)> = SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let (so, dof) = OFFSETS[i % OFFSETS.len()];
            let s = src_at.next_multiple_of(256) + so;
            src_at = s + len;
            let d = (i % 3 != 2).then(|| {
                let d = dst_at.next_multiple_of(256) + dof;
                dst_at = d + len;
                d
            });
            (s, d, len)
        })
        .collect();
    check_fused(&gpu, &cases, 5);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn fused_runs_larger_than_one_wave_of_threads_stride_the_grid() {
    // ~260 MiB each: more chunks than the threads of a whole GPU, so every thread of the
    // kernel takes several chunks (the small test above gives each thread one at most), and
    // large enough to be folded early (see EARLY_FOLD_CHUNKS).
    let gpu = gpu();
    let len: usize = (260 << 20) + 4096 + 33;
    // Copied, digested in place, and a small unaligned copy: the three runs share one grid, so
    // its stride crosses from run to run.
    let second = (len + 64).next_multiple_of(256) + 8;
    let third = (second + len).next_multiple_of(256) + 3;
    let cases = [(0, Some(0), len), (second, None, len), (third, Some(len.next_multiple_of(256) + 5), 1000)];
    check_fused(&gpu, &cases, 9);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn a_tensor_folded_early_on_its_own_matches_the_host() {
    // Two tensors folded early, one with more than twice the chunks of the other: it is copied
    // and folded alone, first (see EARLY_FOLD_CHUNKS), then the other, then a small one.
    let gpu = gpu();
    let large: usize = (300 << 20) + 4096 + 7;
    let early: usize = (130 << 20) + 33;
    let second = (large + 64).next_multiple_of(256) + 16;
    let third = (second + early).next_multiple_of(256) + 1;
    let cases = [(0, Some(0), large), (second, None, early), (third, Some(large.next_multiple_of(256) + 9), 5000)];
    check_fused(&gpu, &cases, 3);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn batched_strided_copies_match_a_host_copy() {
    let gpu = gpu();
    let src_host = bytes(1 << 20, 3);
    let mut src = gpu.alloc(src_host.len()).unwrap();
    src.upload(&src_host).unwrap();
    let mut dst = gpu.alloc(1 << 20).unwrap();
    dst.upload(&vec![0u8; 1 << 20]).unwrap();
    let (s, d) = (src.device_ptr(), dst.device_ptr());
    // Contiguous aligned, contiguous odd-sized, strided rows (row-parallel), 4-byte and 1-byte paths.
    let descs = [
        CopyDesc { src: s, dst: d, rows: 1, row_bytes: 200_000, src_stride: 0, dst_stride: 0 },
        CopyDesc { src: s + 300_000, dst: d + 200_016, rows: 1, row_bytes: 77_777, src_stride: 0, dst_stride: 0 },
        CopyDesc { src: s + 400_000, dst: d + 300_000, rows: 64, row_bytes: 1024, src_stride: 4096, dst_stride: 1024 },
        CopyDesc { src: s + 700_004, dst: d + 400_004, rows: 10, row_bytes: 100, src_stride: 300, dst_stride: 100 },
        CopyDesc {
            src: s + 800_001,
            dst: d + 500_003,
            rows: 3,
            row_bytes: 70_001,
            src_stride: 70_001,
            dst_stride: 70_005,
        },
    ];
    let mut expected = vec![0u8; 1 << 20];
    for c in &descs {
        for r in 0..c.rows {
            let so = (c.src - s + r * c.src_stride) as usize;
            let dof = (c.dst - d + r * c.dst_stride) as usize;
            expected[dof..dof + c.row_bytes as usize].copy_from_slice(&src_host[so..so + c.row_bytes as usize]);
        }
    }
    let batch = gpu.prepare_copies(&descs).unwrap();
    gpu.run_copies(&batch).unwrap();
    gpu.synchronize().unwrap();
    let mut got = vec![0u8; 1 << 20];
    dst.download(&mut got).unwrap();
    assert!(got == expected, "batched copy differs from the host copy");
}

/// Casts f32 `input` on the GPU as `casts(src, dst)` lays it out into `out_elems` bf16 values,
/// as one update: returns the bf16 bytes and their digest as the update computed it.
fn cast_on_gpu(
    gpu: &Gpu,
    input: &[u8],
    out_elems: u64,
    casts: impl FnOnce(u64, u64) -> Vec<crate::CastDesc>,
) -> (Vec<u8>, u64) {
    let mut src = gpu.alloc(input.len()).unwrap();
    src.upload(input).unwrap();
    let mut dst = gpu.alloc(out_elems as usize * 2).unwrap();
    dst.fill(gpu, 0).unwrap();
    let d = dst.device_ptr();
    let casts = casts(src.device_ptr(), d);
    let wave = crate::Wave {
        tensors: vec![0],
        casts,
        after: vec![(d, out_elems * 2, 0)],
        tensor_bytes: vec![out_elems * 2],
        ..Default::default()
    };
    let digests = gpu.run_update(&gpu.prepare_update(&[wave], SourceGpu::This).unwrap()).unwrap();
    let mut got = vec![0u8; out_elems as usize * 2];
    dst.download(&mut got).unwrap();
    (got, digests[0])
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn f32_to_bf16_casts_round_to_nearest_even_like_the_host_and_are_digested() {
    use crate::CastDesc;
    use weightlift_core::{dtype::convert, Cast, DType};
    let gpu = gpu();
    // Random bit patterns (every exponent, subnormals, infinities) and the rounding ties.
    let mut values: Vec<f32> = bytes(1 << 20, 11)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .filter(|v| !v.is_nan())
        .collect();
    values.extend([
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
        f32::MAX,
        f32::MIN_POSITIVE / 3.0,
        -0.0,
        f32::INFINITY,
    ]);
    let elems = values.len() as u64;
    let src_host: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    // Two halves: the first contiguous, the second as 2-D rows of 1000 (a row-parallel slice
    // writes rows of the destination from strided source rows).
    let half = elems / 2 / 1000 * 1000;
    let rows = (elems - half) / 1000;
    let cast_elems = half + rows * 1000;
    let (got, got_digest) = cast_on_gpu(&gpu, &src_host, cast_elems, |s, d| {
        vec![
            CastDesc { src: s, dst: d, rows: 1, row_elems: half, src_stride: 0, dst_stride: 0 },
            CastDesc {
                src: s + half * 4,
                dst: d + half * 2,
                rows,
                row_elems: 1000,
                src_stride: 4000,
                dst_stride: 2000,
            },
        ]
    });
    let mut expected = vec![0u8; cast_elems as usize * 2];
    convert(Cast { from: DType::F32, to: DType::BF16 }, &src_host, &mut expected, cast_elems as usize);
    let first_bad = got.chunks(2).zip(expected.chunks(2)).position(|(g, e)| g != e);
    assert!(first_bad.is_none(), "element {first_bad:?} differs: {}", values[first_bad.unwrap()]);
    assert_eq!(vec![got_digest], vec![digest(&expected)]);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn f32_to_bf16_casts_match_torch_bit_for_bit_including_nans() {
    use crate::CastDesc;
    // .gpu/run.sh writes torch's reference first (scripts/torch_cast_reference.py).
    let dir = std::env::var("WEIGHTLIFT_TORCH_CAST_DIR")
        .unwrap_or_else(|_| panic!("{NEEDS_GPU}: WEIGHTLIFT_TORCH_CAST_DIR names torch's reference cast"));
    let input = std::fs::read(format!("{dir}/cast_input.f32")).unwrap();
    let expected = std::fs::read(format!("{dir}/cast_torch.bf16")).unwrap();
    let elems = (input.len() / 4) as u64;
    assert_eq!(expected.len() as u64, elems * 2);
    let gpu = gpu();
    let (got, got_digest) = cast_on_gpu(&gpu, &input, elems, |s, d| {
        vec![CastDesc { src: s, dst: d, rows: 1, row_elems: elems, src_stride: 0, dst_stride: 0 }]
    });
    let bad: Vec<usize> =
        (0..elems as usize).filter(|&i| got[2 * i..2 * i + 2] != expected[2 * i..2 * i + 2]).collect();
    assert!(
        bad.is_empty(),
        "{} of {elems} differ from torch, first: input {:#010x}",
        bad.len(),
        u32::from_le_bytes(input[4 * bad[0]..4 * bad[0] + 4].try_into().unwrap())
    );
    assert_eq!(vec![got_digest], vec![digest(&expected)]);
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn large_allocations_span_whole_large_pages() {
    // Another process pulls 15% slower from a legacy IPC import whose size is not a multiple of
    // 64 KiB (see ALLOCATION_ROUNDING): what the driver says of the allocation is what it
    // exports. Small ones keep their size.
    use crate::gpu::ALLOCATION_ROUNDING;
    let gpu = gpu();
    for len in [1, 4096 + 3, ALLOCATION_ROUNDING, (61 << 20) + 12_345] {
        let buffer = gpu.alloc(len).unwrap();
        assert_eq!(buffer.len(), len, "the buffer keeps the size asked for");
        let (segments, _) = gpu.locate(&[(buffer.device_ptr(), len as u64)]).unwrap();
        let bytes = segments[0].bytes as usize;
        if len >= ALLOCATION_ROUNDING {
            assert_eq!(bytes, len.next_multiple_of(ALLOCATION_ROUNDING), "{len} bytes asked for");
            assert_eq!(buffer.allocated_bytes(), bytes);
        } else {
            assert!(bytes >= len, "{len} bytes asked for, {bytes} allocated");
            assert_eq!(buffer.allocated_bytes(), len);
        }
    }
}

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn page_locked_ranges_are_told_from_pageable_ones() {
    let gpu = gpu();
    let memory = bytes(3 << 20, 5);
    let (head, tail) = memory.split_at(1 << 20);
    assert_eq!(gpu.unlocked_bytes(&[head, tail]).unwrap(), memory.len() as u64);
    let pinned = gpu.pin_ranges(&[tail]).unwrap();
    assert_eq!(pinned.unpinned_bytes, 0);
    // The page the two ranges share is locked with the tail; the head's first byte is not.
    assert_eq!(gpu.unlocked_bytes(&[head, tail]).unwrap(), head.len() as u64);
    assert_eq!(gpu.unlocked_bytes(&[&tail[4096..], &[]]).unwrap(), 0);
    drop(pinned);
    assert_eq!(gpu.unlocked_bytes(&[tail]).unwrap(), tail.len() as u64);
}

/// NCCL on one GPU: a communicator of one rank moves bytes to itself by broadcast and by a
/// grouped send and receive; a communicator of two whose second rank never comes gives up at
/// its deadline, aborted, instead of hanging. (`WEIGHTLIFT_NCCL` names torch's libnccl.so.2
/// where the loader does not find one.)
#[test]
#[ignore = "needs a GPU and NCCL: run scripts/gpu-tests.sh on a GPU machine"]
fn nccl_moves_bytes_on_one_gpu_and_a_rank_that_never_comes_times_out() {
    use std::time::{Duration, Instant};

    use crate::nccl::{nccl_available, Comm, NcclError, UniqueId};
    let gpu = gpu();
    let info = nccl_available().unwrap_or_else(|e| panic!("{e}"));
    assert!(info.version >= 21700, "{info:?}");
    let id = UniqueId::new().unwrap();
    assert_eq!(UniqueId::from_hex(&id.to_hex()), Some(id));
    let mut comm = Comm::init(&gpu, &id, 0, 1, Duration::from_secs(60)).unwrap();
    let len = (1 << 20) + 3;
    let data = bytes(len, 17);
    let mut src = gpu.alloc(len).unwrap();
    src.upload(&data).unwrap();
    let deadline = || Instant::now() + Duration::from_secs(30);
    for grouped in [false, true] {
        let mut dst = gpu.alloc(len).unwrap();
        dst.fill(&gpu, 0).unwrap();
        match grouped {
            false => comm.broadcast(&gpu, Lane::Main, src.device_ptr(), dst.device_ptr(), len, 0, deadline()).unwrap(),
            true => {
                let (s, d) = ([(src.device_ptr(), len, 0)], [(dst.device_ptr(), len, 0)]);
                comm.exchange(&gpu, Lane::Main, &s, &d, deadline()).unwrap()
            }
        }
        gpu.synchronize().unwrap();
        let mut got = vec![0u8; len];
        dst.download(&mut got).unwrap();
        assert!(got == data, "grouped {grouped}: bytes differ");
    }
    drop(comm);
    let started = Instant::now();
    let lonely = Comm::init(&gpu, &UniqueId::new().unwrap(), 0, 2, Duration::from_secs(2));
    assert!(matches!(lonely, Err(NcclError::Timeout { .. })), "{:?}", lonely.err());
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
}

/// The bucket pipeline of the NCCL path on one GPU: five buckets packed into two send buffers,
/// sent by this one rank to itself into two receive buffers and scattered from there, each
/// buffer reused while the other bucket is in flight: every byte lands where it belongs.
#[test]
#[ignore = "needs a GPU and NCCL: run scripts/gpu-tests.sh on a GPU machine"]
fn nccl_buckets_run_through_two_buffers_a_side_and_land_in_place() {
    use std::time::{Duration, Instant};

    use crate::nccl::{BucketStep, Comm, Move, UniqueId};
    let gpu = gpu();
    let mut comm = Comm::init(&gpu, &UniqueId::new().unwrap(), 0, 1, Duration::from_secs(60)).unwrap();
    let (bucket, count) = ((1usize << 20) + 4096, 5usize);
    let data = bytes(bucket * count, 29);
    let mut src = gpu.alloc(data.len()).unwrap();
    src.upload(&data).unwrap();
    let mut dst = gpu.alloc(data.len()).unwrap();
    dst.fill(&gpu, 0).unwrap();
    let send = [gpu.alloc(bucket).unwrap(), gpu.alloc(bucket).unwrap()];
    let recv = [gpu.alloc(bucket).unwrap(), gpu.alloc(bucket).unwrap()];
    let copy = |from: u64, to: u64| CopyDesc {
        src: from,
        dst: to,
        rows: 1,
        row_bytes: bucket as u64,
        src_stride: 0,
        dst_stride: 0,
    };
    let mut packs = Vec::new();
    let mut scatters = Vec::new();
    for k in 0..count {
        let at = (k * bucket) as u64;
        packs.push(gpu.prepare_copies(&[copy(src.device_ptr() + at, send[k % 2].device_ptr())]).unwrap());
        scatters.push(gpu.prepare_copies(&[copy(recv[k % 2].device_ptr(), dst.device_ptr() + at)]).unwrap());
    }
    let moves = [0, 1].map(|b| Move::ToSelf { from: send[b].device_ptr(), to: recv[b].device_ptr() });
    let steps: Vec<BucketStep> = (0..count)
        .map(|k| BucketStep { bytes: bucket as u64, pack: Some(&packs[k]), moves, scatter: Some(&scatters[k]) })
        .collect();
    comm.run_buckets(&gpu, &steps, Instant::now() + Duration::from_secs(30)).unwrap();
    let mut got = vec![0u8; data.len()];
    dst.download(&mut got).unwrap();
    let wrong = (0..count).filter(|k| got[k * bucket..(k + 1) * bucket] != data[k * bucket..(k + 1) * bucket]);
    assert_eq!(wrong.collect::<Vec<_>>(), Vec::<usize>::new(), "buckets whose bytes differ");
}

/// FP8 quantization on the GPU equals the host's (`weightlift_core::quant::quantize`, itself
/// torch-exact) bit for bit: f32 and bf16 sources read as strided slices of wider tensors (a
/// TP slice), blocks of 128 x 128 with partial edges, per-channel blocks, and blocks of zeros,
/// subnormals, an infinity, NaNs and magnitudes near f32's largest.
#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn fp8_block_quantization_on_the_gpu_equals_the_host_bit_for_bit() {
    use weightlift_core::quant::quantize;
    use weightlift_core::DType;

    use crate::QuantDesc;
    let gpu = gpu();
    // (rows, cols of the slice, cols of the tensor it is cut from, block, source dtype)
    let cases = [
        (300u64, 260u64, 400u64, [128u64, 128u64], DType::F32),
        (384, 256, 512, [128, 128], DType::BF16),
        (257, 129, 129, [1, 129], DType::F32),
        (64, 64, 96, [16, 32], DType::BF16),
    ];
    for (case, &(rows, cols, wide, block, dtype)) in cases.iter().enumerate() {
        let elt = dtype.size();
        let raw = bytes((rows * wide * 4) as usize, 40 + case as u64);
        // Values: small normals from the random bytes, then the adversarial ones.
        let mut full: Vec<f32> =
            raw.chunks_exact(4).map(|c| (i32::from_le_bytes(c.try_into().unwrap()) as f32) / 2e8).collect();
        for r in 0..rows.min(128) as usize {
            for c in 0..cols.min(128) as usize {
                full[r * wide as usize + c] = 0.0;
            }
        }
        full[(rows as usize - 1) * wide as usize + cols as usize - 1] = f32::INFINITY;
        full[(rows as usize - 3) * wide as usize + 5] = f32::NAN;
        full[5 * wide as usize + cols as usize - 7] = 3.0e38;
        full[7 * wide as usize + 200 % cols as usize] = 1e-40;
        if dtype == DType::BF16 {
            // As the trainer holds them: bf16 values (truncated; every bf16 is exact in f32).
            full.iter_mut().for_each(|v| *v = f32::from_bits(v.to_bits() & 0xffff_0000));
        }
        let src_bytes: Vec<u8> = match dtype {
            DType::F32 => full.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => full.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        };
        let slice: Vec<f32> = (0..rows as usize)
            .flat_map(|r| full[r * wide as usize..r * wide as usize + cols as usize].to_vec())
            .collect();
        let grid = [rows.div_ceil(block[0]), cols.div_ceil(block[1])];
        let (mut q, mut scales) = (vec![0u8; slice.len()], vec![0f32; (grid[0] * grid[1]) as usize]);
        quantize(&slice, &[rows, cols], block, &mut q, &mut scales);

        let mut src = gpu.alloc(src_bytes.len()).unwrap();
        src.upload(&src_bytes).unwrap();
        let mut dst = gpu.alloc((rows * cols) as usize).unwrap();
        dst.fill(&gpu, 0x11).unwrap();
        let mut scale = gpu.alloc((grid[0] * grid[1] * 4) as usize).unwrap();
        scale.fill(&gpu, 0x22).unwrap();
        let desc = QuantDesc::new(
            (src.device_ptr(), wide * elt, dtype),
            (dst.device_ptr(), cols),
            (scale.device_ptr(), grid[1] * 4),
            rows,
            cols,
            block,
        )
        .unwrap();
        let batch = gpu.prepare_quant(&[desc]).unwrap();
        gpu.run_quant(&batch).unwrap();
        gpu.synchronize().unwrap();
        let mut got = vec![0u8; q.len()];
        dst.download(&mut got).unwrap();
        let mut got_scales = vec![0u8; scales.len() * 4];
        scale.download(&mut got_scales).unwrap();
        let got_scales: Vec<f32> =
            got_scales.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let label = format!("case {case}: {rows} x {cols} of {wide}, {block:?}, {dtype}");
        let bad_scale = got_scales
            .iter()
            .zip(&scales)
            .position(|(g, e)| !(g.to_bits() == e.to_bits() || (g.is_nan() && e.is_nan())));
        assert!(bad_scale.is_none(), "{label}: scale {bad_scale:?} differs");
        let bad = got.iter().zip(&q).position(|(g, e)| g != e && !((g & 0x7f) == 0x7f && (e & 0x7f) == 0x7f));
        assert!(
            bad.is_none(),
            "{label}: element {bad:?} differs ({:?} vs {:?})",
            bad.map(|i| got[i]),
            bad.map(|i| q[i])
        );
    }
}
