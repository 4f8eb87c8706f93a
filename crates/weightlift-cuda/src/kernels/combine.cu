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
