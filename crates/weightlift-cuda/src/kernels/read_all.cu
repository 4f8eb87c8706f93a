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
