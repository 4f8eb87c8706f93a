//! weightlift's kernels, compiled once per GPU with NVRTC, and batches of work prepared for
//! them. A batch (thousands of copies, or thousands of tensors to digest) is uploaded once
//! and then runs with one or two launches per update, whatever the number of tensors.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::error::{Call, CudaError};
use crate::gpu::{DeviceBuffer, Gpu, OwnedDeviceMemory};

/// Bytes of one digest chunk (the project's digest definition).
pub const CHUNK_BYTES: u64 = 4096;
/// Bytes one block of the copy kernel moves per tile.
const TILE_BYTES: u64 = 64 << 10;
/// Elements one block of the cast kernel converts per tile.
const CAST_TILE_ELEMS: u64 = 16 << 10;
const THREADS: u32 = 256;
/// Blocks per SM of the direct fused copy+digest kernels' grid: a grid that is all resident at once
/// (three blocks of 256 per SM, 24 warps) rather than 32 blocks per SM queued behind each other.
/// Queued grid-striding blocks start their walks 1 GB apart, so the chunks open at once are
/// spread over gigabytes; a resident grid keeps them side by side. Measured on H200 in four
/// runs (bench/results/gpu-h200x2-2026-11-29c/): updates of Qwen3-8B shapes 11.8-12.2 ->
/// 10.3-10.9 ms, Qwen3-30B-A3B 37.5-37.7 -> 35.4-36.8 ms; 2 blocks per SM about the same, 4
/// and 5 no better.
const FUSED_BLOCKS_PER_SM: u32 = 3;
/// Blocks per SM of the fused kernel reading a peer GPU's memory over NVLink: two, fewer
/// reads in flight than three. With three, Qwen3-8B's pull was bimodal from update to update,
/// 44.3 or 47.6 ms, and four or six blocks were slower still (50.8, 49.2 ms); with two it
/// is 44.05-44.56 ms in every update, within 1% of the plan's copies alone (43.6 ms), and
/// Qwen3-30B-A3B's 165.9 -> 164.6 ms (2 x H200, bench/results/peer-reads-h200-2026-11-30.md).
const PEER_BLOCKS_PER_SM: u32 = 2;
/// The staged kernel's shape (see `copy_digest_staged`): blocks of 96 threads (24 chunks a
/// slab), two per SM (96 KiB of pieces each, the most shared memory allows). On H200
/// (bench/results/staged-kernel-h200-2026-11-29.md), Qwen3-8B shapes: update 10.6 -> 8.6 ms.
const STAGED_THREADS: u32 = 96;
const STAGED_BLOCKS_PER_SM: u32 = 2;
/// These three mirror the kernel source's #defines (a test checks they agree).
const STAGED_PIECE_BYTES: u32 = 2048;
const STAGED_STAGES: u32 = 2;
const STAGED_HEADER: u32 = 128;
/// Shared memory of one staged block: the barriers, the stages of every chunk's piece, then
/// where each stage's chunks are.
const STAGED_SHARED_BYTES: u32 =
    STAGED_HEADER + STAGED_STAGES * (STAGED_THREADS / 4) * (STAGED_PIECE_BYTES + 32 + STAGED_CHUNK_INFO_BYTES);
/// The `Chunk` (four 8-byte fields) the kernel keeps per stage and chunk in shared memory.
const STAGED_CHUNK_INFO_BYTES: u32 = 32;
// Whole pieces in a chunk, whole warps (eight whole four-lane groups each), and no more
// shared memory than a block may ask for (227 KiB).
const _: () = assert!(CHUNK_BYTES % STAGED_PIECE_BYTES as u64 == 0 && STAGED_THREADS % 32 == 0);
const _: () = assert!(STAGED_SHARED_BYTES <= 227 << 10);

const SOURCE: &str = r#"
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned char u8;

// Index of the item whose [start[i], start[i+1]) holds `x` (start has n+1 entries).
__device__ __forceinline__ u32 find(const u64* start, u32 n, u64 x) {
    u32 lo = 0, hi = n;
    while (hi - lo > 1) { u32 mid = (lo + hi) >> 1; if (start[mid] <= x) lo = mid; else hi = mid; }
    return lo;
}

// The same, searched forward from `hint` (x's item or one before it; start holds n + 1
// entries, start[n] > x): a thread's chunks only move forward, mostly within one run or a few
// runs on, so this is one or two loads where a search of the whole list is a dependent chain
// of log2(n) (12 for Qwen3-30B-A3B's 2,700 runs a wave), each an L2 round trip.
__device__ __forceinline__ u32 find_from(const u64* start, u32 n, u64 x, u32 hint) {
    if (hint >= n || start[hint] > x) return find(start, n, x);
    u32 lo = hint, hi = hint + 1, step = 1;
    while (start[hi] <= x) { lo = hi; step *= 2; hi = lo + step < n ? lo + step : n; }
    while (hi - lo > 1) { u32 mid = (lo + hi) >> 1; if (start[mid] <= x) lo = mid; else hi = mid; }
    return lo;
}

