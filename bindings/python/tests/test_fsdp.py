"""Sharded trainers, for real: transformers Qwen3 (dense, f32 master weights) and Qwen3-MoE
(bf16, stacked experts) under FSDP2 (`fully_shard`, gloo on the CPU) train for 3 steps with 4
and with 2 ranks; after every optimizer step every rank pushes `model.named_parameters()` (its
DTensor shards, uneven and empty ones included) into engines at TP 1 and TP 2 listening on
Unix sockets in this process, and each engine's logits must equal, bit for bit, those of the
trainer's weights gathered with `full_tensor()` (the reference only: the pushes gather nothing).

The engine layouts (fused qkv and gate_up, vLLM's expert stacks, TP shards) and the logits
proof are test_hf_proof's. One job of 4 processes runs everything once (a process importing
torch and transformers is most of the cost on 2 cores): the 4-rank trainer with
`Sender(rank=, world=)`, then a 2-rank trainer of ranks 0 and 1 with `Sender(group=)`, then
the 2-rank trainer's bad inputs. This process checks each step while the ranks wait.
"""

import os
import shutil
import tempfile
import time
import traceback

import pytest

from conftest import HAS_TRANSFORMERS

pytestmark = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs torch and transformers")

if HAS_TRANSFORMERS:
    import torch
    import torch.distributed as dist

    import test_hf_proof as hf
    import weightlift as wl

# (model kind of test_hf_proof, the trainer's dtype).
KINDS = [("untied", "f32"), ("moe", "bf16")]
WORLDS, TPS, STEPS = (4, 2), (1, 2), (1, 2, 3)
# Tensors FSDP2 would cut unevenly (empty shards at 4 ranks), one along dim 1, a replicated
# DTensor and a plain tensor: (name, shape, placement: a dim to shard, "replicate" or "plain").
ODD = [
    ("odd.rows", (6, 4), 0), ("odd.short", (3, 5), 0), ("odd.vec", (5,), 0), ("odd.cols", (4, 7), 1),
    ("odd.replicated", (3, 3), "replicate"), ("odd.plain", (2, 2), "plain"),
]
# The parameter one rank passes wrongly in the bad-input case.
MISTAKEN = "model.layers.0.mlp.down_proj.weight"
BAD_ENGINE = "w2-untied-tp2"


def engine_key(world: int, kind: str, tp: int) -> str:
    return f"w{world}-{kind}-tp{tp}"


def preset(kind: str) -> str:
    return "qwen3-moe" if kind == "moe" else "qwen3"


def odd_whole(world: int) -> dict:
    return {
        name: torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) + 1000 * i + world
        for i, (name, shape, _) in enumerate(ODD)
    }


# --- the trainer's ranks (spawned processes) ---


