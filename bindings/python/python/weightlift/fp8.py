"""FP8 (e4m3) block quantization as weightlift writes FP8 engines: per block of the last two
dimensions, ``scale = max(amax, 1e-10) / 448`` (the ``weight_scale_inv`` an engine multiplies
by), each element ``e4m3(clamp(x / scale, -448, 448))`` rounded to nearest even as
``.to(torch.float8_e4m3fn)`` rounds; a NaN poisons its block's scale and elements."""
from typing import Any, Tuple

import numpy as np

from weightlift._weightlift import _quantize_fp8


def quantize_fp8(x: Any, block: Tuple[int, int] = (128, 128)) -> Tuple[np.ndarray, np.ndarray]:
    """Quantizes ``x`` (anything ``numpy.asarray`` takes, as float32; two dimensions or more)
    into e4m3 bytes (uint8, ``x``'s shape; view them as ``torch.float8_e4m3fn``) and float32
    scales of shape ``x.shape[:-2] + (ceil(rows / block[0]), ceil(cols / block[1]))``."""
    a = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if a.ndim < 2:
        raise ValueError(f"quantize_fp8: a weight of two dimensions or more, not shape {a.shape}")
    rows, cols = block
    q, scales = _quantize_fp8(a.tobytes(), list(a.shape), (rows, cols))
    grid = a.shape[:-2] + (-(-a.shape[-2] // rows), -(-a.shape[-1] // cols))
    return np.frombuffer(q, dtype=np.uint8).reshape(a.shape), np.frombuffer(scales, dtype=np.float32).reshape(grid)