__device__ __forceinline__ void copy_span(u8* dst, const u8* src, u64 n) {
    u64 t = threadIdx.x;
    if ((((u64)src | (u64)dst | n) & 15) == 0) {
        const uint4* s = (const uint4*)src; uint4* d = (uint4*)dst;
        for (u64 i = t; i < n / 16; i += blockDim.x) d[i] = s[i];
    } else if ((((u64)src | (u64)dst | n) & 3) == 0) {
        const u32* s = (const u32*)src; u32* d = (u32*)dst;
        for (u64 i = t; i < n / 4; i += blockDim.x) d[i] = s[i];
    } else {
        for (u64 i = t; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

// A strided 2-D region pair: `rows` rows of `row_len` units (bytes for copies, elements for
// casts); strides in bytes. CopyDesc and CastDesc on the Rust side share this layout.
struct Rows2D { u64 src, dst, rows, row_len, src_stride, dst_stride; };

// Every descriptor's rows are cut into tiles of `tile_len` units that never cross a row;
// tile_start is the prefix sum of tiles per descriptor. Gives tile `tile`'s row (its source and
// destination addresses) and the unit offset and length of the tile in it.
__device__ __forceinline__ void tile_at(const Rows2D* descs, const u64* tile_start, u32 n, u64 tile, u64 tile_len,
                                        u64* src, u64* dst, u64* off, u64* len) {
    u32 i = find(tile_start, n, tile);
    Rows2D d = descs[i];
    u64 per_row = (d.row_len + tile_len - 1) / tile_len;
    u64 k = tile - tile_start[i];
    u64 row = k / per_row;
    *off = (k % per_row) * tile_len;
    *len = d.row_len - *off < tile_len ? d.row_len - *off : tile_len;
    *src = d.src + row * d.src_stride;
    *dst = d.dst + row * d.dst_stride;
}

// Blocks stride over all tiles of all descriptors (lengths in bytes).
extern "C" __global__ void batched_copy(const Rows2D* descs, const u64* tile_start, u32 n, u64 tile_bytes) {
    for (u64 tile = blockIdx.x; tile < tile_start[n]; tile += gridDim.x) {
        u64 src, dst, off, len;
        tile_at(descs, tile_start, n, tile, tile_bytes, &src, &dst, &off, &len);
        copy_span((u8*)dst + off, (const u8*)src + off, len);
    }
}

// f32 -> bf16, round to nearest even, with the instruction torch's CUDA kernels use (so NaNs,
// infinities and subnormals come out exactly as `.to(torch.bfloat16)` gives them). Tiles as in
// batched_copy, counted in elements.
extern "C" __global__ void batched_cast_f32_bf16(const Rows2D* descs, const u64* tile_start, u32 n, u64 tile_elems) {
    for (u64 tile = blockIdx.x; tile < tile_start[n]; tile += gridDim.x) {
        u64 src_row, dst_row, off, len;
        tile_at(descs, tile_start, n, tile, tile_elems, &src_row, &dst_row, &off, &len);
        const float* src = (const float*)src_row + off;
        unsigned short* dst = (unsigned short*)dst_row + off;
        for (u64 e = threadIdx.x; e < len; e += blockDim.x) {
            unsigned short h;
            asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(src[e]));
            dst[e] = h;
        }
    }
}

#define P1 11400714785074694791ULL
#define P2 14029467366897019727ULL
#define P3 1609587929392839161ULL
#define P4 9650029242287828579ULL
#define P5 2870177450012600261ULL

__device__ __forceinline__ u64 rotl(u64 x, int r) { return (x << r) | (x >> (64 - r)); }
__device__ __forceinline__ u64 xround(u64 acc, u64 input) { acc += input * P2; acc = rotl(acc, 31); return acc * P1; }
__device__ __forceinline__ u64 merge(u64 acc, u64 val) { acc ^= xround(0, val); return acc * P1 + P4; }
__device__ __forceinline__ u64 load64(const u8* p) {
    if (((u64)p & 7) == 0) return *(const u64*)p;
    u64 v = 0; for (int b = 7; b >= 0; --b) v = (v << 8) | p[b]; return v;
}
__device__ __forceinline__ u32 load32(const u8* p) { return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24); }

// xxh64 (seed 0) of `len` bytes at `p`, starting from the four stripe accumulators already
// folded over the first `done` bytes (a multiple of 32).
__device__ u64 xxh64_finish(const u8* p, u64 len, u64 done, u64 v1, u64 v2, u64 v3, u64 v4) {
    u64 h;
    if (len >= 32) {
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4);
    } else {
        h = P5;
    }
    h += len;
    u64 i = done;
    for (; i + 8 <= len; i += 8) { h ^= xround(0, load64(p + i)); h = rotl(h, 27) * P1 + P4; }
    if (i + 4 <= len) { h ^= (u64)load32(p + i) * P1; h = rotl(h, 23) * P2 + P3; i += 4; }
    for (; i < len; ++i) { h ^= (u64)p[i] * P5; h = rotl(h, 11) * P1; }
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

// The chunk's digest from its four lanes' stripe accumulators (every lane of the group calls
// this; lane 0's result is the one kept). `p` holds the chunk's `len` bytes, for the tail.
__device__ __forceinline__ u64 group_finish(u64 v, u32 group_mask, const u8* p, u64 len) {
    int first = threadIdx.x & ~3u;
    u64 v1 = __shfl_sync(group_mask, v, first, 32);
    u64 v2 = __shfl_sync(group_mask, v, first + 1, 32);
    u64 v3 = __shfl_sync(group_mask, v, first + 2, 32);
    u64 v4 = __shfl_sync(group_mask, v, first + 3, 32);
    if ((threadIdx.x & 3) != 0 || p == 0) return 0;
    return xxh64_finish(p, len, len & ~31ULL, v1, v2, v3, v4);
}

struct FusedRun { u64 src, dst, bytes, out; };

// Chunk g of a list of runs (chunk_start: the runs' first chunks, n + 1 entries): where its
// bytes are read and written (dst 0: only digested), how many, and its digest's slot.
struct Chunk { const u8* src; u8* dst; u64 len; u64 slot; };
// `run` is where the search starts (see find_from), and becomes chunk g's run.
__device__ __forceinline__ Chunk chunk_at(const FusedRun* runs, const u64* chunk_start, u32 n, u64 g, u32& run) {
    u32 i = find_from(chunk_start, n, g, run);
    run = i;
    u64 k = g - chunk_start[i];
    FusedRun r = runs[i];
    Chunk c;
    c.src = (const u8*)(r.src + k * 4096);
    c.dst = r.dst ? (u8*)(r.dst + k * 4096) : 0;
    c.len = r.bytes - k * 4096 < 4096 ? r.bytes - k * 4096 : 4096;
    c.slot = r.out + k;
    return c;
}

// xxh64's initial value (seed 0) of the stripe accumulator a lane keeps.
__device__ __forceinline__ u64 stripe_seed(u32 lane) {
    return lane == 0 ? P1 + P2 : lane == 1 ? P2 : lane == 2 ? 0 : 0 - P1;
}

// An 8-byte load of memory no kernel writes while this one runs. From this GPU's memory
// (LOCAL) it asks L2 to fetch the 256-byte block around it from DRAM at once: a four-lane
// group walks its chunk 128 bytes at a time while tens of thousands of groups walk theirs,
// and DRAM serves whole blocks better than the scattered 32-byte sectors a plain load asks
// for (7% faster on H200: bench/results/digest-kernels-h200-2026-11-29.md). On a peer GPU's
// memory, read over NVLink, the hint made updates ~20% slower (2 x H200: 0.76 of the peer
// copy rate, against 0.91 with plain loads a week earlier): there the plain load is used.
template <bool LOCAL> __device__ __forceinline__ u64 ldg64(const u8* p) {
    u64 v;
#if __CUDA_ARCH__ >= 800
    if (LOCAL) {
        asm("ld.global.nc.L2::256B.u64 %0, [%1];" : "=l"(v) : "l"(p));
        return v;
    }
#endif
    v = *(const u64*)p;
    return v;
}

// Copy and digest in one pass: every 4 KiB destination chunk of a run is read once from the
// source, written once, and hashed from the registers it passed through. A run whose `dst` is
// 0 is only digested (memory already in place). Four consecutive threads share a chunk, one
// per xxh64 stripe accumulator, so each 32-byte stripe is one coalesced sector. The grid is
// resident (see FUSED_BLOCKS_PER_SM), so the chunks open at once lie side by side.
template <bool LOCAL> __device__ __forceinline__ void copy_digest_body(const FusedRun* runs, const u64* chunk_start, u32 n, u64* out) {
    u64 total = chunk_start[n];
    u64 groups = ((u64)gridDim.x * blockDim.x) / 4;
    u64 lane = threadIdx.x & 3;
    u32 group_mask = 0xFu << (threadIdx.x & 28);
    u32 run = 0;
    for (u64 base = 0; base < total; base += groups) {
        u64 g = base + ((u64)blockIdx.x * blockDim.x + threadIdx.x) / 4;
        bool active = g < total;
        u64 v = 0, len = 0, slot = 0;
        u8* q = 0;
        if (active) {
            Chunk c = chunk_at(runs, chunk_start, n, g, run);
            slot = c.slot;
            const u8* p = c.src;
            q = c.dst;
            len = c.len;
            v = stripe_seed(lane);
            u64 s = 0;
            if (((((u64)p) | ((u64)q)) & 7) == 0) {
                // Four stripes' loads in flight before their rounds: the loads, not the
                // arithmetic, are what a chunk waits on.
                for (; s + 128 <= len; s += 128) {
                    u64 o = s + 8 * lane;
                    u64 w0 = ldg64<LOCAL>(p + o), w1 = ldg64<LOCAL>(p + o + 32);
                    u64 w2 = ldg64<LOCAL>(p + o + 64), w3 = ldg64<LOCAL>(p + o + 96);
                    if (q) { *(u64*)(q + o) = w0; *(u64*)(q + o + 32) = w1; *(u64*)(q + o + 64) = w2; *(u64*)(q + o + 96) = w3; }
                    v = xround(xround(xround(xround(v, w0), w1), w2), w3);
                }
            }
            for (; s + 32 <= len; s += 32) {
                u64 o = s + 8 * lane;
                u64 w = load64(p + o);
                if (q) for (int b = 0; b < 8; ++b) q[o + b] = (u8)(w >> (8 * b));
                v = xround(v, w);
            }
            // The last len % 32 bytes: lane 0 copies them; the hash below reads them back.
            if (q && lane == 0) for (u64 b = len & ~31ULL; b < len; ++b) q[b] = p[b];
            if (!q) q = (u8*)p;
        }
        u64 h = group_finish(v, group_mask, q, len);
        if (active && lane == 0) out[slot] = h;
    }
}

// Sources in this GPU's memory, and sources on a peer GPU (read over NVLink).
extern "C" __global__ void copy_digest(const FusedRun* runs, const u64* chunk_start, u32 n, u64* out) {
    copy_digest_body<true>(runs, chunk_start, n, out);
}
extern "C" __global__ void copy_digest_peer(const FusedRun* runs, const u64* chunk_start, u32 n, u64* out) {
    copy_digest_body<false>(runs, chunk_start, n, out);
}

// The staged copy+digest (Hopper and later): the direct kernels above keep ~25,000 chunks
// open at once, each read 256 bytes at a time, and DRAM serves that scattered pattern at ~70%
// of its streaming rate. Here a block owns a slab of blockDim.x / 4 chunks side by side (a four-lane
// group per chunk, as above) and the bulk-copy engine (TMA) moves each chunk's next
// STAGED_PIECE_BYTES into shared memory in one request, then from shared memory to the
// destination in another; the lanes hash the piece from shared memory. One stage is hashed
// while the next one loads. Chunks whose source or destination is not 16-byte aligned (the
// bulk copy's rule) are read and written by the lanes directly. Piece size, stage count and
// block shape were swept on H200 (bench/results/staged-kernel-h200-2026-11-29.md).
#define STAGED_PIECE_BYTES 2048
#define STAGED_STAGES 2
// Bytes between two chunks' pieces in a stage: 32 more than a piece, so the four lanes of
// eight chunks (one warp) read 32 distinct banks two at a time.
#define STAGED_STRIDE (STAGED_PIECE_BYTES + 32)
// Shared memory before the stages: one mbarrier per stage, padded to 128 bytes.
#define STAGED_HEADER 128

__device__ __forceinline__ u32 shared_addr(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Whether the bulk-copy engine may move the chunk (16-byte aligned addresses).
__device__ __forceinline__ bool bulk_copyable(Chunk c) { return ((((u64)c.src) | ((u64)c.dst)) & 15) == 0; }

extern "C" __global__ void copy_digest_staged(const FusedRun* runs, const u64* chunk_start, u32 n, u64* out) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ __align__(128) u8 smem[];
    const u32 B = STAGED_PIECE_BYTES, S = STAGED_STAGES, PIECES = 4096 / STAGED_PIECE_BYTES;
    const u32 C = blockDim.x / 4;  // chunks of a slab
    u64* bars = (u64*)smem;
    u8* stages = smem + STAGED_HEADER;
    // Where the chunk of each stage's pieces is, written by the group's leader when it asks
    // for the piece, read by the group's four lanes once it landed: one search per chunk.
    Chunk* located = (Chunk*)(stages + S * C * STAGED_STRIDE);
    u64 total = chunk_start[n];
    u64 slabs = (total + C - 1) / C;
    u32 group = threadIdx.x / 4, lane = threadIdx.x & 3;
    bool leader = lane == 0;
    u32 group_mask = 0xFu << (threadIdx.x & 28);
    // Step t of this block: piece t % PIECES of the chunks of slab blockIdx.x + t / PIECES * gridDim.x.
    u64 steps = blockIdx.x < slabs ? (slabs - blockIdx.x + gridDim.x - 1) / gridDim.x * PIECES : 0;
    if (threadIdx.x == 0) {
        // Every group's leader arrives once per use of a stage, loading or not.
        for (u32 s = 0; s < S; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(shared_addr(&bars[s])), "r"(C) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    Chunk next = {0, 0, 0, 0}, cur = {0, 0, 0, 0};
    u64 next_g = ~0ULL, v = 0;
    u32 next_run = 0;
    for (u64 t = 0; t < steps + S; ++t) {
        // Step t - S is hashed first: its stage then takes step t.
        if (t >= S) {
            u64 h = t - S;
            u32 st = h % S, piece = h % PIECES;
            u64 g = (blockIdx.x + h / PIECES * gridDim.x) * C + group;
            bool active = g < total;
            u32 done;
            do {
                asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
                             : "=r"(done) : "r"(shared_addr(&bars[st])), "r"((u32)(h / S) & 1) : "memory");
            } while (!done);
            if (piece == 0) {
                if (active) cur = located[st * C + group];
                v = stripe_seed(lane);
            }
            const u8* piece_at = stages + (st * C + group) * STAGED_STRIDE;
            u64 off = (u64)piece * B;
            if (active && off < cur.len) {
                u64 len = cur.len - off < B ? cur.len - off : B;
                if (bulk_copyable(cur)) {
                    u64 bulk = len & ~15ULL;
                    if (leader && cur.dst && bulk) {
                        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;"
                                     :: "l"(cur.dst + off), "r"(shared_addr(piece_at)), "r"((u32)bulk) : "memory");
                        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                    }
#pragma unroll 8
                    for (u64 s = 0; s < (len & ~31ULL); s += 32) v = xround(v, *(const u64*)(piece_at + s + 8 * lane));
                    // The last len % 16 bytes were not in the bulk copies.
                    if (leader && cur.dst) for (u64 b = bulk; b < len; ++b) cur.dst[off + b] = cur.src[off + b];
                } else {
                    for (u64 s = 0; s + 32 <= len; s += 32) {
                        u64 o = off + s + 8 * lane;
                        u64 w = load64(cur.src + o);
                        if (cur.dst) for (int b = 0; b < 8; ++b) cur.dst[o + b] = (u8)(w >> (8 * b));
                        v = xround(v, w);
                    }
                    if (leader && cur.dst) for (u64 b = len & ~31ULL; b < len; ++b) cur.dst[off + b] = cur.src[off + b];
                }
            }
            if (piece == PIECES - 1) {
                // The tail (len % 32 bytes) is hashed from the source, which no kernel writes.
                u64 d = group_finish(v, group_mask, active ? cur.src : 0, cur.len);
                if (active && leader) out[cur.slot] = d;
            }
            // The stage is free once the store has read it and every lane has hashed it.
            if (leader) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            __syncthreads();
        }
        if (t < steps && leader) {
            u32 st = t % S;
            u64 off = (u64)(t % PIECES) * B;
            u64 g = (blockIdx.x + t / PIECES * gridDim.x) * C + group;
            u32 bytes = 0;
            if (g < total) {
                if (g != next_g) { next = chunk_at(runs, chunk_start, n, g, next_run); next_g = g; }
                located[st * C + group] = next;
                if (bulk_copyable(next) && off < next.len) bytes = (u32)((next.len - off < B ? next.len - off : B) & ~15ULL);
            }
            u32 bar = shared_addr(&bars[st]);
            // The lanes' reads of this stage (generic proxy) before the bulk copy's writes.
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            if (bytes) {
                asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             :: "r"(shared_addr(stages + (st * C + group) * STAGED_STRIDE)), "l"(next.src + off), "r"(bytes), "r"(bar) : "memory");
            } else {
                asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
            }
        }
    }
    // The destination's bulk stores are complete before the kernel is.
    if (leader) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#else
    __trap();  // launched only on compute capability 9.0 and later
#endif
}

