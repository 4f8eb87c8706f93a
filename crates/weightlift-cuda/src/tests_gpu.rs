//! GPU tests: ignored by default (`cargo test` shows why), run on a GPU machine with
//! `scripts/gpu-tests.sh`. Each also checks at run time that a GPU is there.

use weightlift_core::digest::digest;

use crate::{device_count, driver_present, CopyDesc, CudaError, Gpu};

const NEEDS_GPU: &str = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine";

fn gpu() -> Gpu {
    match Gpu::open(0) {
        Ok(gpu) => gpu,
        Err(e) => panic!("{NEEDS_GPU}: {e}"),
    }
}

/// Deterministic bytes that differ everywhere.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
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

#[test]
#[ignore = "needs a GPU: run scripts/gpu-tests.sh on a GPU machine"]
fn gpu_digest_equals_cpu_digest_for_many_sizes_and_alignments() {
    let gpu = gpu();
    let sizes = [0usize, 1, 7, 8, 31, 32, 33, 63, 4095, 4096, 4097, 8191, 12_289, 65_536 + 5, (1 << 20) + 3, 5 << 20];
    let data = bytes((6 << 20) + 64, 7);
    let mut buf = gpu.alloc(data.len()).unwrap();
    buf.upload(&data).unwrap();
    // Regions at aligned and unaligned offsets in one batch.
    let mut regions = Vec::new();
    let mut expected = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let offset = [0usize, 8, 3, 256][i % 4];
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
