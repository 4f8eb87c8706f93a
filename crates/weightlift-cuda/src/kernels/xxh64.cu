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