// Reads `n16` 16-byte words and folds them into one value: the HBM read-bandwidth ceiling.
// Each thread keeps four loads in flight: with one, the xor that uses it holds back the next.
#define READ_ALL_LOADS 4
__device__ __forceinline__ u64 xor_halves(uint4 v) { return ((u64)v.x << 32 | v.y) ^ ((u64)v.z << 32 | v.w); }
extern "C" __global__ void read_all(const uint4* p, u64 n16, u64* out) {
    u64 acc = 0;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + (READ_ALL_LOADS - 1) * stride < n16; i += READ_ALL_LOADS * stride) {
        uint4 v[READ_ALL_LOADS];
#pragma unroll
        for (int k = 0; k < READ_ALL_LOADS; ++k) v[k] = p[i + k * stride];
#pragma unroll
        for (int k = 0; k < READ_ALL_LOADS; ++k) acc ^= xor_halves(v[k]);
    }
    for (; i < n16; i += stride) acc ^= xor_halves(p[i]);
    if (acc == 0x5eed) atomicXor(out, acc);  // never true in practice; keeps the loads alive
}

// Each listed tensor's digest: xxh64 of its chunk digests, one one-warp block per tensor
// (`which` lists the tensors: indices into chunk_start and out). The fold is one dependent
// chain per stripe accumulator (lanes 0-3), so it should not wait on memory: the chunk
// digests stream into a ring of shared-memory stages with cp.async, FOLD_STAGES - 1 batches
// (12 KiB) in flight while the lanes fold the batch that has landed. (The fold before this
// waited on every 2 KiB load, which under a loaded memory system could leave a large tensor's
// fold running after the copies it hides behind; on H200 the change measured within run-to-run
// noise: Qwen3-8B digest 6.1-6.2 ms against 6.5-6.6, Qwen3-30B-A3B 20.1-20.4 against 19.4-20.9.)
#define FOLD_STAGES 4
#define FOLD_BATCH 512
__device__ __forceinline__ void fold_issue(u64* stage, const u64* words, u32 lane) {
#if __CUDA_ARCH__ >= 800
    for (u32 i = lane; i < FOLD_BATCH; i += 32) {
        asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"((u32)__cvta_generic_to_shared(stage + i)), "l"(words + i) : "memory");
    }
#else
    for (u32 i = lane; i < FOLD_BATCH; i += 32) stage[i] = words[i];
#endif
}
__device__ __forceinline__ void fold_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
// Waits until at most FOLD_STAGES - 1 committed batches are still in flight.
__device__ __forceinline__ void fold_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(FOLD_STAGES - 1) : "memory");
#endif
    __syncwarp();
}

extern "C" __global__ void combine_digests(const u64* chunks, const u64* chunk_start, const unsigned int* which, u32 n, u64* out) {
    __shared__ __align__(16) u64 stage[FOLD_STAGES][FOLD_BATCH];
    u32 lane = threadIdx.x & 31;
    if (blockIdx.x >= n) return;
    u32 t = which[blockIdx.x];
    const u64* words = chunks + chunk_start[t];
    u64 count = chunk_start[t + 1] - chunk_start[t];
    u64 len = count * 8;
    u64 batches = count / FOLD_BATCH;
    u64 v = stripe_seed(lane);
    for (u64 b = 0; b < FOLD_STAGES - 1; ++b) {
        if (b < batches) fold_issue(stage[b], words + b * FOLD_BATCH, lane);
        fold_commit();  // an empty group keeps the count of groups in flight exact
    }
    for (u64 b = 0; b < batches; ++b) {
        // The stage batch b - 1 used is free once every lane has folded it.
        __syncwarp();
        u64 next = b + FOLD_STAGES - 1;
        if (next < batches) fold_issue(stage[next % FOLD_STAGES], words + next * FOLD_BATCH, lane);
        fold_commit();
        fold_wait();  // batch b has landed
        if (lane < 4) {
            const u64* landed = stage[b % FOLD_STAGES];
#pragma unroll 16
            for (u32 i = 0; i < FOLD_BATCH; i += 4) v = xround(v, landed[i + lane]);
        }
    }
    // Whole stripes left (fewer than a batch): one word per accumulator lane each.
    u64 s = batches * FOLD_BATCH;
    if (lane < 4) {
#pragma unroll 8
        for (; s + 4 <= count; s += 4) v = xround(v, words[s + lane]);
    }
    s = count & ~3ULL;
    u64 v1 = __shfl_sync(0xffffffffu, v, 0, 32), v2 = __shfl_sync(0xffffffffu, v, 1, 32);
    u64 v3 = __shfl_sync(0xffffffffu, v, 2, 32), v4 = __shfl_sync(0xffffffffu, v, 3, 32);
    if (lane == 0) out[t] = xxh64_finish((const u8*)words, len, s * 8, v1, v2, v3, v4);
}
"#;

pub(crate) struct Kernels {
    _module: Arc<CudaModule>,
    copy: CudaFunction,
    cast: CudaFunction,
    copy_digest: CudaFunction,
    copy_digest_peer: CudaFunction,
    /// On compute capability 9.0 and later (it needs the bulk-copy engine).
    copy_digest_staged: Option<CudaFunction>,
    combine: CudaFunction,
    read_all: CudaFunction,
    /// Streaming multiprocessors of the GPU.
    sms: u32,
}

