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