def _trainer(rank, init, endpoints, queue, acks, workdir):
    """One rank: the 4-rank trainer, then (ranks 0 and 1) the 2-rank one and its bad inputs."""
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=max(WORLDS))
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        pair = dist.new_group([0, 1])  # every rank takes part in making a group
        for world in WORLDS:
            if rank < world:
                if world == dist.get_world_size():
                    mesh, sharding = init_device_mesh("cpu", (world,)), dict(rank=rank, world=world)
                else:
                    mesh, sharding = DeviceMesh.from_group(pair, "cpu"), dict(group=pair)
                models = {
                    kind: _train(rank, world, kind, dtype, mesh, sharding, endpoints, queue, acks, workdir)
                    for kind, dtype in KINDS
                }
                queue.put(("odd", rank, world, _odd(rank, world, mesh, sharding, endpoints[f"w{world}-odd"])))
                if world == 2:
                    out = _bad_inputs(rank, models["untied"], mesh, sharding, endpoints[BAD_ENGINE])
                    queue.put(("bad", rank, out))
            dist.barrier()
        queue.put(("done", rank))
    except BaseException:
        queue.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _model(kind, dtype, mesh):
    torch.manual_seed(0)  # the same initial weights and batch on every rank
    model = hf.model_class(kind)(hf.config(kind)).to({"f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, hf.VOCAB, (2, 24))
    return model, optimizer, batch


def _step(model, optimizer, batch):
    loss = torch.nn.functional.cross_entropy(
        model(input_ids=batch).logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
    )
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train(rank, world, kind, dtype, mesh, sharding, endpoints, queue, acks, workdir):
    from torch.distributed.tensor import DTensor

    model, optimizer, batch = _model(kind, dtype, mesh)
    senders = {
        tp: wl.Sender(endpoints[engine_key(world, kind, tp)], preset=preset(kind), **sharding) for tp in TPS
    }
    for step in STEPS:
        _step(model, optimizer, batch)
        params = list(model.named_parameters())
        assert all(isinstance(p, DTensor) for _, p in params), "FSDP2 left a parameter unsharded"
        pushed = {}
        for tp, sender in senders.items():
            report = sender.push(params, version=step)
            pushed[tp] = dict(
                committed=report["committed"], verified=report["verified"], bytes=report["bytes"],
                share=report["shard"]["bytes"],
            )
        queue.put(("pushed", rank, (world, kind, step), pushed))
        # The reference: the full weights, gathered (a collective every rank takes part in).
        full = {k: v.full_tensor().detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
        if rank == 0:
            path = os.path.join(workdir, f"w{world}-{kind}-{step}.pt")
            torch.save(full, path)
            queue.put(("step", rank, (world, kind, step), path))
            if acks.get(timeout=600) != "go":
                raise SystemExit("the test stopped")
        # No rank pushes the next version before the engines were checked.
        dist.barrier(group=mesh.get_group())
    for sender in senders.values():
        sender.close()
    return model


def _odd(rank, world, mesh, sharding, endpoints):
    """Pushes ODD as this rank holds it: FSDP2's chunks (torch.chunk's sizes, so the last
    ranks' pieces may be empty) made DTensors without a collective."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    named = {}
    for name, whole in odd_whole(world).items():
        how = dict((n, h) for n, _, h in ODD)[name]
        if how == "plain":
            named[name] = whole
        elif how == "replicate":
            named[name] = DTensor.from_local(whole, mesh, [Replicate()], run_check=False)
        else:
            size = -(-whole.size(how) // world)
            start = min(size * rank, whole.size(how))
            local = whole.narrow(how, start, min(size, whole.size(how) - start)).contiguous()
            named[name] = DTensor.from_local(local, mesh, [Shard(how)], run_check=False, shape=whole.shape,
                                             stride=whole.stride())
    return _attempt(wl.Sender(endpoints, **sharding), named, 1)


def _attempt(sender, named, version):
    """What a push did: ("ok", report) or (the error's type, its message)."""
    try:
        report = sender.push(named, version=version)
        return "ok", dict(committed=report["committed"], verified=report["verified"])
    except wl.WeightliftError as e:
        return type(e).__name__, str(e)


def _bad_inputs(rank, model, mesh, sharding, endpoints):
    """Each rank's outcome of pushing version 4 wrongly three ways, then rightly."""
    from torch.distributed.tensor import DTensor, Partial

    named = dict(model.named_parameters())
    sender = lambda **extra: wl.Sender(endpoints, preset="qwen3", timeout=30.0, **sharding, **extra)
    out = {}
    # A pending reduction is not the tensor: refused on every rank before anything connects.
    partial = dict(named)
    local = named["model.norm.weight"].to_local().detach()
    partial["model.norm.weight"] = DTensor.from_local(torch.zeros_like(local), mesh, [Partial()], run_check=False)
    out["partial"] = _attempt(sender(), partial, 4)
    # Rank 1 passes its shard of one parameter as a plain tensor (whole, so rank 0's to send):
    # rank 1's rows of it are missing; the engine's plan refuses both ranks, naming it.
    mistaken = dict(named)
    if rank == 1:
        mistaken[MISTAKEN] = named[MISTAKEN].to_local().detach()
    second = sender()
    out["plain_shard"] = _attempt(second, mistaken, 4)
    # A byte of rank 1's share flipped on the way: the version fails on every rank.
    third = sender(_fault="flip:0" if rank == 1 else None)
    out["flipped"] = _attempt(third, named, 4)
    # Then right: rank 0 with the sender whose push just failed, rank 1 with the one refused.
    out["retry"] = _attempt(third if rank == 0 else second, named, 4)
    return out


# --- this process: the engines, and the checks after every step ---


class Engine:
    """One engine (test_hf_proof's layout) of `tp` ranks, each listening on a Unix socket."""

    def __init__(self, kind, tp, workdir, key, like):
        bf16 = {k: v.to(torch.bfloat16) for k, v in like.state_dict().items()}
        self.kind = kind
        self.ranks = [{k: torch.zeros_like(v) for k, v in hf.engine_layout(bf16, kind, r, tp).items()} for r in range(tp)]
        self.bytes = sum(t.numel() * t.element_size() for rank in self.ranks for t in rank.values())
        self.receivers = [
            wl.Receiver(self.ranks[r], preset=preset(kind), tp_rank=r, tp_size=tp, timeout=60.0,
                        listen=f"unix:{workdir}/{key}-{r}.sock")
            for r in range(tp)
        ]

    def endpoints(self):
        return [r.endpoint for r in self.receivers]


def _check(engines, models, batch, world, kind, step, path, results, previous):
    """Records, per engine of (world, kind), what differs from the trainer's step `step`."""
    want = torch.load(path)
    reference, engine_model = models[kind]
    reference.load_state_dict(want)
    want_logits = hf.logits(reference, batch)
    for tp in TPS:
        key = engine_key(world, kind, tp)
        engine, problems = engines[key], []
        for r, receiver in enumerate(engine.receivers):
            if receiver.version != step or receiver.dirty:
                problems.append(f"rank {r}: version {receiver.version}, dirty {receiver.dirty[:3]}")
        got = hf.reassemble(engine.ranks, kind, tied=False)
        problems += [f"`{n}` differs" for n, t in want.items() if n in got and not torch.equal(got[n], t)]
        engine_model.load_state_dict(got, strict=True)
        if not torch.equal(hf.logits(engine_model, batch), want_logits):
            problems.append("logits differ")
        if key in previous and torch.equal(previous[key], want_logits):
            problems.append("the optimizer changed nothing")
        previous[key] = want_logits
        results.setdefault(key, {})[step] = problems
    return want


@pytest.fixture(scope="module")
def job():
    """Runs the trainers once; what every check found, per engine and step."""
    import torch.multiprocessing as mp

    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="wl-fsdp-")  # short: Unix socket paths are limited
    try:
        torch.manual_seed(0)
        models, engines = {}, {}
        for kind, _ in KINDS:
            cls, cfg = hf.model_class(kind), hf.config(kind)
            models[kind] = tuple(cls(cfg).to(torch.bfloat16).eval() for _ in range(2))
            for world in WORLDS:
                for tp in TPS:
                    key = engine_key(world, kind, tp)
                    engines[key] = Engine(kind, tp, workdir, key, models[kind][0])
        batch = torch.randint(0, hf.VOCAB, (2, 24))
        odd = {}
        for world in WORLDS:
            odd[world] = {name: torch.zeros_like(t) for name, t in odd_whole(world).items()}
            receiver = wl.Receiver(odd[world], listen=f"unix:{workdir}/w{world}-odd.sock")
            engines[f"w{world}-odd"] = receiver
        endpoints = {k: e.endpoints() if isinstance(e, Engine) else [e.endpoint] for k, e in engines.items()}
        ctx = mp.get_context("spawn")
        queue, acks = ctx.Queue(), ctx.Queue()
        init = f"file://{workdir}/store"
        procs = [ctx.Process(target=_trainer, args=(r, init, endpoints, queue, acks, workdir)) for r in range(max(WORLDS))]
        for p in procs:
            p.start()
        results, pushed, bad, finals, previous, done, odd_pushes = {}, {}, {}, {}, {}, set(), {}
        try:
            while len(done) < len(procs):
                try:
                    message = queue.get(timeout=5)
                except Exception:
                    dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                    assert not dead, f"a trainer rank died (exit codes {dead})"
                    assert time.monotonic() - started < 600, "the trainers took over 10 minutes"
                    continue
                what, rank = message[0], message[1]
                if what == "error":
                    pytest.fail(f"trainer rank {rank} failed:\n{message[2]}")
                elif what == "pushed":
                    pushed.setdefault(message[2], {})[rank] = message[3]
                elif what == "step":
                    world, kind, step = message[2]
                    finals[(world, kind)] = _check(engines, models, batch, world, kind, step, message[3], results, previous)
                    acks.put("go")
                elif what == "odd":
                    odd_pushes.setdefault(message[2], {})[rank] = message[3]
                elif what == "bad":
                    bad[rank] = message[2]
                elif what == "done":
                    done.add(rank)
        finally:
            for _ in procs:
                acks.put("stop")
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
        # After the bad inputs and the retry, the engine holds step 3's weights as version 4.
        engine = engines[BAD_ENGINE]
        after = dict(versions=[r.version for r in engine.receivers], dirty=[r.dirty for r in engine.receivers])
        got = hf.reassemble(engine.ranks, "untied", tied=False)
        after["same"] = all(torch.equal(got[n], t) for n, t in finals[(2, "untied")].items() if n in got)
        odd_got = {world: (engines[f"w{world}-odd"].version, odd[world]) for world in WORLDS}
        yield dict(results=results, pushed=pushed, bad=bad, after=after, engines=engines, odd=(odd_pushes, odd_got),
                   seconds=time.monotonic() - started)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


CASES = [(w, k, tp) for w in WORLDS for k, _ in KINDS for tp in TPS]


@pytest.mark.parametrize("world,kind,tp", CASES, ids=[engine_key(*c) for c in CASES])
def test_engine_logits_equal_the_fsdp_trainers_after_every_step(job, world, kind, tp):
    key = engine_key(world, kind, tp)
    assert job["results"].get(key) == {step: [] for step in STEPS}, job["results"].get(key)
    for step in STEPS:
        ranks = job["pushed"][(world, kind, step)]
        assert sorted(ranks) == list(range(world)), ranks
        assert all(r[tp]["committed"] and r[tp]["verified"] for r in ranks.values()), ranks
        # Each rank moved its own share: together, the engine's bytes, once.
        engine_bytes = job["engines"][key].bytes
        assert all(r[tp]["bytes"] == engine_bytes for r in ranks.values()), (engine_bytes, ranks)
        assert sum(r[tp]["share"] for r in ranks.values()) == engine_bytes, (engine_bytes, ranks)


@pytest.mark.parametrize("world", WORLDS)
def test_uneven_empty_and_dim_1_shards_land_whole(job, world):
    pushes, got = job["odd"]
    assert pushes[world] == {r: ("ok", dict(committed=True, verified=True)) for r in range(world)}, pushes[world]
    version, tensors = got[world]
    assert version == 1
    for name, whole in odd_whole(world).items():
        assert torch.equal(tensors[name], whole), name


def test_a_ranks_bad_input_fails_clearly_on_every_rank(job):
    bad = job["bad"]
    assert sorted(bad) == [0, 1], bad
    for rank, out in bad.items():
        kind, message = out["partial"]
        assert kind == "PlanError" and "`model.norm.weight`" in message and "Partial" in message, (rank, out)
        kind, message = out["plain_shard"]
        assert kind == "PlanError" and f"bad pieces of `{MISTAKEN}`" in message, (rank, out)
        kind, message = out["flipped"]
        assert kind == "VerificationError" and "digest mismatch" in message, (rank, out)
        assert message.count("still on version 3") == 2, (rank, out)
        assert out["retry"] == ("ok", dict(committed=True, verified=True)), (rank, out)
    assert job["after"] == dict(versions=[4, 4], dirty=[[], []], same=True), job["after"]