impl Kernels {
    pub(crate) fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, CudaError> {
        let (major, minor) = ctx.compute_capability().call("cuDeviceGetAttribute")?;
        let arch = format!("--gpu-architecture=sm_{major}{minor}");
        let options = CompileOptions { options: vec![arch], ..Default::default() };
        let ptx = compile_ptx_with_opts(SOURCE, options).map_err(|e| CudaError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx).call("cuModuleLoadData")?;
        let load = |name: &'static str| module.load_function(name).call("cuModuleGetFunction");
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .call("cuDeviceGetAttribute")?;
        let copy_digest_staged = if major >= 9 {
            let f = load("copy_digest_staged")?;
            // More than the default 48 KiB of dynamic shared memory must be asked for.
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                STAGED_SHARED_BYTES as i32,
            )
            .call("cuFuncSetAttribute")?;
            Some(f)
        } else {
            None
        };
        Ok(Kernels {
            copy: load("batched_copy")?,
            cast: load("batched_cast_f32_bf16")?,
            copy_digest: load("copy_digest")?,
            copy_digest_peer: load("copy_digest_peer")?,
            copy_digest_staged,
            combine: load("combine_digests")?,
            read_all: load("read_all")?,
            sms: sms.max(1) as u32,
            _module: module,
        })
    }
}

impl Kernels {
    /// Blocks of a grid-striding copy or read kernel: 32 per SM, more than fit at once, so
    /// the GPU stays full while blocks finish unevenly.
    fn grid_stride_blocks(&self) -> u32 {
        self.sms * 32
    }
}

/// A direct fused kernel's launch: `grid` blocks of THREADS, no dynamic shared memory.
fn direct(grid: u64) -> LaunchConfig {
    LaunchConfig { grid_dim: (grid as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// One 2-D strided copy between device addresses, in bytes: `rows` rows of `row_bytes` (the
/// kernels' `Rows2D` layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyDesc {
    pub src: u64,
    pub dst: u64,
    pub rows: u64,
    pub row_bytes: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
}

/// One 2-D strided f32 -> bf16 cast: `rows` rows of `row_elems` elements; strides in bytes
/// (the kernels' `Rows2D` layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CastDesc {
    pub src: u64,
    pub dst: u64,
    pub rows: u64,
    pub row_elems: u64,
    pub src_stride: u64,
    pub dst_stride: u64,
}

/// A run of a destination tensor copied and digested in one pass: `bytes` from `src` to
/// `dst`, whose chunk digests go to slots `out`, `out + 1`, ... of the wave's chunk array.
/// `dst` starts on a chunk boundary of its tensor, and the run ends on one or at its end.
/// With `dst` 0 the run is only digested: `src` is then the memory to digest.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedRun {
    pub src: u64,
    pub dst: u64,
    pub bytes: u64,
    pub out: u64,
}

/// Chunk digests one wave of an update holds at most (16 MiB of them, for 8 GiB of tensors);
/// two waves' worth (one being copied, one being folded) bound the GPU memory an update needs
/// beyond the tensors.
pub const WAVE_CHUNKS: u64 = 2 << 20;

/// Tensors (indices into `tensor_bytes`) grouped into waves of at most [`WAVE_CHUNKS`] chunks
/// (a larger tensor is a wave of its own), largest first: how digests of memory in place are
/// run (see [`WaveOrder`]).
pub fn waves(tensor_bytes: &[u64]) -> Vec<Vec<usize>> {
    waves_of(tensor_bytes, WAVE_CHUNKS, WaveOrder::LargestFirst)
}

/// In which order an update's tensors go into waves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaveOrder {
    /// Largest first, for reads at HBM speed. A tensor's digest is one dependent fold over its
    /// chunk digests (~6 ns a chunk) that starts once the tensor is read, and reading a chunk
    /// from this GPU's memory takes ~1 ns: in the models' own order Qwen3-8B's lm_head (1.2 GB)
    /// and Qwen3-30B-A3B's last stacked experts came in the last wave, and their folds ran on
    /// after every byte was read. Largest first, the longest folds have the rest of the update
    /// to run beside, and the last wave holds the smallest tensors (on H200, digests alone:
    /// Qwen3-8B 4.90 -> 4.07 ms, Qwen3-30B-A3B 15.78 -> 14.79 ms; Qwen3-30B-A3B's update
    /// 32.8 -> 31.7 ms). Equal sizes keep their order.
    LargestFirst,
    /// As listed, for reads over NVLink: a chunk takes ~11 ns to arrive there, longer than
    /// its fold, so no fold outlasts the reads whatever the order. Largest first made
    /// Qwen3-30B-A3B's pull from a peer GPU vary from update to update (164.3-169.5 ms, against
    /// 164.7-164.8 ms as listed, on 2 x H200; the cause was not found).
    AsListed,
}

impl SourceGpu {
    /// The order of the waves of an update reading these sources.
    pub fn wave_order(self) -> WaveOrder {
        match self {
            SourceGpu::This => WaveOrder::LargestFirst,
            SourceGpu::Peer => WaveOrder::AsListed,
        }
    }
}

/// Tensors grouped into waves of at most `max_chunks` chunks (a larger tensor is a wave of its
/// own), in `order` (tests use small bounds to get many waves from small models).
pub fn waves_of(tensor_bytes: &[u64], max_chunks: u64, order: WaveOrder) -> Vec<Vec<usize>> {
    let mut tensors: Vec<usize> = (0..tensor_bytes.len()).collect();
    if order == WaveOrder::LargestFirst {
        tensors.sort_by_key(|&t| std::cmp::Reverse(tensor_bytes[t]));
    }
    let mut waves: Vec<Vec<usize>> = Vec::new();
    let mut chunks = 0u64;
    for t in tensors {
        let c = tensor_bytes[t].div_ceil(CHUNK_BYTES);
        match waves.last_mut() {
            Some(wave) if chunks + c <= max_chunks => wave.push(t),
            _ => {
                waves.push(vec![t]);
                chunks = 0;
            }
        }
        chunks += c;
    }
    waves
}

/// The work of one wave: destination tensors (`tensors`: each one's index in the update, which
/// orders the digests [`Gpu::run_update`] returns; `tensor_bytes`: its size), their fused runs,
/// the copies and casts that cannot be fused, and the chunks those write, to digest after them:
/// (address, bytes, first out slot). Out slots count from the wave's first chunk, the wave's
/// tensors' chunks side by side in the order listed.
#[derive(Debug, Clone, Default)]
pub struct Wave {
    pub tensors: Vec<usize>,
    pub fused: Vec<FusedRun>,
    pub copies: Vec<CopyDesc>,
    pub casts: Vec<CastDesc>,
    pub after: Vec<(u64, u64, u64)>,
    pub tensor_bytes: Vec<u64>,
}

/// 2-D copies uploaded once, run with one launch each time.
pub struct CopyBatch {
    packed: DeviceBuffer,
    list: TiledList,
}

/// The small device arrays of a prepared batch (descriptors, runs, prefix sums, tensor lists)
/// side by side, to upload with one allocation and one copy: a wave has up to 16 of them, and
/// an allocation, a copy and a free each took longer than the GPU work of a digest of small
/// tensors. The lists below hold byte offsets in it.
#[derive(Default)]
struct Packing(Vec<u8>);

impl Packing {
    /// Appends `items`, 16-byte aligned; returns their byte offset.
    fn push<T: Copy>(&mut self, items: &[T]) -> u64 {
        let at = self.0.len().next_multiple_of(16);
        self.0.resize(at, 0);
        self.0.extend_from_slice(as_bytes(items));
        at as u64
    }

    fn runs(&mut self, runs: &[FusedRun]) -> Result<RunList, CudaError> {
        let (start, chunks) = prefix(runs.iter().map(|r| r.bytes), CHUNK_BYTES);
        Ok(RunList { runs: self.push(runs), start: self.push(&start), count: count(runs.len())?, chunks })
    }

    fn indices(&mut self, items: &[u32]) -> Result<IndexList, CudaError> {
        Ok(IndexList { items: self.push(items), count: count(items.len())? })
    }

    fn copies(&mut self, descs: &[CopyDesc]) -> Result<TiledList, CudaError> {
        self.tiled(descs, descs.iter().map(|d| (d.rows, d.row_bytes)), TILE_BYTES)
    }

    fn casts(&mut self, descs: &[CastDesc]) -> Result<TiledList, CudaError> {
        self.tiled(descs, descs.iter().map(|c| (c.rows, c.row_elems)), CAST_TILE_ELEMS)
    }

    /// 2-D work items of `rows` rows of `len` units each, cut into tiles of `tile` units.
    fn tiled<T: Copy>(
        &mut self,
        descs: &[T],
        rows_and_len: impl Iterator<Item = (u64, u64)>,
        tile: u64,
    ) -> Result<TiledList, CudaError> {
        let (tile_start, tiles) = tiles(rows_and_len, tile);
        Ok(TiledList {
            descs: self.push(descs),
            tile_start: self.push(&tile_start),
            count: count(descs.len())?,
            tiles,
            tile,
        })
    }
}

/// 2-D copies (or casts) and the first tile of each, at offsets of a [`Packing`].
struct TiledList {
    descs: u64,
    tile_start: u64,
    count: u32,
    tiles: u64,
    /// Units (bytes, or elements for casts) of one tile.
    tile: u64,
}

/// Runs, with the prefix sum of their chunks (the kernel's work index), at offsets of a
/// [`Packing`].
struct RunList {
    runs: u64,
    start: u64,
    count: u32,
    chunks: u64,
}

