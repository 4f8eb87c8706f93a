"""FP8 block quantization: weightlift's host quantizer equals, bit for bit, a reference written
in torch the way DeepSeek-V3 / vLLM block FP8 defines it, on random and adversarial inputs."""

import numpy as np
import pytest

from conftest import HAS_TORCH, requires_torch

pytestmark = requires_torch

if HAS_TORCH:
    import torch

    import weightlift as wl


def torch_reference(x: "torch.Tensor", block):
    """Per block of the last two dims: s = clamp(amax, min=1e-10) / 448, q = e4m3(clamp(x / s))."""
    br, bc = block
    *lead, rows, cols = x.shape
    gr, gc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(*lead, gr * br, gc * bc, dtype=torch.float32)
    padded[..., :rows, :cols] = x
    view = padded.view(*lead, gr, br, gc, bc)
    amax = view.abs().amax(dim=(-3, -1)).clamp(min=1e-10)
    scale = amax / 448.0
    expanded = scale.repeat_interleave(br, dim=-2).repeat_interleave(bc, dim=-1)[..., :rows, :cols]
    q = (x / expanded).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.view(torch.uint8).numpy(), scale.numpy()


def adversarial(shape, seed):
    """bf16-valued normals with blocks of zeros, subnormals, an infinity, NaNs, tiny and huge
    magnitudes, and values on e4m3 rounding ties once scaled."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 3).to(torch.bfloat16).float()
    x[..., :128, :128] = 0.0  # a block of zeros: the amax floor
    if shape[-2] > 130:
        x[..., 128:256, :64] = torch.randn(*x[..., 128:256, :64].shape, generator=g) * 1e-40  # subnormals
    x[..., -1, -1] = float("inf")
    x[..., -3, 5] = float("nan")
    x[..., 5, -7] = 3.0e38  # near f32's max
    x[..., 7, 200 % shape[-1]] = 1e-12  # below the amax floor, in a block with larger values
    return x


@pytest.mark.parametrize(
    "shape,block",
    [((300, 260), (128, 128)), ((3, 200, 130), (128, 128)), ((257, 129), (1, 129)), ((64, 64), (16, 32))],
)
def test_block_quantization_equals_the_torch_reference_bit_for_bit(shape, block):
    for seed in range(3):
        x = adversarial(shape, seed)
        q, scales = wl.quantize_fp8(x.numpy(), block)
        rq, rscales = torch_reference(x, block)
        assert scales.shape == rscales.shape
        same_scales = (scales.view(np.uint32) == rscales.view(np.uint32)) | (np.isnan(scales) & np.isnan(rscales))
        assert same_scales.all(), f"{shape} {block}: scales differ at {np.argwhere(~same_scales)[:5]}"
        nan = lambda b: (b & 0x7F) == 0x7F  # noqa: E731
        same = (q == rq) | (nan(q) & nan(rq))
        assert same.all(), f"{shape} {block} seed {seed}: {int((~same).sum())} elements differ, first at {np.argwhere(~same)[:5]}"


def test_random_bit_patterns_quantize_like_torch():
    g = np.random.default_rng(7)
    bits = g.integers(0, 2**32, size=(256, 512), dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy())
    # Blocks of 1 x 1 make every element its own amax: the conversion of every kind of f32.
    for block in [(1, 1), (128, 128)]:
        q, scales = wl.quantize_fp8(x.numpy(), block)
        rq, rscales = torch_reference(x, block)
        same = (q == rq) | (((q & 0x7F) == 0x7F) & ((rq & 0x7F) == 0x7F))
        assert same.all(), f"{block}: {int((~same).sum())} differ"
        same_scales = (scales.view(np.uint32) == rscales.view(np.uint32)) | (np.isnan(scales) & np.isnan(rscales))
        assert same_scales.all()


def test_dequantized_weights_are_close_and_bad_shapes_are_refused():
    x = torch.randn(256, 384)
    q, scales = wl.quantize_fp8(x.numpy())
    w = torch.from_numpy(q.copy()).view(torch.float8_e4m3fn).float()
    s = torch.from_numpy(scales.copy()).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.allclose(w * s, x, rtol=0.07, atol=1e-3)
    with pytest.raises(ValueError, match="two dimensions"):
        wl.quantize_fp8(np.zeros(5, dtype=np.float32))
    with pytest.raises(wl.PlanError, match="blocks of at least"):
        wl.quantize_fp8(np.zeros((4, 4), dtype=np.float32), (0, 4))
