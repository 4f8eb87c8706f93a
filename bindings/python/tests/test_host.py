"""Updates between numpy arrays in host memory: in-process and across processes, presets and
tensor parallelism, versions, faults. Runs in CI (numpy only)."""

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import weightlift as wl

# A Qwen3-shaped model small enough to read: hidden 8, 2 query heads and 1 KV head of dim 4,
# MLP 16, vocab 32, two layers.
H, HEADS, KV, HD, I, V, LAYERS = 8, 2, 1, 4, 16, 32, 2


def trainer_tensors(seed: int, dtype=np.float32, tied: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.standard_normal((V, H))}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        t[f"{p}.input_layernorm.weight"] = rng.standard_normal(H)
        t[f"{p}.self_attn.q_proj.weight"] = rng.standard_normal((HEADS * HD, H))
        t[f"{p}.self_attn.k_proj.weight"] = rng.standard_normal((KV * HD, H))
        t[f"{p}.self_attn.v_proj.weight"] = rng.standard_normal((KV * HD, H))
        t[f"{p}.self_attn.o_proj.weight"] = rng.standard_normal((H, HEADS * HD))
        t[f"{p}.self_attn.q_norm.weight"] = rng.standard_normal(HD)
        t[f"{p}.self_attn.k_norm.weight"] = rng.standard_normal(HD)
        t[f"{p}.post_attention_layernorm.weight"] = rng.standard_normal(H)
        t[f"{p}.mlp.gate_proj.weight"] = rng.standard_normal((I, H))
        t[f"{p}.mlp.up_proj.weight"] = rng.standard_normal((I, H))
        t[f"{p}.mlp.down_proj.weight"] = rng.standard_normal((H, I))
    t["model.norm.weight"] = rng.standard_normal(H)
    if not tied:
        t["lm_head.weight"] = rng.standard_normal((V, H))
    return {k: v.astype(dtype) for k, v in t.items()}


def engine_view(t: dict, rank: int = 0, size: int = 1) -> dict:
    """What an engine rank holds for trainer tensors `t` (qwen3 preset, vLLM's layout): fused
    qkv (this rank's q heads, its KV head), fused gate_up, row-parallel o/down, vocab-parallel
    embeddings and lm_head, replicated norms. Built independently of weightlift."""
    def rows(a, n):
        per = a.shape[0] // n
        return a[rank * per : (rank + 1) * per] if n > 1 else a

    def cols(a, n):
        per = a.shape[1] // n
        return a[:, rank * per : (rank + 1) * per] if n > 1 else a

    kv_rank = rank // (size // KV) if KV < size else rank
    e = {}
    for name, a in t.items():
        if name.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
            continue
        if name.endswith("q_proj.weight"):
            p = name[: -len("q_proj.weight")]
            kv_rows = slice(kv_rank * HD, (kv_rank + 1) * HD) if KV < size else slice(None)
            k, v = t[p + "k_proj.weight"], t[p + "v_proj.weight"]
            if KV >= size:
                k, v = rows(k, size), rows(v, size)
            else:
                k, v = k[kv_rows], v[kv_rows]
            e[p + "qkv_proj.weight"] = np.concatenate([rows(a, size), k, v])
        elif name.endswith("gate_proj.weight"):
            p = name[: -len("gate_proj.weight")]
            e[p + "gate_up_proj.weight"] = np.concatenate([rows(a, size), rows(t[p + "up_proj.weight"], size)])
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            e[name] = cols(a, size)
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            e[name] = rows(a, size)
        else:
            e[name] = a
    if "lm_head.weight" not in t:
        e["lm_head.weight"] = rows(t["model.embed_tokens.weight"], size)
    return {k: np.ascontiguousarray(v) for k, v in e.items()}


def zeros_like(d: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in d.items()}