struct PreparedWave {
    /// The tensors whose digests are folded early (see [`EARLY_FOLD_CHUNKS`]), in the order
    /// they are copied.
    early: Vec<EarlyGroup>,
    fused: RunList,
    copies: TiledList,
    casts: TiledList,
    after: RunList,
    /// Offset of the prefix sum of the wave's tensors' chunks.
    tensor_start: u64,
    /// The tensors folded once the wave is copied.
    late_tensors: IndexList,
    first_tensor: u32,
}

/// Early tensors copied by one launch and folded on the side stream as soon as it is done.
struct EarlyGroup {
    runs: RunList,
    tensors: IndexList,
}

struct IndexList {
    items: u64,
    count: u32,
}

/// A tensor of at least this many chunks (128 MiB) whose chunks are all fused has its digest
/// folded early: its runs go first, then its fold (one dependent chain per tensor, ~6 ns a
/// chunk: 1.8 ms for Qwen3-8B's 1.2 GB lm_head) runs on a second stream while the rest of the
/// wave is copied (see [`fold_groups`]).
const EARLY_FOLD_CHUNKS: u64 = 32 << 10;

/// The waves' tensors in turn (each one's index in the update), checked to list every tensor
/// of the update exactly once.
fn update_order(waves: &[Wave]) -> Result<Vec<usize>, CudaError> {
    let order: Vec<usize> = waves.iter().flat_map(|w| w.tensors.iter().copied()).collect();
    let mut listed = vec![false; order.len()];
    for (w, wave) in waves.iter().enumerate() {
        if wave.tensors.len() != wave.tensor_bytes.len() {
            return Err(CudaError::Invalid(format!(
                "wave {w} lists {} tensors and {} tensor sizes",
                wave.tensors.len(),
                wave.tensor_bytes.len()
            )));
        }
        for &t in &wave.tensors {
            match listed.get_mut(t) {
                Some(seen) if !*seen => *seen = true,
                Some(_) => return Err(CudaError::Invalid(format!("tensor {t} is listed twice (wave {w})"))),
                None => {
                    return Err(CudaError::Invalid(format!(
                        "wave {w} lists tensor {t}, past the {} tensors of the update",
                        order.len()
                    )))
                }
            }
        }
    }
    Ok(order)
}

/// When a tensor's digest is folded, within its wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// Copied first, folded beside the rest of the wave.
    First,
    /// Copied next, folded beside the rest of the wave.
    Early,
    /// Folded once the wave is copied.
    Late,
}

/// When each tensor of a wave (its chunks; whether some of them are fallback chunks, digested
/// after the copies) is folded. Tensors of [`EARLY_FOLD_CHUNKS`] or more, all fused, are folded
/// early. The largest of them, down to the first that has twice the chunks of the next, go
/// first, so that their folds, the longest, start after their own runs rather than after all
/// the early tensors' (Qwen3-8B's embeddings and lm_head, 304k chunks each, among gate_up
/// projections of 49k). Early tensors of like sizes stay together: a fold beside each launch
/// slowed Qwen3-30B-A3B's digest 16.4 -> 19.8 ms on H200.
fn fold_groups(tensor_chunks: &[u64], has_fallback: &[bool]) -> Vec<Fold> {
    let mut fold: Vec<Fold> = tensor_chunks
        .iter()
        .zip(has_fallback)
        .map(|(&chunks, &fallback)| if chunks >= EARLY_FOLD_CHUNKS && !fallback { Fold::Early } else { Fold::Late })
        .collect();
    let mut early: Vec<usize> = (0..fold.len()).filter(|&t| fold[t] == Fold::Early).collect();
    // Largest first; equals in their order.
    early.sort_by_key(|&t| std::cmp::Reverse(tensor_chunks[t]));
    if let Some(last) = early.windows(2).position(|p| tensor_chunks[p[0]] >= 2 * tensor_chunks[p[1]]) {
        for &t in &early[..=last] {
            fold[t] = Fold::First;
        }
    }
    fold
}

/// `items` split by when their tensors are folded: first, early, late (each in the given order).
fn by_fold<T>(items: impl Iterator<Item = T>, fold_of: impl Fn(&T) -> Fold) -> [Vec<T>; 3] {
    let mut split: [Vec<T>; 3] = Default::default();
    for item in items {
        let at = match fold_of(&item) {
            Fold::First => 0,
            Fold::Early => 1,
            Fold::Late => 2,
        };
        split[at].push(item);
    }
    split
}

/// Where an update's sources live, which decides how the fused kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceGpu {
    /// This GPU's memory: read through shared memory by the bulk-copy engine (compute
    /// capability 9.0 and later), else by loads asking L2 for whole 256-byte blocks.
    This,
    /// Another GPU's memory, read over NVLink: plain loads (block fetches were slower there).
    Peer,
}

/// The kernel that copies and digests an update's fused runs. [`Gpu::prepare_update`] picks
/// one from where the sources are; benchmarks may run another ([`UpdateBatch::set_fused_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedKernel {
    /// Sources in this GPU's memory, on compute capability 9.0 and later: pieces of chunks
    /// through shared memory by the bulk-copy engine.
    Staged,
    /// Sources in this GPU's memory before that: loads ask L2 for 256-byte blocks.
    BlockLoads,
    /// Sources on a peer GPU, read over NVLink: plain loads (block fetches were slower there).
    PlainLoads,
}

impl FusedKernel {
    pub fn name(self) -> &'static str {
        match self {
            FusedKernel::Staged => "staged",
            FusedKernel::BlockLoads => "block-loads",
            FusedKernel::PlainLoads => "plain-loads",
        }
    }
}

/// A whole update prepared once (see [`Gpu::prepare_update`]); also what a batch of digests
/// of memory in place is (see [`Gpu::prepare_digests`]).
pub struct UpdateBatch {
    /// The waves' lists, side by side (see [`Packing`]).
    packed: DeviceBuffer,
    waves: Vec<PreparedWave>,
    /// How the fused runs are read, from where their sources are (fallback chunks are always
    /// read on this GPU, after the copies wrote them).
    kernel: FusedKernel,
    /// Chunk digests: wave k uses buffer k % 2, so one wave's digests are folded while the
    /// next wave is copied.
    chunks: [DeviceBuffer; 2],
    out: DeviceBuffer,
    /// The update's index of the tensor of each result slot (the waves' tensors in turn).
    order: Vec<usize>,
    device_bytes: u64,
}

impl UpdateBatch {
    /// Device memory the batch holds (descriptors, chunk digests, results).
    pub fn device_bytes(&self) -> u64 {
        self.device_bytes
    }

    /// The kernel that runs the batch's fused runs.
    pub fn fused_kernel(&self) -> FusedKernel {
        self.kernel
    }

    /// Runs the fused runs with `kernel` instead (to compare kernels on the same batch); one
    /// this GPU cannot run is an error here, not at launch.
    pub fn set_fused_kernel(&mut self, gpu: &Gpu, kernel: FusedKernel) -> Result<(), CudaError> {
        if !gpu.fused_kernels().contains(&kernel) {
            return Err(CudaError::Invalid(format!("this GPU cannot run the {} kernel", kernel.name())));
        }
        self.kernel = kernel;
        Ok(())
    }

    /// Kernel launches one run takes (work lists that are empty launch nothing).
    pub fn launches(&self) -> usize {
        self.waves
            .iter()
            .map(|w| {
                let early = w.early.iter().flat_map(|g| [g.runs.chunks > 0, g.tensors.count > 0]);
                let rest = [
                    w.fused.chunks > 0,
                    w.copies.tiles > 0,
                    w.casts.tiles > 0,
                    w.after.chunks > 0,
                    w.late_tensors.count > 0,
                ];
                early.chain(rest).filter(|&launched| launched).count()
            })
            .sum()
    }
}

/// Digests of device memory in place: an update with nothing to copy.
pub type DigestBatch = UpdateBatch;

fn as_bytes<T: Copy>(items: &[T]) -> &[u8] {
    // SAFETY: T is a plain #[repr(C)] or integer type with no padding read as bytes for a copy.
    unsafe { std::slice::from_raw_parts(items.as_ptr().cast::<u8>(), std::mem::size_of_val(items)) }
}

fn upload(gpu: &Gpu, bytes: &[u8]) -> Result<DeviceBuffer, CudaError> {
    let mut buf = gpu.alloc(bytes.len())?;
    buf.upload(bytes)?;
    Ok(buf)
}

/// Start of each item's share of a total (plus the total at the end), in units of `unit`.
fn prefix(lens: impl Iterator<Item = u64>, unit: u64) -> (Vec<u64>, u64) {
    let mut start = Vec::new();
    let mut total = 0u64;
    for len in lens {
        start.push(total);
        total += len.div_ceil(unit);
    }
    start.push(total);
    (start, total)
}

fn count(n: usize) -> Result<u32, CudaError> {
    u32::try_from(n).map_err(|_| CudaError::Invalid(format!("{n} items are too many for one batch")))
}

/// Tile starts of 2-D work items: `rows` rows each cut into tiles of `tile` units.
fn tiles(items: impl Iterator<Item = (u64, u64)>, tile: u64) -> (Vec<u64>, u64) {
    let mut start = Vec::new();
    let mut total = 0u64;
    for (rows, row_len) in items {
        start.push(total);
        total += rows * row_len.div_ceil(tile);
    }
    start.push(total);
    (start, total)
}

