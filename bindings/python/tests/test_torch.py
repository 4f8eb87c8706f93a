"""torch tensors through DLPack: CPU everywhere torch is installed, CUDA on a GPU machine."""

import numpy as np
import pytest

from conftest import HAS_TORCH, reference_digest, requires_cuda, requires_torch, requires_two_gpus

pytestmark = requires_torch

if HAS_TORCH:
    import torch

    import weightlift as wl


def special_f32(n: int, seed: int) -> "torch.Tensor":
    """Random f32 values with NaNs (several payloads), infinities, subnormals and ties."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 100
    bits = x.view(torch.int32)
    bits[::97] = 0x7FC00001  # a quiet NaN with a payload
    bits[1::97] = 0x7F800001  # a signalling NaN
    bits[2::97] = 0x00000001  # the smallest subnormal
    x[3::97] = float("inf")
    x[4::97] = -float("inf")
    bits[5::97] = 0x3F808000  # exactly halfway between two bf16 values (ties to even)
    return x


def test_bf16_cpu_tensors_move_unchanged_and_are_digested_by_their_bytes():
    src = {"w": torch.randn(300, 257).to(torch.bfloat16), "b": torch.arange(11, dtype=torch.int32)}
    dst = {k: torch.zeros_like(v) for k, v in src.items()}
    receiver = wl.Receiver(dst)
    assert wl.Sender(receiver).push(src, version=1)["verified"]
    for k in src:
        assert torch.equal(dst[k], src[k])
    raw = src["w"].view(torch.int16).numpy().tobytes()
    assert wl.digest(src["w"]) == reference_digest(raw)


def test_named_parameters_of_a_module_are_pushed_as_they_train():
    torch.manual_seed(0)
    trainer = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    engine = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in trainer.named_parameters()}
    receiver = wl.Receiver(engine)
    sender = wl.Sender(receiver)
    optimizer = torch.optim.SGD(trainer.parameters(), lr=0.1)
    for step in (1, 2, 3):
        trainer(torch.randn(16, 64)).square().mean().backward()
        optimizer.step()
        report = sender.push(trainer.named_parameters(), version=step)
        assert report["verified"]
        # Later pushes of the same parameters reuse the import (no per-tensor Python work).
        assert report["tensors_reused"] == (step > 1)
        for name, p in trainer.named_parameters():
            assert torch.equal(engine[name], p.detach().to(torch.bfloat16)), name


def test_f32_to_bf16_on_the_cpu_matches_torch_bit_for_bit_and_keeps_nans():
    # torch's own CPU casts disagree on NaN bits (0x7FC0 on its scalar path, 0xFFFF on its
    # vectorized one), so NaNs are compared as NaNs here; every other value bit for bit.
    src = {"x": special_f32(1 << 16, 1)}
    dst = {"x": torch.zeros(1 << 16, dtype=torch.bfloat16)}
    assert wl.Sender(wl.Receiver(dst)).push(src, version=1)["verified"]
    want = src["x"].to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(dst["x"].isnan(), nan)
    assert torch.equal(dst["x"][~nan].view(torch.int16), want[~nan].view(torch.int16))


@requires_cuda
def test_f32_to_bf16_on_the_gpu_matches_torch_bit_for_bit_including_nans():
    src = {"x": special_f32(1 << 20, 2).cuda()}
    dst = {"x": torch.zeros(1 << 20, dtype=torch.bfloat16, device="cuda")}
    assert wl.Sender(wl.Receiver(dst)).push(src, version=1)["verified"]
    assert torch.equal(dst["x"].view(torch.int16), src["x"].to(torch.bfloat16).view(torch.int16))


def test_non_contiguous_and_unsupported_tensors_are_refused_by_name():
    with pytest.raises(wl.PlanError, match=r"`tensor` is not contiguous"):
        wl.digest(torch.randn(8, 8).t())
    with pytest.raises(wl.PlanError, match=r"`z`.*does not move"):
        wl.WeightsChecker({"z": torch.zeros(4, dtype=torch.complex64)})


def test_checker_on_torch_tensors():
    params = {f"p{i}": torch.randn(100, 100) for i in range(3)}
    checker = wl.WeightsChecker(params)
    checker.snapshot()
    params["p2"][3, 3] += 1
    assert checker.changed() == ["p2"]


@requires_cuda
def test_gpu_digest_equals_the_cpu_digest():
    for n in (0, 1, 4095, 4096, 4097, 1 << 20, (1 << 20) + 13):
        x = torch.randint(0, 256, (n,), dtype=torch.uint8)
        assert wl.digest(x.cuda()) == wl.digest(x) == reference_digest(x.numpy().tobytes()), n


@requires_cuda
def test_same_gpu_updates_in_place_and_a_reallocated_source_is_not_read_stale():
    src = {f"t{i}": torch.randn(1000, 1000, device="cuda:0") for i in range(4)}
    dst = {k: torch.zeros(v.shape, dtype=torch.bfloat16, device="cuda:0") for k, v in src.items()}
    receiver = wl.Receiver(dst)
    sender = wl.Sender(receiver)
    for step in (1, 2):
        for v in src.values():
            v.normal_()
        assert sender.push(src, version=step)["verified"]
        for k in src:
            assert torch.equal(dst[k], src[k].to(torch.bfloat16)), (step, k)
    # New tensors (new memory) under the same names: found and read, not the old addresses.
    src = {k: torch.full_like(v, 3.0) for k, v in src.items()}
    assert sender.push(src, version=3)["verified"]
    assert all((dst[k] == 3.0).all() for k in src)
    checker = wl.WeightsChecker(dst)
    checker.snapshot()
    checker.reset(0)
    assert sorted(checker.changed()) == sorted(dst)
    assert sender.push(src, version=4)["verified"]
    checker.compare()


@requires_cuda
@pytest.mark.parametrize(
    "options, slots",
    [({}, True), ({"host_digests": True}, True), ({"pin_sources": True}, True), ({"device_writes": False}, False)],
)
def test_cpu_tensors_reach_a_gpu_receiver_through_device_slots_or_the_ring(options, slots):
    src = {"w": torch.randn(300, 257), "b": torch.randn(77).to(torch.bfloat16), "i": torch.arange(5000, dtype=torch.int32)}
    dst = {
        "w": torch.zeros(300, 257, dtype=torch.bfloat16, device="cuda:0"),
        "b": torch.zeros(77, dtype=torch.bfloat16, device="cuda:0"),
        "i": torch.zeros(5000, dtype=torch.int32, device="cuda:0"),
    }
    receiver = wl.Receiver(dst)
    sender = wl.Sender(receiver, **options)
    for step in (1, 2):
        for v in src.values():
            v.add_(1)
        report = sender.push(src, version=step)
        assert report["verified"] and report["device_writes"] == [slots], report
        for k in src:
            assert torch.equal(dst[k].cpu(), src[k].to(dst[k].dtype)), (options, step, k)


def test_device_write_options_leave_a_host_receiver_on_the_ring():
    src = {"w": torch.randn(64, 33)}
    dst = {"w": torch.zeros(64, 33)}
    report = wl.Sender(wl.Receiver(dst), pin_sources=True, host_digests=True).push(src, version=1)
    assert report["verified"] and report["device_writes"] == [False], report
    assert torch.equal(dst["w"], src["w"])


EXPANDABLE_TRAINER = """
import ctypes, json, sys, torch, weightlift as wl
shapes, endpoint = json.loads(sys.argv[1]), sys.argv[2]
src = {f"t{i}": torch.empty(s, dtype=torch.bfloat16, device="cuda:0") for i, s in enumerate(shapes)}
legacy = ctypes.c_uint64(0)  # CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE = 10
ctypes.CDLL("libcuda.so.1").cuPointerGetAttribute(ctypes.byref(legacy), 10, ctypes.c_uint64(src["t1"].data_ptr()))
sender = wl.Sender(endpoint)
reports = []
for version in (1, 2):
    for i, t in enumerate(src.values()):
        t.copy_((torch.arange(t.numel(), device="cuda:0") % 251 + version + i).reshape(t.shape))
    reports.append(sender.push(src, version=version))