def assert_same(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_identity_push_writes_the_receivers_own_arrays_in_place():
    src = {"a": np.arange(5000, dtype=np.float32), "b": np.ones((4, 8), np.float16), "n": np.arange(7, dtype=np.int64)}
    dst = zeros_like(src)
    arrays = dict(dst)
    receiver = wl.Receiver(dst)
    sender = wl.Sender(receiver)
    report = sender.push(src, version=1)
    assert report["verified"] and report["version"] == 1
    assert report["bytes"] == sum(a.nbytes for a in src.values())
    assert set(report["stages"]) == {"import_seconds", "connect_seconds", "transfer_seconds"}
    for name in src:
        assert arrays[name] is dst[name]
        np.testing.assert_array_equal(dst[name], src[name])
    assert (receiver.version, receiver.dirty) == (1, [])
    assert receiver.last_report["verified"]
    assert dict(receiver.digests()) == {n: wl.digest(a) for n, a in src.items()}
    src["a"][:] = -1
    assert sender.push(src, version=2)["verified"]
    np.testing.assert_array_equal(dst["a"], -1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("size", [1, 2])
def test_qwen3_preset_fills_fused_and_sharded_engine_parameters(size, tied):
    trainer = trainer_tensors(seed=size, tied=tied)
    engines = [zeros_like(engine_view(trainer, r, size)) for r in range(size)]
    receivers = [
        wl.Receiver(engines[r], preset="qwen3", tp_rank=r, tp_size=size, head_dim=HD) for r in range(size)
    ]
    sender = wl.Sender(receivers, preset="qwen3", head_dim=HD)
    for version in (1, 2, 3):
        trainer = trainer_tensors(seed=10 * version + size, tied=tied)
        report = sender.push(trainer, version=version)
        assert report["verified"] and len(report["ranks"]) == size
        for r in range(size):
            assert_same(engines[r], engine_view(trainer, r, size))
            assert receivers[r].version == version


def test_f32_trainer_tensors_are_cast_to_an_f16_engine():
    trainer = trainer_tensors(seed=3)
    engine = zeros_like(engine_view(trainer_tensors(seed=3, dtype=np.float16)))
    receiver = wl.Receiver(engine, preset="qwen3")
    assert wl.Sender(receiver, preset="qwen3").push(trainer, version=1)["verified"]
    assert_same(engine, engine_view(trainer_tensors(seed=3, dtype=np.float16)))


def test_planning_errors_name_every_tensor_and_change_nothing():
    trainer = trainer_tensors(seed=4)
    engine = zeros_like(engine_view(trainer))
    receiver = wl.Receiver(engine, preset="qwen3")
    incomplete = {k: v for k, v in trainer.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(wl.PlanError, match=r"`model\.layers\.1\.mlp\.up_proj\.weight`"):
        wl.Sender(receiver, preset="qwen3").push(incomplete, version=1)
    extra = dict(trainer, **{"model.layers.0.mlp.mystery.weight": np.zeros(3, np.float32)})
    with pytest.raises(wl.PlanError, match="mystery") as raised:
        wl.Sender(receiver, preset="qwen3").push(extra, version=1)
    # Every problem, typed, beside the message.
    problems = raised.value.problems
    assert [p["kind"] for p in problems] == ["unmapped"], problems
    assert problems[0]["tensors"] == ["model.layers.0.mlp.mystery.weight"]
    assert "mystery" in problems[0]["message"]
    # The receiver follows the qwen3 layout: a sender offering other rules is refused.
    with pytest.raises(wl.PlanError, match="qwen3"):
        wl.Sender(receiver, preset="identity").push(engine_view(trainer), version=1)
    assert receiver.version == 0 and receiver.dirty == []
    assert all(not a.any() for a in engine.values())


def test_versions_must_increase():
    src = {"w": np.ones(100, np.float32)}
    receiver = wl.Receiver(zeros_like(src), initial_version=5)
    sender = wl.Sender(receiver)
    for stale in (4, 5):
        with pytest.raises(wl.VersionError, match=f"version {stale}"):
            sender.push(src, version=stale)
    assert receiver.version == 5
    assert sender.push(src, version=6)["verified"] and receiver.version == 6


def test_a_corrupted_update_is_not_committed_and_the_next_one_is():
    src = {f"t{i}": np.full(20_000, i, np.float32) for i in range(4)}
    dst = zeros_like(src)
    receiver = wl.Receiver(dst)
    assert wl.Sender(receiver).push(src, version=1)["verified"]
    with pytest.raises(wl.VerificationError, match="version 2 was not committed") as failure:
        wl.Sender(receiver, _fault="flip:0").push({k: v + 1 for k, v in src.items()}, version=2)
    assert failure.value.report["verified"] is False
    assert receiver.version == 1
    assert receiver.dirty, "the tensors the failed update touched are marked dirty"
    assert set(receiver.dirty) <= set(src)
    assert wl.Sender(receiver).push(src, version=3)["verified"]
    assert (receiver.version, receiver.dirty) == (3, [])


def test_bad_arguments_are_errors_not_crashes():
    src = {"w": np.ones(4, np.float32)}
    receiver = wl.Receiver(zeros_like(src))
    with pytest.raises(wl.PlanError, match="timeout"):
        wl.Sender(receiver, timeout=-1)
    with pytest.raises(wl.PlanError, match="timeout"):
        wl.Receiver(zeros_like(src), timeout=float("nan"))
    with pytest.raises(wl.PlanError, match="unknown fault"):
        wl.Sender(receiver, _fault="melt:1")
    with pytest.raises(wl.PlanError, match="preset"):
        wl.Sender(receiver, preset="gpt5")
    with pytest.raises(wl.PlanError, match="pairs"):
        wl.Sender(receiver).push([1, 2, 3], version=1)
    with pytest.raises(wl.PlanError, match="no pushed tensors"):
        wl.Sender(receiver).push({}, version=1)
    with pytest.raises(wl.PlanError, match="share memory"):
        base = np.zeros(10, np.float32)
        wl.Receiver({"a": base[:6], "b": base[4:]})
    assert receiver.wait_for_version(0, timeout=0) == 0


def test_gpu_transports_to_a_receiver_in_host_memory_are_refused_by_name(tmp_path):
    receiver = wl.Receiver({"w": np.zeros(1000, np.float32)}, listen=f"unix:{tmp_path}/engine.sock")
    for transport in ("cuda-ipc", "nccl"):
        with pytest.raises(wl.PlanError, match=f"host memory: {transport} "):
            wl.Sender(receiver.endpoint, transport=transport).push({"w": np.ones(1000, np.float32)}, version=1)
    with pytest.raises(wl.PlanError, match="expected shm, tcp, inproc, cuda-ipc or nccl"):
        wl.Sender(receiver.endpoint, transport="rdma")
    assert receiver.version == 0


def test_the_receiver_keeps_its_arrays_alive_after_python_drops_them():
    receiver = wl.Receiver({"w": np.zeros(50_000, np.float32)})
    gc.collect()
    src = {"w": np.arange(50_000, dtype=np.float32)}
    assert wl.Sender(receiver).push(src, version=1)["verified"]
    assert dict(receiver.digests())["w"] == wl.digest(src["w"])


SENDER = textwrap.dedent(
    """
    import sys, numpy as np, weightlift as wl
    endpoint, transport, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
    src = {f"t{i}": np.full((300, 1000), version * 10 + i, np.float32) for i in range(5)}
    report = wl.Sender(endpoint, transport=transport).push(src, version=version)
    print(report["verified"], report["bytes"])
    """
)


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_sender_in_another_process_updates_a_listening_receiver(tmp_path, transport):
    dst = {f"t{i}": np.zeros((300, 1000), np.float32) for i in range(5)}
    listen = f"unix:{tmp_path}/engine.sock" if transport == "shm" else "tcp://127.0.0.1:0"
    receiver = wl.Receiver(dst, listen=listen)
    assert receiver.endpoint.startswith(listen.split(":")[0] + ":")
    for version in (1, 2):
        out = subprocess.run(
            [sys.executable, "-c", SENDER, receiver.endpoint, transport, str(version)],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ),
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", str(5 * 300 * 1000 * 4)]
        assert receiver.wait_for_version(version - 1, timeout=10) == version
        for i in range(5):
            assert (dst[f"t{i}"] == version * 10 + i).all()


def test_a_version_commits_on_every_rank_or_on_none():
    trainer = trainer_tensors(seed=4)
    engines = [zeros_like(engine_view(trainer, r, 2)) for r in range(2)]
    r0 = wl.Receiver(engines[0], preset="qwen3", tp_rank=0, tp_size=2, head_dim=HD, initial_version=5)
    r1 = wl.Receiver(engines[1], preset="qwen3", tp_rank=1, tp_size=2, head_dim=HD)
    sender = wl.Sender([r0, r1], preset="qwen3", head_dim=HD)
    # Rank 0 is ahead: it refuses version 3, and rank 1 is called off before a byte moves.
    with pytest.raises(wl.VersionError, match="version 3 is stale") as refused:
        sender.push(trainer, version=3)
    ranks = refused.value.report["ranks"]
    assert [r["outcome"] for r in ranks] == ["refused", "aborted"]
    assert "rank 0 at in-process: refused it" in str(refused.value)
    assert (r1.version, r1.dirty) == (0, [])
    assert all(not a.any() for a in engines[1].values()), "rank 1 was not written"
    # A byte flipped on both ranks: neither commits, both name their tensors.
    with pytest.raises(wl.VerificationError):
        wl.Sender([r0, r1], preset="qwen3", head_dim=HD, _fault="flip:0").push(trainer, version=6)
    assert (r0.version, r1.version) == (5, 0) and r0.dirty and r1.dirty
    report = sender.push(trainer, version=7)
    assert report["committed"] and report["verified"]
    assert (r0.version, r0.dirty, r1.version, r1.dirty) == (7, [], 7, [])


def test_a_receiver_with_a_token_takes_only_senders_holding_it(tmp_path):
    src = {"w": np.arange(1000, dtype=np.float32)}
    dst = zeros_like(src)
    receiver = wl.Receiver(dst, listen=f"unix:{tmp_path}/r.sock", token="s3cret")
    with pytest.raises(wl.TransferError, match="requires a token"):
        wl.Sender(receiver.endpoint, token="").push(src, version=1)
    with pytest.raises(wl.TransferError, match="does not match"):
        wl.Sender(receiver.endpoint, token="guess").push(src, version=1)
    assert receiver.version == 0
    assert wl.Sender(receiver.endpoint, token="s3cret").push(src, version=1)["verified"]
    np.testing.assert_array_equal(dst["w"], src["w"])
    with pytest.raises(wl.TransferError, match="without a token"):
        wl.Receiver(zeros_like(src), listen="tcp://0.0.0.0:0", token="")


class FakeGroup:
    """What a torch.distributed process group offers a Sender: rank() and size()."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_a_sharded_sender_refuses_a_rank_or_world_that_makes_no_sense(tmp_path):
    to = f"unix:{tmp_path}/none.sock"
    for kwargs, words in [
        (dict(rank=2, world=2), "rank 2 of world 2"),
        (dict(rank=-1, world=2), "rank -1 of world 2"),
        (dict(rank=0, world=0), "rank 0 of world 0"),
        (dict(rank=0), "needs `world`"),
        (dict(world=2), "needs `rank`"),
        (dict(group=object()), "torch.distributed process group"),
        (dict(group=FakeGroup(-1, 4)), "not in `group`"),
        (dict(group=FakeGroup(1, 4), world=2), "`world=2` but `group` says 4"),
        (dict(group=FakeGroup(1, 4), rank=0), "`rank=0` but `group` says 1"),
    ]:
        with pytest.raises(wl.PlanError, match=words):
            wl.Sender(to, **kwargs)
    wl.Sender(to, group=FakeGroup(3, 4), rank=3, world=4)  # agreeing: fine (nothing connects yet)
    with pytest.raises(wl.PlanError, match="endpoints"):
        wl.Sender(wl.Receiver(zeros_like(trainer_tensors(seed=1))), rank=0, world=1)


def test_a_sharded_trainers_plain_tensors_come_whole_from_rank_0(tmp_path):
    """Plain arrays are whole on every rank: rank 0 sends them, rank 1 (holding nothing else)
    sends nothing, and the version commits once both pushed it."""
    import threading

    trainer = trainer_tensors(seed=7)
    engine = zeros_like(engine_view(trainer))
    receiver = wl.Receiver(engine, preset="qwen3", listen=f"unix:{tmp_path}/e.sock")
    senders = [wl.Sender(receiver.endpoint, preset="qwen3", rank=r, world=2) for r in range(2)]
    for version in (1, 2):
        trainer = trainer_tensors(seed=7 + version)
        reports = [None, None]

        def push(r):
            try:
                reports[r] = senders[r].push(trainer, version=version)
            except wl.WeightliftError as e:
                reports[r] = e

        threads = [threading.Thread(target=push, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(isinstance(r, dict) and r["committed"] and r["verified"] for r in reports), reports
        assert [r["shard"] for r in reports] == [
            dict(rank=0, world=2, bytes=reports[0]["bytes"]), dict(rank=1, world=2, bytes=0)
        ]
        assert_same(engine, engine_view(trainer))
        assert (receiver.version, receiver.dirty) == (version, [])