impl Gpu {
    /// Prepares `descs` for [`Gpu::run_copies`]. Every address must stay valid while the batch
    /// is used; weightlift builds batches from buffers it holds or has mapped.
    pub fn prepare_copies(&self, descs: &[CopyDesc]) -> Result<CopyBatch, CudaError> {
        let mut packing = Packing::default();
        let list = packing.copies(descs)?;
        Ok(CopyBatch { packed: upload(self, &packing.0)?, list })
    }

    /// Queues every copy of the batch on this GPU's stream: one launch.
    pub fn run_copies(&self, batch: &CopyBatch) -> Result<(), CudaError> {
        let base = batch.packed.device_ptr();
        self.launch_tiled(&self.kernels().copy, base, &batch.list, "cuLaunchKernel(batched_copy)")
    }

    /// One launch of a tiled kernel (batched_copy or batched_cast_f32_bf16) over `list`,
    /// packed at `base`.
    fn launch_tiled(
        &self,
        kernel: &CudaFunction,
        base: u64,
        list: &TiledList,
        call: &'static str,
    ) -> Result<(), CudaError> {
        if list.tiles == 0 {
            return Ok(());
        }
        let grid = list.tiles.min(u64::from(self.kernels().grid_stride_blocks())) as u32;
        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (descs, starts) = (base + list.descs, base + list.tile_start);
        let mut launch = self.stream().launch_builder(kernel);
        launch.arg(&descs).arg(&starts).arg(&list.count).arg(&list.tile);
        // SAFETY: both tiled kernels take (descriptors, tile starts, count, tile size); every
        // descriptor addresses live device memory (the batch's contract), and the arrays at
        // `base` (the batch's packed arrays, alive while it is) hold `count` (+1) entries.
        unsafe { launch.launch(config) }.call(call)?;
        Ok(())
    }

    /// Reads all of `buffer` `times` times over (16-byte loads, one launch each, back to back),
    /// for measuring the read-bandwidth ceiling: time it and divide by `times`.
    pub fn read_all(&self, buffer: &DeviceBuffer, times: usize) -> Result<(), CudaError> {
        let k = self.kernels();
        let n16 = (buffer.len() / 16) as u64;
        let sink = self.alloc(8)?;
        let grid = k.grid_stride_blocks();
        let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
        let (ptr, out) = (buffer.device_ptr(), sink.device_ptr());
        for _ in 0..times {
            let mut launch = self.stream().launch_builder(&k.read_all);
            launch.arg(&ptr).arg(&n16).arg(&out);
            // SAFETY: arguments match the kernel; it reads `n16` 16-byte words inside `buffer`
            // and writes at most 8 bytes to `sink`, which outlives the launches (synchronized
            // below).
            unsafe { launch.launch(config) }.call("cuLaunchKernel(read_all)")?;
        }
        self.synchronize()
    }

    /// Prepares digests of the device regions `(address, bytes)`, as they are when run.
    pub fn prepare_digests(&self, regions: &[(u64, u64)]) -> Result<DigestBatch, CudaError> {
        let lens: Vec<u64> = regions.iter().map(|r| r.1).collect();
        let waves: Vec<Wave> = waves(&lens)
            .into_iter()
            .map(|tensors| {
                let (start, _) = prefix(tensors.iter().map(|&t| lens[t]), CHUNK_BYTES);
                Wave {
                    fused: tensors
                        .iter()
                        .zip(&start)
                        .filter(|(&t, _)| lens[t] > 0)
                        .map(|(&t, &s)| FusedRun { src: regions[t].0, dst: 0, bytes: lens[t], out: s })
                        .collect(),
                    tensor_bytes: tensors.iter().map(|&t| lens[t]).collect(),
                    tensors,
                    ..Wave::default()
                }
            })
            .collect();
        self.prepare_update(&waves, SourceGpu::This)
    }

    /// Digests every region of the batch (as the project defines digests) and returns them.
    pub fn run_digests(&self, batch: &DigestBatch) -> Result<Vec<u64>, CudaError> {
        self.run_update(batch)
    }

    /// Prepares a whole update, wave by wave (see [`Wave`]); [`Gpu::run_update`] returns the
    /// digest of every tensor of every wave, in order.
    pub fn prepare_update(&self, waves: &[Wave], sources: SourceGpu) -> Result<UpdateBatch, CudaError> {
        let order = update_order(waves)?;
        let mut prepared = Vec::with_capacity(waves.len());
        let mut packing = Packing::default();
        let (mut max_chunks, mut first_tensor) = (0u64, 0u32);
        for wave in waves {
            let (tensor_start, chunks) = prefix(wave.tensor_bytes.iter().copied(), CHUNK_BYTES);
            let tensor_of = |slot: u64| tensor_start.partition_point(|&c| c <= slot) - 1;
            let tensor_chunks: Vec<u64> = tensor_start.windows(2).map(|w| w[1] - w[0]).collect();
            let mut has_fallback = vec![false; tensor_chunks.len()];
            for &(_, _, out) in &wave.after {
                has_fallback[tensor_of(out)] = true;
            }
            let fold = fold_groups(&tensor_chunks, &has_fallback);
            let [first_runs, early_runs, late_runs] = by_fold(wave.fused.iter().copied(), |r| fold[tensor_of(r.out)]);
            let [first, early, late_tensors] = by_fold(0..fold.len() as u32, |&t| fold[t as usize]);
            let mut early_groups = Vec::with_capacity(2);
            for (runs, tensors) in [(first_runs, first), (early_runs, early)] {
                early_groups.push(EarlyGroup { runs: packing.runs(&runs)?, tensors: packing.indices(&tensors)? });
            }
            let after: Vec<FusedRun> =
                wave.after.iter().map(|&(src, bytes, out)| FusedRun { src, dst: 0, bytes, out }).collect();
            let (fused, after) = (packing.runs(&late_runs)?, packing.runs(&after)?);
            let early_chunks: u64 = early_groups.iter().map(|g| g.runs.chunks).sum();
            if early_chunks + fused.chunks + after.chunks != chunks {
                return Err(CudaError::Invalid(format!(
                    "{} fused and {} fallback chunks do not make the {chunks} chunks of the tensors",
                    early_chunks + fused.chunks,
                    after.chunks
                )));
            }
            max_chunks = max_chunks.max(chunks);
            let wave = PreparedWave {
                early: early_groups,
                fused,
                copies: packing.copies(&wave.copies)?,
                casts: packing.casts(&wave.casts)?,
                after,
                tensor_start: packing.push(&tensor_start),
                late_tensors: packing.indices(&late_tensors)?,
                first_tensor,
            };
            first_tensor += wave.early.iter().map(|g| g.tensors.count).sum::<u32>() + wave.late_tensors.count;
            prepared.push(wave);
        }
        let chunk_bytes = (max_chunks as usize).max(1) * 8;
        // One wave needs one buffer; the second is a token allocation then.
        let second = if prepared.len() > 1 { chunk_bytes } else { 8 };
        let packed = upload(self, &packing.0)?;
        let chunks = [self.alloc(chunk_bytes)?, self.alloc(second)?];
        let out = self.alloc((first_tensor as usize).max(1) * 8)?;
        let device_bytes = [&packed, &chunks[0], &chunks[1], &out].iter().map(|b| b.allocated_bytes() as u64).sum();
        let kernel = match sources {
            SourceGpu::This => self.local_fused_kernel(),
            SourceGpu::Peer => FusedKernel::PlainLoads,
        };
        Ok(UpdateBatch { packed, waves: prepared, kernel, chunks, out, order, device_bytes })
    }

    /// Runs an update. Per wave: the early tensors' fused runs (the largest, then the others),
    /// each launch followed by the fold of its tensors on a second stream, then the rest (fused
    /// copy+digest, fallback copies and casts, their chunks' digests); then the other tensors'
    /// folds on that stream too, while the main stream goes on with the next wave (into the
    /// other chunk buffer). Nine launches a wave at most, however many tensors. Returns the
    /// digests.
    pub fn run_update(&self, batch: &UpdateBatch) -> Result<Vec<u64>, CudaError> {
        let k = self.kernels();
        let (main, side) = (self.stream(), self.side_stream());
        let mut folded: Vec<cudarc::driver::CudaEvent> = Vec::with_capacity(batch.waves.len());
        let base = batch.packed.device_ptr();
        for (w, wave) in batch.waves.iter().enumerate() {
            let chunks = &batch.chunks[w % 2];
            if w >= 2 {
                // The fold of wave w - 2 read this buffer: it must be done.
                main.wait(&folded[w - 2]).call("cuStreamWaitEvent")?;
            }
            let out = batch.out.device_ptr() + u64::from(wave.first_tensor) * 8;
            for group in wave.early.iter().filter(|g| g.tensors.count > 0) {
                self.launch_runs(main, base, &group.runs, chunks, batch.kernel)?;
                side.join(main).call("cuStreamWaitEvent")?;
                self.combine(side, chunks, base, wave.tensor_start, &group.tensors, out)?;
            }
            self.launch_runs(main, base, &wave.fused, chunks, batch.kernel)?;
            self.launch_tiled(&k.copy, base, &wave.copies, "cuLaunchKernel(batched_copy)")?;
            self.launch_tiled(&k.cast, base, &wave.casts, "cuLaunchKernel(batched_cast_f32_bf16)")?;
            self.launch_runs(main, base, &wave.after, chunks, self.local_fused_kernel())?;
            side.join(main).call("cuStreamWaitEvent")?;
            self.combine(side, chunks, base, wave.tensor_start, &wave.late_tensors, out)?;
            folded.push(side.record_event(None).call("cuEventRecord")?);
        }
        main.join(side).call("cuStreamWaitEvent")?;
        self.synchronize()?;
        let mut bytes = vec![0u8; batch.order.len() * 8];
        batch.out.download(&mut bytes)?;
        let mut digests = vec![0u64; batch.order.len()];
        for (&t, slot) in batch.order.iter().zip(bytes.chunks_exact(8)) {
            digests[t] = u64::from_le_bytes(slot.try_into().expect("8 bytes"));
        }
        Ok(digests)
    }

