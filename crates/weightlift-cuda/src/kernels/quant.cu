// FP8 (e4m3) block quantization, fused into a copy: per descriptor, a `rows` x `cols` region
// of a source (f32, bf16 or f16 rows `src_stride` bytes apart) is cut into blocks of
// `block_rows` x `block_cols`; each block's amax gives its scale (written at `scale`, scale
// rows `scale_stride` bytes apart) and its elements are written as e4m3 at `dst` (rows
// `dst_stride` bytes apart). The arithmetic is weightlift_core::quant's, step for step:
// amax over the block (NaN if any element is NaN) floored at 1e-10, scale = amax / 448,
// e4m3(clamp(x / scale, -448, 448)), every division correctly rounded (__fdiv_rn).
struct QuantDesc { u64 src, dst, scale, rows, cols, src_stride, dst_stride, scale_stride, block_rows, block_cols, dtype; };

// f32 -> e4m3 (float8_e4m3fn) with the integer steps of weightlift_core::quant::e4m3 (and of
// torch's conversion): round to nearest even, magnitudes from 464 up (and NaN) to NaN.
__device__ __forceinline__ unsigned char e4m3_from_f32(float x) {
    u32 bits = __float_as_uint(x);
    unsigned char sign = (unsigned char)((bits >> 24) & 0x80);
    u32 mag = bits & 0x7fffffffu;
    unsigned char v;
    if (mag >= (1087u << 20)) {
        v = 0x7f;
    } else if (mag < (121u << 23)) {
        u32 shifted = __float_as_uint(__fadd_rn(__uint_as_float(mag), __uint_as_float(141u << 23)));
        v = (unsigned char)(shifted - (141u << 23));
    } else {
        u32 odd = (mag >> 20) & 1u;
        mag += (((u32)(7 - 127)) << 23) + 0x7ffffu;
        mag += odd;
        v = (unsigned char)(mag >> 20);
    }
    return v | sign;
}

// Element `i` of a source row as f32 (dtype 0: f32, 1: bf16, 2: f16; all exact).
__device__ __forceinline__ float quant_load(u64 row, u64 i, u64 dtype) {
    if (dtype == 0) return ((const float*)row)[i];
    unsigned short h = ((const unsigned short*)row)[i];
    if (dtype == 1) return __uint_as_float(((u32)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// One block of threads per quantization block; blocks stride over every descriptor's blocks
// (tile_start: the prefix sum of blocks per descriptor).
extern "C" __global__ void batched_quant_e4m3(const QuantDesc* descs, const u64* tile_start, u32 n) {
    __shared__ float warp_amax[32];
    __shared__ float block_scale;
    for (u64 tile = blockIdx.x; tile < tile_start[n]; tile += gridDim.x) {
        u32 i = find(tile_start, n, tile);
        QuantDesc d = descs[i];
        u64 grid_cols = (d.cols + d.block_cols - 1) / d.block_cols;
        u64 k = tile - tile_start[i];
        u64 br = k / grid_cols, bc = k % grid_cols;
        u64 r0 = br * d.block_rows, c0 = bc * d.block_cols;
        u64 nr = d.rows - r0 < d.block_rows ? d.rows - r0 : d.block_rows;
        u64 nc = d.cols - c0 < d.block_cols ? d.cols - c0 : d.block_cols;
        float amax = 0.0f;
        int nan = 0;
        for (u64 e = threadIdx.x; e < nr * nc; e += blockDim.x) {
            float v = quant_load(d.src + (r0 + e / nc) * d.src_stride, c0 + e % nc, d.dtype);
            if (isnan(v)) nan = 1; else amax = fmaxf(amax, fabsf(v));
        }
        for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, off));
        if ((threadIdx.x & 31) == 0) warp_amax[threadIdx.x / 32] = amax;
        int any_nan = __syncthreads_or(nan);
        if (threadIdx.x == 0) {
            float m = 0.0f;
            for (u32 w = 0; w < (blockDim.x + 31) / 32; w++) m = fmaxf(m, warp_amax[w]);
            float s = any_nan ? __uint_as_float(0x7fc00000u) : __fdiv_rn(fmaxf(m, 1e-10f), 448.0f);
            block_scale = s;
            ((float*)(d.scale + br * d.scale_stride))[bc] = s;
        }
        __syncthreads();
        float s = block_scale;
        for (u64 e = threadIdx.x; e < nr * nc; e += blockDim.x) {
            u64 r = r0 + e / nc, c = c0 + e % nc;
            float q = __fdiv_rn(quant_load(d.src + r * d.src_stride, c, d.dtype), s);
            if (!isnan(q)) q = fminf(fmaxf(q, -448.0f), 448.0f);
            ((unsigned char*)(d.dst + r * d.dst_stride))[c] = e4m3_from_f32(q);
        }
        __syncthreads();
    }
}