print(json.dumps({"legacy_ipc": legacy.value, "reports": reports}))
"""


@requires_cuda
def test_a_trainer_on_torch_expandable_segments_pushes_over_cuda_ipc(tmp_path):
    """torch's expandable segments map 20 MiB VMM handles side by side, with tensors spanning
    them: each handle travels as a file descriptor, and the engine maps them side by side."""
    import json
    import os
    import subprocess
    import sys

    shapes = [[4096, 4096], [1024, 4096], [3072, 768], [151, 4096]] * 4  # 32, 8, 4.5, 1.2 MiB
    dst = {f"t{i}": torch.zeros(s, dtype=torch.bfloat16, device="cuda:0") for i, s in enumerate(shapes)}
    endpoint = f"unix:{tmp_path / 'engine.sock'}"
    receiver = wl.Receiver(dst, listen=endpoint)
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    out = subprocess.run([sys.executable, "-c", EXPANDABLE_TRAINER, json.dumps(shapes), endpoint], env=env,
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["legacy_ipc"] == 0, "the trainer's tensors are not in expandable segments"
    first, second = ([r["ranks"][0] for r in result["reports"]])
    assert result["reports"][0]["verified"] and result["reports"][1]["verified"], result
    assert first["ipc_opens"] > 1 and second["ipc_opens"] == 0, (first["ipc_opens"], second["ipc_opens"])
    assert receiver.version == 2
    for i, (name, t) in enumerate(dst.items()):
        want = (torch.arange(t.numel(), device="cuda:0") % 251 + 2 + i).reshape(t.shape).to(torch.bfloat16)
        assert torch.equal(t, want), name


@requires_two_gpus
def test_cross_gpu_updates_over_nvlink():
    src = {f"t{i}": torch.randn(2048, 1024, device="cuda:0") for i in range(3)}
    dst = {k: torch.zeros(v.shape, dtype=torch.bfloat16, device="cuda:1") for k, v in src.items()}
    sender = wl.Sender(wl.Receiver(dst))
    for step in (1, 2):
        for v in src.values():
            v.normal_()
        assert sender.push(src, version=step)["verified"]
        for k in src:
            assert torch.equal(dst[k].cpu(), src[k].to(torch.bfloat16).cpu()), (step, k)


def test_numpy_and_torch_share_the_digest():
    a = np.random.default_rng(0).standard_normal(5000).astype(np.float32)
    assert wl.digest(a) == wl.digest(torch.from_numpy(a))
