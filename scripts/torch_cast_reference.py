#!/usr/bin/env python3
"""Writes torch's f32 -> bf16 cast of every kind of f32 (random bit patterns, NaNs with payloads
and signs, infinities, subnormals, rounding ties) for the GPU tests to compare weightlift's cast
kernel with, bit for bit: DIR/cast_input.f32 (little-endian f32) and DIR/cast_torch.bf16 (what
`.to(torch.bfloat16)` gives on cuda:0). Run by .gpu/run.sh; needs torch with CUDA."""
import sys

import numpy as np
import torch

out = sys.argv[1]
rng = np.random.default_rng(0)
bits = rng.integers(0, 2**32, size=1 << 20, dtype=np.uint64).astype(np.uint32)
special = np.array(
    [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FFFFFFF,  # NaNs
     0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x00000001, 0x807FFFFF,  # inf, zeros, subnormals
     0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0x7F7F8000],  # ties, max
    dtype=np.uint32,
)
bits = np.concatenate([special, bits])
x = torch.from_numpy(bits.view(np.int32)).view(torch.float32).cuda()
y = x.to(torch.bfloat16).view(torch.int16).cpu().numpy()
bits.tofile(f"{out}/cast_input.f32")
y.tofile(f"{out}/cast_torch.bf16")
cpu = torch.from_numpy(bits.view(np.int32)).view(torch.float32).to(torch.bfloat16).view(torch.int16).numpy()
print(f"torch cast reference: {bits.size} values; CPU and CUDA casts differ on {(cpu != y).sum()} of them (NaNs)")
