"""Shared helpers: a pure-Python reference of the digest, gates for optional torch/CUDA, and a
push from a thread of its own."""

import importlib.util
import struct

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_TRANSFORMERS = HAS_TORCH and importlib.util.find_spec("transformers") is not None

requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed here (CI runs without it)")


def cuda_devices() -> int:
    if not HAS_TORCH:
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


requires_cuda = pytest.mark.skipif(cuda_devices() < 1, reason="needs a CUDA GPU (scripts/gpu-tests.sh runs these on a GPU machine)")
requires_two_gpus = pytest.mark.skipif(cuda_devices() < 2, reason="needs two CUDA GPUs (cross-GPU updates)")

_P1, _P2, _P3, _P4, _P5 = (
    11400714785074694791,
    14029467366897019727,
    1609587929392839161,
    9650029242287828579,
    2870177450012600261,
)
_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def _merge(h: int, v: int) -> int:
    return ((h ^ _round(0, v)) * _P1 + _P4) & _M


def xxh64(data: bytes) -> int:
    """xxh64 with seed 0, written from the specification (independent of weightlift's)."""
    n, i = len(data), 0
    if n >= 32:
        v = [(_P1 + _P2) & _M, _P2, 0, (-_P1) & _M]
        while i + 32 <= n:
            for k in range(4):
                v[k] = _round(v[k], struct.unpack_from("<Q", data, i + 8 * k)[0])
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for k in range(4):
            h = _merge(h, v[k])
    else:
        h = _P5
    h = (h + n) & _M
    while i + 8 <= n:
        h ^= _round(0, struct.unpack_from("<Q", data, i)[0])
        h = (_rotl(h, 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h ^= (struct.unpack_from("<I", data, i)[0] * _P1) & _M
        h = (_rotl(h, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h ^= (data[i] * _P5) & _M
        h = (_rotl(h, 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    h ^= h >> 32
    return h


def reference_digest(data: bytes) -> int:
    """DESIGN.md's digest: xxh64 over the little-endian xxh64 of each 4 KiB chunk."""
    chunks = [xxh64(data[i : i + 4096]) for i in range(0, len(data), 4096)]
    return xxh64(b"".join(struct.pack("<Q", c) for c in chunks))


def push_in_thread(sender, tensors, version):
    """Pushes from a thread of its own (a push to a streaming receiver waits for the engine to
    load); the thread and a box holding the report or the exception."""
    import threading

    import weightlift as wl

    box = {}

    def run():
        try:
            box["report"] = sender.push(tensors, version=version)
        except wl.WeightliftError as e:
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box
