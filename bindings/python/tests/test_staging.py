"""The streaming receiver (`StagingReceiver`) in host memory: a slow loader gets every tensor
exactly (so the ring never overwrote what it held), memory stays at the ring's buffers, and
every failure (a corrupted bucket, a loader that raises, an engine that stops early) raises
or fails the update with what was handed over, leaving the version. Runs in CI (numpy; torch
CPU tensors where torch is installed)."""

import time

import numpy as np
import pytest

import weightlift as wl
from conftest import push_in_thread, requires_cuda

BUCKET_MIB = 4096 / (1 << 20)  # 4 KiB buckets: the model below takes many


def model(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    t = {"embed.weight": rng.standard_normal((64, 32)).astype(np.float32)}  # 8 KiB: dedicated
    for layer in range(6):
        t[f"layers.{layer}.norm.weight"] = rng.standard_normal(32).astype(np.float32)
        t[f"layers.{layer}.proj.weight"] = rng.standard_normal((16, 32)).astype(np.float32)
        t[f"layers.{layer}.ids"] = rng.integers(0, 1000, 7).astype(np.int64)
    t["norm.weight"] = rng.standard_normal(32).astype(np.float32)
    return t


def numpy_of(t):
    return np.array(t.numpy() if hasattr(t, "numpy") else t)


def slow_loader(delay=0.001):
    loaded = {}

    def load_weights(weights):
        for name, tensor in weights:
            time.sleep(delay)
            loaded[name] = numpy_of(tensor).copy()
        return loaded

    return loaded, load_weights


def test_a_slow_loader_gets_every_tensor_exactly_update_after_update():
    staging = wl.StagingReceiver(model(0), bucket_mib=BUCKET_MIB)
    # Two ring buffers of about a bucket, and one for the 8 KiB embedding: not the model.
    model_bytes = sum(a.nbytes for a in model(0).values())
    assert staging.memory_bytes < 2 * (4096 + 2048) + 8192 < model_bytes
    sender = wl.Sender(staging.receiver)
    for version in (1, 2, 3):
        tensors = model(version)
        thread, box = push_in_thread(sender, tensors, version)
        got, weights = staging.next_update(timeout=10)
        assert got == version
        loaded, load_weights = slow_loader()
        load_weights(weights)
        thread.join()
        assert box["report"]["committed"], box
        assert staging.version == version
        assert sorted(loaded) == sorted(tensors)
        for name, want in tensors.items():
            np.testing.assert_array_equal(loaded[name], want, err_msg=name)
        assert weights.stats["tensors"] == len(tensors)
        assert weights.stats["buckets"] >= 6
        # One call into weightlift per bucket, and one that says the update is in.
        assert weights.stats["calls"] == weights.stats["buckets"] + 1


def test_views_are_valid_for_their_bucket_and_copies_for_ever():
    tensors = model(5)
    for copy in (False, True):
        staging = wl.StagingReceiver(tensors, bucket_mib=BUCKET_MIB, copy=copy)
        thread, box = push_in_thread(wl.Sender(staging.receiver), tensors, 1)
        _, weights = staging.next_update(timeout=10)
        kept = list(weights)  # holds every tensor past its bucket
        thread.join()
        assert box["report"]["committed"]
        same = [np.array_equal(numpy_of(t), tensors[n]) for n, t in kept]
        if copy:
            assert all(same)
        else:
            # Held past its bucket, a view shows whatever the ring got next.
            assert not all(same)


def test_a_corrupted_bucket_raises_in_the_loader_naming_the_tensor_and_leaves_the_version():
    tensors = model(1)
    staging = wl.StagingReceiver(tensors, bucket_mib=BUCKET_MIB)
    thread, box = push_in_thread(wl.Sender(staging.receiver, _fault="flip:4"), tensors, 1)
    _, weights = staging.next_update(timeout=10)
    loaded, load_weights = slow_loader(0)
    with pytest.raises(wl.VerificationError, match="digest mismatch") as raised:
        load_weights(weights)
    thread.join()
    assert "error" in box
    assert staging.version == 0
    # What the engine was handed before the bad bucket, named.
    assert raised.value.handed and set(raised.value.handed) == set(loaded)
    assert sorted(staging.dirty) == sorted(loaded)


def test_a_loader_that_raises_fails_the_update_and_the_next_one_commits():
    tensors = model(2)
    staging = wl.StagingReceiver(tensors, bucket_mib=BUCKET_MIB, timeout=5)
    sender = wl.Sender(staging.receiver)

    def load_weights(weights):
        for i, (name, _) in enumerate(weights):
            if i == 5:
                raise KeyError(name)

    thread, box = push_in_thread(sender, tensors, 1)
    started = time.monotonic()
    with pytest.raises(KeyError):
        for version, weights in staging.updates(timeout=10):
            load_weights(weights)
    thread.join()
    # Failed at once (the engine gave up), not after the receiver's timeout.
    assert time.monotonic() - started < 4
    assert "error" in box and "stopped loading" in str(box["error"]), box
    assert staging.version == 0 and staging.dirty

    thread, box = push_in_thread(sender, tensors, 2)
    _, weights = staging.next_update(timeout=10)
    loaded, load_weights = slow_loader(0)
    load_weights(weights)
    thread.join()
    assert box["report"]["committed"] and staging.version == 2 and not staging.dirty


def test_a_sender_over_a_socket_streams_the_same(tmp_path):
    tensors = model(3)
    staging = wl.StagingReceiver(tensors, bucket_mib=BUCKET_MIB, listen=f"unix:{tmp_path}/s.sock")
    thread, box = push_in_thread(wl.Sender(staging.endpoint), tensors, 7)
    _, weights = staging.next_update(timeout=10)
    loaded, load_weights = slow_loader(0)
    load_weights(weights)
    thread.join()
    assert box["report"]["committed"]
    for name, want in tensors.items():
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)