    /// The fused kernels this GPU can run.
    pub fn fused_kernels(&self) -> Vec<FusedKernel> {
        let staged = self.kernels().copy_digest_staged.is_some().then_some(FusedKernel::Staged);
        staged.into_iter().chain([FusedKernel::BlockLoads, FusedKernel::PlainLoads]).collect()
    }

    /// The fused kernel for sources in this GPU's memory.
    pub(crate) fn local_fused_kernel(&self) -> FusedKernel {
        if self.kernels().copy_digest_staged.is_some() {
            FusedKernel::Staged
        } else {
            FusedKernel::BlockLoads
        }
    }

    /// One launch of the fused kernel over `list`, packed at `base`.
    fn launch_runs(
        &self,
        stream: &CudaStream,
        base: u64,
        list: &RunList,
        chunks: &DeviceBuffer,
        kernel: FusedKernel,
    ) -> Result<(), CudaError> {
        if list.chunks == 0 {
            return Ok(());
        }
        let k = self.kernels();
        let direct_grid =
            |blocks_per_sm: u32| (list.chunks * 4).div_ceil(u64::from(THREADS)).min(u64::from(k.sms * blocks_per_sm));
        let (function, call, config) = match (kernel, &k.copy_digest_staged) {
            (FusedKernel::Staged, Some(staged)) => {
                let slabs = list.chunks.div_ceil(u64::from(STAGED_THREADS / 4));
                let grid = slabs.min(u64::from(k.sms * STAGED_BLOCKS_PER_SM)) as u32;
                let config = LaunchConfig {
                    grid_dim: (grid, 1, 1),
                    block_dim: (STAGED_THREADS, 1, 1),
                    shared_mem_bytes: STAGED_SHARED_BYTES,
                };
                (staged, "cuLaunchKernel(copy_digest_staged)", config)
            }
            (FusedKernel::Staged, None) => {
                return Err(CudaError::Invalid("the staged kernel needs compute capability 9.0 or later".into()))
            }
            (FusedKernel::BlockLoads, _) => {
                (&k.copy_digest, "cuLaunchKernel(copy_digest)", direct(direct_grid(FUSED_BLOCKS_PER_SM)))
            }
            (FusedKernel::PlainLoads, _) => {
                (&k.copy_digest_peer, "cuLaunchKernel(copy_digest_peer)", direct(direct_grid(PEER_BLOCKS_PER_SM)))
            }
        };
        let (runs, starts, out) = (base + list.runs, base + list.start, chunks.device_ptr());
        let mut launch = stream.launch_builder(function);
        launch.arg(&runs).arg(&starts).arg(&list.count).arg(&out);
        // SAFETY: the three kernels take (runs, chunk starts, count, out) as passed here; the
        // lists lie in the batch's packed arrays at `base` (alive while the batch is), runs
        // address live memory (the batch's contract) and every out slot lies inside `chunks`
        // (counted when the batch was prepared); the staged kernel's shared memory was allowed
        // when it was loaded.
        unsafe { launch.launch(config) }.call(call)?;
        Ok(())
    }

    /// Folds the listed tensors' chunk digests into their digests at `out` (a slot per tensor
    /// of the wave), one warp per tensor; `chunk_start` and `which` are packed at `base`.
    fn combine(
        &self,
        stream: &CudaStream,
        chunks: &DeviceBuffer,
        base: u64,
        chunk_start: u64,
        which: &IndexList,
        out: u64,
    ) -> Result<(), CudaError> {
        if which.count == 0 {
            return Ok(());
        }
        let k = self.kernels();
        // One one-warp block per tensor (the kernel's shared stages are per block).
        let config = LaunchConfig { grid_dim: (which.count, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        let (c, s, w) = (chunks.device_ptr(), base + chunk_start, base + which.items);
        let mut launch = stream.launch_builder(&k.combine);
        launch.arg(&c).arg(&s).arg(&w).arg(&which.count).arg(&out);
        // SAFETY: arguments match the kernel; `which` holds `count` tensor indices of the wave
        // (in the batch's packed arrays, alive while it is), each with a slot at `out` (inside
        // the batch's result buffer).
        unsafe { launch.launch(config) }.call("cuLaunchKernel(combine_digests)")?;
        Ok(())
    }
}

/// Raw chunk digests of device regions, not folded into one digest per region: what a sender
/// hands [`weightlift_core::digest::PieceDigests::from_chunks`] for pieces of tensors that
/// arrive a bucket at a time. Its buffers are kept from call to call (an allocation costs
/// more than digesting a bucket) and grow when a call needs more; its host side is
/// page-locked, so the runs go up and the digests come down queued behind other work.
#[derive(Default)]
pub struct ChunkDigester {
    packed: Option<DeviceBuffer>,
    chunks: Option<DeviceBuffer>,
    /// The page-locking of `host`: declared first, so dropped before it (and dropped before
    /// `host` reallocates).
    pinned: Option<crate::gpu::HostRegistration>,
    /// The runs going up, then (from `down`) the chunk digests coming down.
    host: Vec<u8>,
    down: usize,
}

impl ChunkDigester {
    /// Device memory held now.
    pub fn device_bytes(&self) -> u64 {
        [&self.packed, &self.chunks].iter().filter_map(|b| b.as_ref()).map(|b| b.allocated_bytes() as u64).sum()
    }

    /// The chunk digests the last call brought down.
    fn results(&self, total: usize) -> Vec<u64> {
        let bytes = &self.host[self.down..self.down + total * 8];
        bytes.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
    }
}

/// A buffer of at least `bytes`, the one held if it is large enough.
fn at_least<'a>(
    gpu: &Gpu,
    held: &'a mut Option<DeviceBuffer>,
    bytes: usize,
) -> Result<&'a mut DeviceBuffer, CudaError> {
    if held.as_ref().is_none_or(|b| b.len() < bytes) {
        *held = None; // free the small one first
        *held = Some(gpu.alloc(bytes.max(1))?);
    }
    Ok(held.as_mut().expect("just allocated"))
}

impl Gpu {
    /// Digests each region `(device address, bytes)` of this GPU chunk by chunk from its start,
    /// after the work already queued on this GPU's stream, and returns every region's chunk
    /// digests, concatenated in order (a region of `n` bytes has `n.div_ceil(4096)`). The
    /// regions must be live memory of this GPU's context while the call runs.
    pub fn chunk_digests(&self, digester: &mut ChunkDigester, regions: &[(u64, u64)]) -> Result<Vec<u64>, CudaError> {
        let wait = crate::host_copy::WaitOnDrop(self);
        // SAFETY: the stream is synchronized before `digester` is given back, on every path
        // (`wait` on an early return).
        let total = unsafe { self.queue_chunk_digests(digester, regions) }?;
        self.synchronize()?;
        drop(wait);
        Ok(digester.results(total))
    }

    /// Copies `copies` from host memory into `dst` as [`Gpu::copy_ranges_from_host`] does,
    /// then digests `regions` as [`Gpu::chunk_digests`] does, behind the copies on the same
    /// stream, running `meanwhile` on this thread while all of it runs: the digest of a
    /// bucket costs the copy engines no gap beyond the kernel's own few microseconds.
    pub fn copy_from_host_then_digest<M: OwnedDeviceMemory, R>(
        &self,
        dst: &M,
        copies: &[(usize, &[u8])],
        digester: &mut ChunkDigester,
        regions: &[(u64, u64)],
        meanwhile: impl FnOnce() -> R,
    ) -> Result<(Vec<u64>, R), CudaError> {
        let mut total = 0;
        let value = self.copy_ranges_from_host(dst, copies, || {
            // SAFETY: `copy_ranges_from_host` synchronizes the stream before it returns, on
            // every path, and `digester` stays borrowed until then.
            total = unsafe { self.queue_chunk_digests(digester, regions) }?;
            Ok::<R, CudaError>(meanwhile())
        })??;
        Ok((digester.results(total), value))
    }

