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