def test_the_report_says_where_a_streamed_updates_time_went():
    tensors = model(4)
    staging = wl.StagingReceiver(tensors, bucket_mib=BUCKET_MIB)
    thread, box = push_in_thread(wl.Sender(staging.receiver), tensors, 1)
    _, weights = staging.next_update(timeout=10)
    slow_loader(0.001)[1](weights)
    thread.join()
    timing = box["report"]["ranks"][0]["stream_timing"]
    # The same report as the sender heard it (floats through JSON: to the last digit or so).
    assert staging.receiver.last_report["stream_timing"]["seconds"] == pytest.approx(timing["seconds"])
    buckets = len(staging._buckets)
    assert timing["buckets"] == timing["engine_buckets"] == weights.stats["buckets"] == buckets
    steps = ["buffer_wait_seconds", "launch_seconds", "gpu_wait_seconds", "write_seconds", "hand_over_seconds",
             "end_wait_seconds", "last_given_back_seconds"]
    assert 0 <= sum(timing[s] for s in steps) <= timing["seconds"]
    # The engine's waits are within what the iterator measured around them.
    assert timing["engine_wait_seconds"] <= weights.stats["wait_s"]


def test_specs_name_what_streams_and_bad_ones_are_named():
    triples = [(n, a.shape, str(a.dtype)) for n, a in model(0).items()]
    staging = wl.StagingReceiver(triples, bucket_mib=BUCKET_MIB)
    assert staging.next_update(timeout=0) is None
    with pytest.raises(wl.PlanError, match="`w`"):
        wl.StagingReceiver([("w", (3,), "complex64")])
    with pytest.raises(wl.PlanError, match="at least one buffer"):
        wl.StagingReceiver(model(0), depth=0)
    assert staging.version == 0


@requires_cuda
def test_on_a_gpu_a_colocated_trainer_streams_into_load_weights_holding_only_the_ring():
    import torch

    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    specs = wl.synthetic_manifest("qwen3-moe-tiny")
    gen = torch.Generator(device="cuda").manual_seed(0)
    trainer = {n: torch.randn(s, generator=gen, device="cuda").to(dtypes[d]) for n, s, d in specs}
    engine = {n: torch.zeros_like(t) for n, t in trainer.items()}
    model_bytes = sum(t.numel() * t.element_size() for t in trainer.values())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    staging = wl.StagingReceiver(specs, device="cuda", bucket_mib=0.0625)
    held = torch.cuda.memory_allocated() - before
    # The ring (two 64 KiB buffers and the largest tensor above that), not the model.
    assert held < staging.memory_bytes + (1 << 20) and 2 * staging.memory_bytes < model_bytes, (held, model_bytes)
    sender = wl.Sender(staging.receiver)
    for version in (1, 2, 3):
        for t in trainer.values():
            t.add_(1)
        torch.cuda.synchronize()
        thread, box = push_in_thread(sender, trainer, version)
        got, weights = staging.next_update(timeout=30)
        assert got == version
        for i, (name, tensor) in enumerate(weights):
            if i % 7 == 0:
                time.sleep(0.001)  # a slow loader: the ring must wait for it
            engine[name].copy_(tensor)
        thread.join()
        assert box["report"]["committed"] and box["report"]["verified"], box
        torch.cuda.synchronize()
        for name, want in trainer.items():
            assert torch.equal(engine[name], want), f"{name} at version {version}"
        assert staging.version == version
        assert torch.cuda.memory_allocated() - before == held
