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