    /// Queues, on this GPU's stream: the runs of `regions` up into `digester`'s device buffer,
    /// the digest kernel, and the chunk digests down into `digester`'s host buffer. Returns
    /// how many chunk digests will be there.
    ///
    /// # Safety
    ///
    /// The caller synchronizes this GPU's stream before `digester` is used again or dropped:
    /// the copies read and write its host buffer until then.
    unsafe fn queue_chunk_digests(
        &self,
        digester: &mut ChunkDigester,
        regions: &[(u64, u64)],
    ) -> Result<usize, CudaError> {
        let (start, total) = prefix(regions.iter().map(|r| r.1), CHUNK_BYTES);
        if total == 0 {
            return Ok(0);
        }
        let runs: Vec<FusedRun> = regions
            .iter()
            .zip(&start)
            .filter(|(r, _)| r.1 > 0)
            .map(|(&(src, bytes), &out)| FusedRun { src, dst: 0, bytes, out })
            .collect();
        let mut packing = Packing::default();
        let list = packing.runs(&runs)?;
        let up = packing.0.len();
        let down = up.next_multiple_of(16);
        let needed = down + total as usize * 8;
        if digester.host.len() < needed {
            digester.pinned = None; // unregister before the memory moves
            digester.host = vec![0u8; needed.next_power_of_two()];
            // Only a hint: copies to and from pageable memory are slower, not wrong.
            digester.pinned = self.register_host(&digester.host).ok();
        }
        digester.down = down;
        digester.host[..up].copy_from_slice(&packing.0);
        let packed = at_least(self, &mut digester.packed, up)?.device_ptr();
        let chunks = at_least(self, &mut digester.chunks, total as usize * 8)?;
        let stream = self.stream();
        self.context().bind_to_thread().call("cuCtxSetCurrent")?;
        // SAFETY: `packed` holds at least `up` bytes; the host bytes stay live and untouched
        // until the caller synchronizes the stream (this function's contract).
        unsafe { cudarc::driver::result::memcpy_htod_async(packed, &digester.host[..up], stream.cu_stream()) }
            .call("cuMemcpyHtoDAsync")?;
        self.launch_runs(stream, packed, &list, chunks, self.local_fused_kernel())?;
        let out = &mut digester.host[down..needed];
        // SAFETY: `chunks` holds the `total` digests the kernel writes; `out` is as long and
        // stays live and untouched until the caller synchronizes the stream.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(out, chunks.device_ptr(), stream.cu_stream()) }
            .call("cuMemcpyDtoHAsync")?;
        Ok(total as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_early_tensors_down_to_a_twofold_gap_are_folded_first() {
        use Fold::*;
        let big = EARLY_FOLD_CHUNKS;
        // Qwen3-8B's engine layout: lm_head (304k chunks) among gate_up projections (49k).
        assert_eq!(fold_groups(&[49_152, 10, 303_872, 49_152], &[false; 4]), [Early, Late, First, Early]);
        // Both giants (embeddings and lm_head) first, together.
        assert_eq!(fold_groups(&[303_872, 303_872, 49_152], &[false; 3]), [First, First, Early]);
        // The first twofold gap, wherever it is.
        assert_eq!(fold_groups(&[8 * big, 5 * big, 2 * big], &[false; 3]), [First, First, Early]);
        // Like sizes (Qwen3-30B-A3B's stacked experts and lm_head): together.
        assert_eq!(fold_groups(&[196_608, 151_936, 98_304], &[false; 3]), [Early, Early, Early]);
        assert_eq!(fold_groups(&[2 * big, 2 * big - 1], &[false; 2]), [Early, Early]);
        assert_eq!(fold_groups(&[2 * big, big], &[false; 2]), [First, Early]);
        // One early tensor needs no second launch; fallback chunks or small tensors fold late.
        assert_eq!(fold_groups(&[4 * big, big - 1], &[false; 2]), [Early, Late]);
        assert_eq!(fold_groups(&[4 * big, big], &[false, true]), [Early, Late]);
        assert_eq!(fold_groups(&[4 * big, 4 * big, 4 * big], &[false; 3]), [Early, Early, Early]);
        assert_eq!(fold_groups(&[], &[]), []);
        // Split in order, by each item's fold.
        let folds = [Late, First, Early, Late, Early];
        assert_eq!(by_fold(0..5, |&t| folds[t]), [vec![1], vec![2, 4], vec![0, 3]]);
    }

    #[test]
    fn packed_lists_sit_at_16_byte_aligned_offsets_with_their_bytes() {
        let mut packing = Packing::default();
        assert_eq!(packing.push(&[1u32, 2, 3]), 0);
        assert_eq!(packing.push(&[7u64]), 16);
        let runs = [FusedRun { src: 1, dst: 2, bytes: CHUNK_BYTES + 1, out: 0 }];
        let list = packing.runs(&runs).unwrap();
        assert_eq!((list.runs, list.start, list.count, list.chunks), (32, 64, 1, 2));
        assert_eq!(packing.0.len(), 64 + 16);
        let u64_at = |at: usize| u64::from_le_bytes(packing.0[at..at + 8].try_into().unwrap());
        assert_eq!(&packing.0[0..12], as_bytes(&[1u32, 2, 3]));
        assert_eq!((u64_at(16), u64_at(32 + 16), u64_at(64), u64_at(72)), (7, CHUNK_BYTES + 1, 0, 2));
        let empty = packing.indices(&[]).unwrap();
        assert_eq!((empty.items, empty.count), (80, 0));
    }

    #[test]
    fn waves_take_the_largest_tensors_first_where_reads_are_local() {
        let c = CHUNK_BYTES;
        // Sizes in chunks 1, 5, 3, 5, 2 with waves of at most 6 chunks: 5 | 5 | 3 2 1.
        let bytes = [c, 5 * c, 3 * c - 7, 5 * c, 2 * c];
        assert_eq!(waves_of(&bytes, 6, WaveOrder::LargestFirst), [vec![1], vec![3], vec![2, 4, 0]]);
        assert_eq!(waves_of(&bytes, 6, WaveOrder::AsListed), [vec![0, 1], vec![2], vec![3], vec![4]]);
        // A tensor larger than a wave is a wave of its own; an empty one still has a place.
        assert_eq!(waves_of(&[9 * c, 0, c], 4, WaveOrder::LargestFirst), [vec![0], vec![2, 1]]);
        assert_eq!(waves_of(&[9 * c, 0, c], 4, WaveOrder::AsListed), [vec![0], vec![1, 2]]);
        assert!(waves_of(&[], 4, WaveOrder::AsListed).is_empty());
        assert_eq!(SourceGpu::This.wave_order(), WaveOrder::LargestFirst);
        assert_eq!(SourceGpu::Peer.wave_order(), WaveOrder::AsListed);
    }

    #[test]
    fn an_update_lists_each_tensor_once() {
        let wave = |tensors: Vec<usize>| Wave { tensor_bytes: vec![8; tensors.len()], tensors, ..Wave::default() };
        assert_eq!(update_order(&[wave(vec![2, 0]), wave(vec![1])]).unwrap(), [2, 0, 1]);
        let twice = update_order(&[wave(vec![0, 1]), wave(vec![1])]).unwrap_err().to_string();
        assert!(twice.contains("tensor 1 is listed twice (wave 1)"), "{twice}");
        let past = update_order(&[wave(vec![0, 3])]).unwrap_err().to_string();
        assert!(past.contains("lists tensor 3, past the 2 tensors"), "{past}");
        let sizes = Wave { tensors: vec![0], ..Wave::default() };
        assert!(update_order(&[sizes]).unwrap_err().to_string().contains("1 tensors and 0 tensor sizes"));
    }

    #[test]
    fn prop_waves_list_every_tensor_once_within_the_bound() {
        use proptest::prelude::*;
        proptest!(|(sizes in proptest::collection::vec(0u64..40_000, 0..60), max_chunks in 1u64..12, largest_first: bool)| {
            let order = if largest_first { WaveOrder::LargestFirst } else { WaveOrder::AsListed };
            let waves = waves_of(&sizes, max_chunks, order);
            let listed: Vec<usize> = waves.iter().flatten().copied().collect();
            let mut seen = listed.clone();
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
            for pair in listed.windows(2) {
                let (a, b) = (sizes[pair[0]], sizes[pair[1]]);
                // Largest first, equals in their order; or simply in their order.
                let in_order = if largest_first { a > b || (a == b && pair[0] < pair[1]) } else { pair[0] < pair[1] };
                prop_assert!(in_order, "{:?} of sizes {:?}", listed, sizes);
            }
            for wave in &waves {
                let chunks: u64 = wave.iter().map(|&t| sizes[t].div_ceil(CHUNK_BYTES)).sum();
                prop_assert!(chunks <= max_chunks || wave.len() == 1);
            }
        });
    }

    #[test]
    fn the_kernels_compile_for_hopper_where_nvrtc_is_present() {
        // NVRTC without a GPU (the toolkit's or torch's libnvrtc on LD_LIBRARY_PATH): a kernel
        // that does not compile shows here, not on the GPU machine.
        if !crate::gpu::nvrtc_present() {
            eprintln!("skipped: no NVRTC found (libnvrtc.so could not be loaded)");
            return;
        }
        let options = CompileOptions { options: vec!["--gpu-architecture=sm_90".into()], ..Default::default() };
        let ptx = compile_ptx_with_opts(SOURCE, options).unwrap_or_else(|e| panic!("{e}"));
        for kernel in
            ["copy_digest_staged", "copy_digest", "copy_digest_peer", "combine_digests", "batched_cast_f32_bf16"]
        {
            assert!(ptx.to_src().contains(&format!(".entry {kernel}(")), "{kernel} is not in the PTX");
        }
    }

    #[test]
    fn the_staged_kernels_shape_in_rust_matches_its_source() {
        for (name, value) in [
            ("STAGED_PIECE_BYTES", STAGED_PIECE_BYTES),
            ("STAGED_STAGES", STAGED_STAGES),
            ("STAGED_HEADER", STAGED_HEADER),
        ] {
            assert!(
                SOURCE.contains(&format!("#define {name} {value}\n")),
                "{name} is not {value} in the kernel source"
            );
        }
    }
}
