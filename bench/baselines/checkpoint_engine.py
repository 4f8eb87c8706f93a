#!/usr/bin/env python3
"""checkpoint-engine's own weight update on one GPU, as a baseline for host -> GPU updates.

checkpoint-engine (MoonshotAI, PyPI `checkpoint-engine`, pinned here to 0.4.2) keeps the
trainer's weights in pinned host buckets (its `ParameterServer`), and on `update()` copies them
bucket by bucket into device memory, shares a device buffer with the inference engine over CUDA
IPC and drives the engine over ZeroMQ: for every bucket the engine gets the tensors' names,
dtypes, shapes and offsets and copies what it needs into its parameters (vLLM's `load_weights`,
through `checkpoint_engine.worker.update_weights_from_ipc`). This script runs that code path,
unmodified, with world size 1:

  parameter server process (rank 0, cuda:0)        engine process (cuda:0)
  ParameterServer(rank=0, world_size=1)            parameters: torch.empty per tensor
  register_checkpoint(named_tensors=host tensors)  zmq.Context()
  gather_metas()                                   on each ("update", socket_paths):
  update(name, req_func) -- timed --------------->   update_weights_from_ipc(ctx, socket_paths[uuid],
     req_func(socket_paths) tells the engine           device_id=0, run=copy into parameters,
     where the ZMQ socket is                           post_hook=torch.cuda.synchronize)

exactly as checkpoint-engine's own test (tests/test_update.py: a spawned checker process that
calls `update_weights_from_ipc` with the socket paths `ps.update` hands its `req_func`) and
examples/update.py (`ParameterServer(auto_pg=True)`, register, gather_metas, update) do it. The
engine's `run` copies each received tensor into the parameter of the same name
(`param.copy_(t)`, what `load_weights` does for unfused names; no qkv / gate_up fusion, which
is the best case for the baseline), and its post-hook synchronizes (vLLM's would run
`process_weights_after_loading`).

Timed: the wall time of one `ps.update()` call in the parameter server process (CLOCK_MONOTONIC),
which returns once the engine has acknowledged every bucket, released the IPC buffer and run its
post-hook (the engine synchronizes its device before each acknowledgement). With checkpoint-
engine's recommended `auto_pg=True` each update creates and destroys its process group (NCCL,
one rank), as a user's update would; `--keep-process-group` creates it once instead. One
warm-up update precedes --repeats timed ones; reported: median and best. Before each update the
engine overwrites its parameters with a poison value (untimed), so the final check proves the
last timed update wrote them. Not timed: registering the checkpoint (checkpoint-engine copying
the host tensors into its pinned buckets) and gather_metas; both are reported.

Ceiling: the pinned host-to-device copy, measured in the same run in its own process (torch:
`dst.copy_(src, non_blocking=True)` from a pinned --h2d-bytes (1 GiB) buffer to cuda:0, --h2d-
iters copies per sample, median of --h2d-repeats samples). Reported per model: `ratio` = the
update's GB/s / the pinned copy's GB/s.

Verification: the trainer's tensors are random (on the GPU, then copied to ordinary host
memory, which is what `register_checkpoint(named_tensors=...)` takes: it copies them into its
own pinned buckets). Every tensor's checksum (its bits as integers summed in int64, as
torch_baselines.py does) and a BLAKE2b digest of 8 sampled tensors are taken before the update
and compared with the engine's parameters after the last one; the engine also checks that every
parameter was received in every update. `"verified": true` only if all match.

Models (`--models`, comma-separated; `NAME:N` keeps the first N decoder layers): qwen3-8b
(16.4 GB, 399 bf16 tensors) and qwen3-30b-a3b:24 (the first 24 of 48 layers: 31.2 GB, 9,435
tensors), the shapes of crates/weightlift-core/src/models.rs (`source_manifest`), in the same
order and with the same names. `--plan FILE` takes a `weightlift plan --save` file instead.

Needs torch (CUDA build), numpy, and checkpoint-engine with its dependencies (fastapi, httpx,
pydantic, pyzmq, safetensors, loguru and theirs): `bash bench/baselines/fetch_checkpoint_engine.sh`
downloads them as wheels into bench/baselines/wheels/ on a machine with PyPI access; this script
unpacks that folder into wheels/site/ and imports from there (--wheels, the default when the
folder exists), so the GPU machine needs neither pip nor a network. `--help` needs neither torch
nor checkpoint-engine.

Output: one JSON line per model on stdout (and in --json FILE). NCCL_NVLS_ENABLE=0 is forced
(NVLink multicast must stay off on the shared machines). Exit status: 0, 1 if a model failed, 2
if checkpoint-engine (or torch) cannot be imported, 3 if a result did not verify.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
# This file is named like the package it measures: its folder must not be on sys.path, or
# `import checkpoint_engine` would import this script. The shared helpers are loaded by path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]


def _load_helpers():
    import importlib.util

    spec = importlib.util.spec_from_file_location("torch_baselines", os.path.join(HERE, "torch_baselines.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["torch_baselines"] = module
    spec.loader.exec_module(module)
    return module


tb = _load_helpers()  # torch_baselines.py: shared helpers; imports no torch at module level

GiB = tb.GiB
CE_VERSION = "0.4.2"
DEFAULT_WHEELS = os.path.join(HERE, "wheels")
METHOD = "checkpoint_engine"

# Shapes from crates/weightlift-core/src/models.rs (the public config.json files).
MODELS = {
    "qwen3-8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, intermediate=12288,
                     vocab=151936, experts=0, moe_intermediate=0, tie=False),
    "qwen3-30b-a3b": dict(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, intermediate=6144,
                          vocab=151936, experts=128, moe_intermediate=768, tie=False),
}
DEFAULT_MODELS = "qwen3-8b,qwen3-30b-a3b:24"


class Missing(Exception):
    """checkpoint-engine or torch cannot be imported; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# Shapes


def model_specs(name: str, layers: int | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, "BF16", shape) of every tensor, as models.rs `source_manifest` lists them."""
    if name not in MODELS:
        raise SystemExit(f"unknown model {name!r} (known: {', '.join(MODELS)})")
    c = MODELS[name]
    n_layers = c["layers"] if layers is None else layers
    if not 1 <= n_layers <= c["layers"]:
        raise SystemExit(f"{name} has {c['layers']} layers, asked for {n_layers}")
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    specs = []

    def add(n, shape):
        specs.append((n, "BF16", tuple(shape)))

    add("model.embed_tokens.weight", (c["vocab"], h))
    for layer in range(n_layers):
        p = f"model.layers.{layer}"
        add(f"{p}.input_layernorm.weight", (h,))
        add(f"{p}.self_attn.q_proj.weight", (q, h))
        add(f"{p}.self_attn.k_proj.weight", (kv, h))
        add(f"{p}.self_attn.v_proj.weight", (kv, h))
        add(f"{p}.self_attn.o_proj.weight", (h, q))
        add(f"{p}.self_attn.q_norm.weight", (c["head_dim"],))
        add(f"{p}.self_attn.k_norm.weight", (c["head_dim"],))
        add(f"{p}.post_attention_layernorm.weight", (h,))
        if c["experts"]:
            i = c["moe_intermediate"]
            add(f"{p}.mlp.gate.weight", (c["experts"], h))
            for e in range(c["experts"]):
                add(f"{p}.mlp.experts.{e}.gate_proj.weight", (i, h))
                add(f"{p}.mlp.experts.{e}.up_proj.weight", (i, h))
                add(f"{p}.mlp.experts.{e}.down_proj.weight", (h, i))
        else:
            i = c["intermediate"]
            add(f"{p}.mlp.gate_proj.weight", (i, h))
            add(f"{p}.mlp.up_proj.weight", (i, h))
            add(f"{p}.mlp.down_proj.weight", (h, i))
    add("model.norm.weight", (h,))
    if not c["tie"]:
        add("lm_head.weight", (c["vocab"], h))
    return specs


def parse_model(item: str) -> tuple[str, int | None]:
    name, _, layers = item.partition(":")
    if not layers:
        return name, None
    try:
        return name, int(layers)
    except ValueError:
        raise SystemExit(f"--models: {item!r}: expected NAME or NAME:LAYERS") from None


# ----------------------------------------------------------------------------------------------
# checkpoint-engine from a folder of wheels


def unpack_wheels(wheels: str) -> str:
    """Unpack every wheel of `wheels` into wheels/site (once per set of wheels); return it.

    A wheel is a zip of what goes into site-packages (plus *.data/ and *.dist-info/), so
    unpacking it is installing it, compiled extensions included (pyzmq's bundled libzmq is
    found through its RPATH). pip is not needed."""
    paths = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not paths:
        raise Missing(
            f"no wheels in {wheels}: run `bash bench/baselines/fetch_checkpoint_engine.sh` on a machine "
            "with PyPI access and carry bench/baselines/wheels/ here"
        )
    site = os.path.join(wheels, "site")
    stamp = os.path.join(site, ".unpacked-from")
    want = "\n".join(os.path.basename(p) for p in paths) + "\n"
    try:
        with open(stamp) as f:
            if f.read() == want:
                return site
    except OSError:
        pass
    tmp = f"{site}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for path in paths:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename
                if name.endswith("/"):
                    continue
                parts = name.split("/")
                if parts[0].endswith(".data"):  # only library code is needed, not scripts/headers
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                if any(p in ("", "..") for p in parts) or name.startswith("/"):
                    raise Missing(f"{path}: unsafe member {name!r}")
                target = os.path.join(tmp, *parts)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with z.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                mode = (info.external_attr >> 16) & 0o777
                if mode:
                    os.chmod(target, mode | 0o600)
    with open(os.path.join(tmp, ".unpacked-from"), "w") as f:
        f.write(want)
    shutil.rmtree(site, ignore_errors=True)
    os.rename(tmp, site)
    return site


def use_wheels(wheels: str | None) -> str | None:
    """Put the unpacked wheels first on sys.path and PYTHONPATH (spawned workers inherit both)."""
    if not wheels:
        return None
    site = unpack_wheels(wheels)
    sys.path.insert(0, site)
    os.environ["PYTHONPATH"] = site + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    return site


def import_checkpoint_engine(wheels: str | None):
    """Import torch and the parts of checkpoint-engine used here, or raise Missing."""
    hint = (
        "fetch the wheels with `bash bench/baselines/fetch_checkpoint_engine.sh` (PyPI access needed), "
        "carry bench/baselines/wheels/ to this machine and pass `--wheels bench/baselines/wheels` "
        "(or put bench/baselines/wheels/site, which it unpacks to, on PYTHONPATH)"
    )
    try:
        import torch
    except ImportError as e:
        raise Missing(f"torch cannot be imported ({e}): run with the Python that has torch (CUDA build)") from None
    try:
        import checkpoint_engine
        from checkpoint_engine.ps import ParameterServer  # noqa: F401
        from checkpoint_engine.worker import update_weights_from_ipc  # noqa: F401
    except ImportError as e:
        where = f" (looked in {wheels}/site first)" if wheels else ""
        missing = f"module {e.name!r} is missing" if getattr(e, "name", None) else str(e)
        raise Missing(f"checkpoint_engine cannot be imported: {missing}{where}; {hint}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a wheel built for another Python or torch
        raise Missing(f"checkpoint_engine fails to import: {type(e).__name__}: {e}; {hint}") from None
    version = getattr(checkpoint_engine, "__version__", "?")
    return torch.__version__, version


# ----------------------------------------------------------------------------------------------
# Worker processes (spawned; every message to the parent goes over `report`)


def worker(target, cfg, *args):
    report = args[-1]
    tb.force_safe_env()
    try:
        result = target(cfg, *args)
        report.send(("result", result))
        return
    except BaseException:  # noqa: BLE001 - report everything, Ctrl-C included
        try:
            report.send(("error", f"{target.__name__}:\n{traceback.format_exc()}"))
        except Exception:
            pass
        os._exit(1)  # don't hang in NCCL / CUDA / ZMQ destructors after a failure


def h2d_probe(cfg, report):
    """GPU facts and the pinned host-to-device copy rate, in a process of its own."""
    import torch

    gpus = torch.cuda.device_count()
    info = {"gpus": gpus}
    if gpus == 0:
        return info
    torch.cuda.set_device(0)
    info["device"] = torch.cuda.get_device_name(0)
    n = cfg["h2d_bytes"]
    src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    src.fill_(tb.POISON)
    dst = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
    samples = []
    for _ in range(1 + cfg["h2d_repeats"]):  # sample 0 is the warm-up
        torch.cuda.synchronize()
        t0 = tb.now()
        for _ in range(cfg["h2d_iters"]):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        samples.append((tb.now() - t0) / cfg["h2d_iters"])
    ok = bool((dst[:4096] == tb.POISON).all()) and bool((dst[-4096:] == tb.POISON).all())
    median = statistics.median(samples[1:])
    info["h2d"] = {"bytes": n, "iters": cfg["h2d_iters"], "seconds": samples[1:], "median_seconds": median,
                   "gbps": n / median / 1e9, "verified": ok}
    del src, dst
    torch.cuda.empty_cache()
    info["free"], info["total"] = torch.cuda.mem_get_info(0)
    return info


def ps_main(cfg, specs, peer, report):
    """Rank 0 of checkpoint-engine: its ParameterServer, holding the trainer's weights on the host."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(cfg["store_port"]))
    import torch
    from loguru import logger

    import checkpoint_engine.device_utils as ce_device_utils
    import checkpoint_engine.ps as ce_ps
    from checkpoint_engine.ps import ParameterServer

    timeout = cfg["timeout"]

    def progress(msg):
        report.send(("progress", f"parameter server: {msg}"))

    # gather_metas records the host's IP (get_ip: a UDP "connect" to 8.8.8.8, then the host
    # name); a machine with no route out has neither. It is bookkeeping for multi-host P2P only.
    try:
        ce_device_utils.get_ip()
    except Exception:  # noqa: BLE001
        ce_ps.get_ip = lambda: "127.0.0.1"
    # checkpoint-engine logs its bucket sizing; keep those lines for the result.
    notes = []

    def sink(message):
        text = message.record["message"]
        if "bucket size" in text or "h2d buffer" in text:
            notes.append(text)

    logger.add(sink, level="INFO")
    if cfg["quiet"]:
        logger.remove(0)  # its stderr handler (one line per bucket)

    ps = ParameterServer(rank=0, world_size=1, auto_pg=cfg["auto_pg"], master_addr="127.0.0.1",
                         master_port=cfg["store_port"])
    device = torch.device("cuda", 0)

    # The trainer's weights: random on the GPU, checksummed there, then in ordinary host memory.
    host, sums = [], []
    for i, spec in enumerate(specs):
        t = tb.alloc_random(torch, [spec], device, cfg["seed"] + i)[0]
        sums.append(tb.checksums(torch, [t])[0])
        host.append(t.cpu())
        del t
    digests = tb.digests(torch, host, cfg["samples"])
    torch.cuda.empty_cache()  # free memory is what checkpoint-engine sizes its buckets by
    progress(f"{len(host)} host tensors ready")

    name = cfg["checkpoint_name"]
    t0 = tb.now()
    ps.register_checkpoint(name, named_tensors={s[0]: t for s, t in zip(specs, host)})
    register_s = tb.now() - t0
    host.clear()
    gc.collect()
    progress(f"registered ({register_s:.2f} s)")
    if not cfg["auto_pg"]:
        ps.init_process_group()
    t0 = tb.now()
    ps.gather_metas(name)
    gather_s = tb.now() - t0
    tb.expect(peer, timeout, ("allocated",), "the engine's parameters")

    def req_func(socket_paths):
        # checkpoint-engine calls this on a thread once its ZMQ socket is bound; a real trainer
        # posts the paths to the engine (vLLM: /collective_rpc update_weights_from_ipc).
        peer.send(("update", list(socket_paths)))

    seconds = []
    for i in range(1 + cfg["repeats"]):  # update 0 is the warm-up
        peer.send(("poison", i))
        tb.expect(peer, timeout, ("poisoned", i), f"the engine's poisoning before update {i}")
        torch.cuda.synchronize()
        t0 = tb.now()
        ps.update(name, req_func)
        seconds.append(tb.now() - t0)
        tb.expect(peer, timeout, ("updated", i), f"the engine's check of update {i}")
        progress(f"update {i}: {seconds[-1]:.3f} s" + (" (warm-up)" if i == 0 else ""))
        if i < cfg["repeats"] and cfg["auto_pg"] and cfg["pause"] > 0:
            time.sleep(cfg["pause"])  # as checkpoint-engine's test does while its group is destroyed

    peer.send(("finish",))
    tb.expect(peer, timeout, ("bye",), "'bye' from the engine")
    ps.unregister_checkpoint(name)
    if not cfg["auto_pg"]:
        import checkpoint_engine.distributed as ce_dist

        if ce_dist.is_initialized():
            ce_dist.destroy_process_group()
    return {"seconds": seconds, "register_seconds": register_s, "gather_metas_seconds": gather_s,
            "checksums": sums, "digests": digests, "notes": notes}


def engine_main(cfg, specs, peer, report):
    """The inference engine's worker: parameters on cuda:0, fed by update_weights_from_ipc."""
    import torch
    import zmq

    from checkpoint_engine.device_utils import DeviceManager
    from checkpoint_engine.ps import _get_physical_gpu_id  # the id ps.update keys socket paths by
    from checkpoint_engine.worker import update_weights_from_ipc

    timeout = cfg["timeout"]
    torch.cuda.set_device(0)
    device = torch.device("cuda", 0)
    tensors = tb.alloc_empty(torch, specs, device)
    params = dict(zip((s[0] for s in specs), tensors))
    torch.cuda.synchronize()
    uuid = _get_physical_gpu_id(DeviceManager(), 0)
    ctx = zmq.Context()
    report.send(("progress", f"engine: {len(params)} parameters allocated"))
    peer.send(("allocated",))

    received = set()
    update = None

    def load_weights(weights):
        # What an engine's load_weights does for a tensor whose name and shape it holds as is.
        for n, t in weights:
            p = params.get(n)
            if p is None:
                raise KeyError(f"unexpected tensor {n}")
            if p.shape != t.shape or p.dtype != t.dtype:
                raise ValueError(f"{n}: got {t.dtype} {tuple(t.shape)}, hold {p.dtype} {tuple(p.shape)}")
            p.copy_(t)
            received.add(n)

    while True:
        msg = tb.recv_timeout(peer, timeout, "a message from the parameter server")
        if msg[0] == "poison":
            for t in tensors:
                t.fill_(tb.POISON)
            torch.cuda.synchronize()
            update = msg[1]
            peer.send(("poisoned", update))
        elif msg[0] == "update":
            paths = dict(msg[1])
            if uuid not in paths:
                raise RuntimeError(f"no socket for this GPU ({uuid}) in {sorted(paths)}")
            received.clear()
            update_weights_from_ipc(ctx, paths[uuid], device_id=0, run=load_weights,
                                    post_hook=torch.cuda.synchronize)
            torch.cuda.synchronize()
            if len(received) != len(params):
                missing = [n for n in params if n not in received]
                raise RuntimeError(f"update {update}: {len(missing)} parameters not received, e.g. {missing[:3]}")
            peer.send(("updated", update))
        elif msg[0] == "finish":
            break
        else:
            raise RuntimeError(f"protocol: unexpected {msg!r}")

    result = {"checksums": tb.checksums(torch, tensors), "digests": tb.digests(torch, tensors, cfg["samples"])}
    tensors.clear()
    params.clear()
    torch.cuda.empty_cache()
    ctx.term()
    peer.send(("bye",))
    return result


# ----------------------------------------------------------------------------------------------
# The parent


def mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_model(args, ctx, label, specs, probe, versions) -> dict:
    total = sum(tb.spec_bytes(s) for s in specs)
    largest = max(tb.spec_bytes(s) for s in specs)
    head = {"method": METHOD, "mode": "host-to-gpu", "model": label}
    # GPU: the engine's parameters, and checkpoint-engine's buffers (an H2D bucket and two IPC
    # halves, each at least the largest tensor; it sizes them from what is free).
    need = total + 3 * largest + args.headroom_bytes
    if probe["free"] < need:
        raise tb.Skip(f"cuda:0 needs {need / GiB:.1f} GiB free (parameters, 3 buckets, headroom), "
                      f"has {probe['free'] / GiB:.1f} GiB")
    host_need = 2 * total + args.headroom_bytes  # the trainer's host copy and checkpoint-engine's pinned one
    avail = mem_available()
    if avail is not None and avail < host_need:
        raise tb.Skip(f"host memory: needs {host_need / GiB:.1f} GiB available, has {avail / GiB:.1f} GiB")

    cfg = {
        "repeats": args.repeats,
        "timeout": args.timeout,
        "seed": args.seed,
        "samples": tb.sample_indices(specs, args.verify_samples, args.seed),
        "store_port": tb.free_port(),
        "auto_pg": not args.keep_process_group,
        "pause": args.pause,
        "quiet": args.quiet,
        "checkpoint_name": f"baseline-{label}",
    }
    peer_ps, peer_engine = ctx.Pipe(duplex=True)
    results = tb.spawn(
        ctx,
        {
            "ps": (worker, (ps_main, cfg, specs, peer_ps)),
            "engine": (worker, (engine_main, cfg, specs, peer_engine)),
        },
        args.timeout,
        not args.quiet,
        extra_close=(peer_ps, peer_engine),
    )
    ps, engine = results["ps"], results["engine"]
    warmup, timed = ps["seconds"][0], ps["seconds"][1:]
    median = statistics.median(timed)
    bad_sums = [specs[i][0] for i, (a, b) in enumerate(zip(ps["checksums"], engine["checksums"])) if a != b]
    if len(ps["checksums"]) != len(engine["checksums"]):
        bad_sums.append("<count mismatch>")
    bad_digests = [specs[i][0] for i in cfg["samples"] if ps["digests"].get(i) != engine["digests"].get(i)]
    h2d = probe["h2d"]
    gbps = total / median / 1e9
    return dict(
        head,
        tensors=len(specs),
        bytes=total,
        repeats=len(timed),
        seconds=timed,
        median_seconds=median,
        best_seconds=min(timed),
        gbps=gbps,
        pinned_h2d_gbps=h2d["gbps"],
        ratio=gbps / h2d["gbps"],
        warmup_seconds=warmup,
        register_seconds=ps["register_seconds"],
        gather_metas_seconds=ps["gather_metas_seconds"],
        auto_pg=cfg["auto_pg"],
        pause_seconds=cfg["pause"] if cfg["auto_pg"] else 0.0,
        checkpoint_engine=versions[1],
        checkpoint_engine_log=ps["notes"],
        pinned_h2d=h2d,
        verified=not bad_sums and not bad_digests and len(engine["checksums"]) == len(specs),
        verify={
            "checksummed_tensors": len(engine["checksums"]),
            "checksum_mismatches": bad_sums[:20],
            "sampled_tensors": [specs[i][0] for i in cfg["samples"]],
            "digest_mismatches": bad_digests,
        },
        device=probe.get("device"),
        gpus=probe["gpus"],
        date=datetime.date.today().isoformat(),
        torch=versions[0],
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="checkpoint-engine's own update (pinned host buckets -> device -> CUDA IPC -> an engine "
        "process) on one GPU, next to the pinned host-to-device copy. One JSON line per model.",
        epilog="GB/s are decimal. See bench/baselines/README.md.",
    )
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated, NAME or NAME:LAYERS (first LAYERS layers); known: {', '.join(MODELS)} "
                   f"(default {DEFAULT_MODELS})")
    p.add_argument("--plan", help="a `weightlift plan --save` file instead of --models")
    p.add_argument("--model-name", help="model name for --plan (default: the file's name)")
    p.add_argument("--wheels", default=DEFAULT_WHEELS if os.path.isdir(DEFAULT_WHEELS) else None,
                   help="folder of wheels from fetch_checkpoint_engine.sh, unpacked into FOLDER/site and imported "
                   "first (default bench/baselines/wheels when it exists); '' to import from the environment")
    p.add_argument("--json", help="also write the JSON lines here")
    p.add_argument("--repeats", type=int, default=5, help="timed updates after 1 warm-up (default 5)")
    p.add_argument("--keep-process-group", action="store_true",
                   help="ParameterServer(auto_pg=False): one process group for all updates, instead of "
                   "checkpoint-engine's recommended auto_pg=True (a group per update)")
    p.add_argument("--pause", type=float, default=3.0,
                   help="seconds between updates with auto_pg, as checkpoint-engine's test waits for the "
                   "destroyed group (default 3)")
    p.add_argument("--h2d-bytes", type=int, default=GiB, help="pinned copy ceiling buffer (default 1 GiB)")
    p.add_argument("--h2d-iters", type=int, default=10, help="copies per ceiling sample (default 10)")
    p.add_argument("--h2d-repeats", type=int, default=5, help="ceiling samples after 1 warm-up (default 5)")
    p.add_argument("--headroom-bytes", type=int, default=4 * GiB, help="memory to leave free (default 4 GiB)")
    p.add_argument("--verify-samples", type=int, default=8, help="tensors compared by digest (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any wait may last (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines or checkpoint-engine logs on stderr")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.h2d_iters < 1 or args.h2d_repeats < 1:
        p.error("--repeats, --h2d-iters and --h2d-repeats must be at least 1")
    if args.pause < 0:
        p.error("--pause must not be negative")
    if args.plan:
        base = os.path.basename(args.plan)
        args.model_list = [(args.model_name or (base[:-5] if base.endswith(".json") else base), None, args.plan)]
    else:
        args.model_list = [(*parse_model(m), None) for m in args.models.split(",") if m]
        if not args.model_list:
            p.error("--models is empty")
    return args


def specs_for(entry):
    name, layers, plan = entry
    if plan:
        return name, tb.load_specs(plan)
    label = name if layers is None else f"{name}:{layers}"
    return label, model_specs(name, layers)


def emit(record, out):
    line = json.dumps(record)
    print(line, flush=True)
    if out is not None:
        out.write(line + "\n")
        out.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    tb.force_safe_env()
    out = open(args.json, "w") if args.json else None
    try:
        try:
            use_wheels(args.wheels)
            versions = import_checkpoint_engine(args.wheels)
        except Missing as e:
            emit({"method": METHOD, "mode": "host-to-gpu", "model": None, "error": str(e)}, out)
            print(f"checkpoint_engine.py: {e}", file=sys.stderr)
            return 2
        if versions[1] != CE_VERSION:
            print(f"checkpoint_engine.py: note: checkpoint-engine {versions[1]}, written against {CE_VERSION}",
                  file=sys.stderr)
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        code = 0
        probe = None
        try:
            probe = tb.spawn(ctx, {"probe": (worker, (h2d_probe, {
                "h2d_bytes": args.h2d_bytes, "h2d_iters": args.h2d_iters, "h2d_repeats": args.h2d_repeats}))},
                args.timeout, False)["probe"]
        except Exception:  # noqa: BLE001
            emit({"method": METHOD, "mode": "host-to-gpu", "model": None, "error": traceback.format_exc()}, out)
            return 1
        for entry in args.model_list:
            label, specs = specs_for(entry)
            head = {"method": METHOD, "mode": "host-to-gpu", "model": label}
            try:
                if probe["gpus"] == 0:
                    raise tb.Skip("no CUDA GPU visible")
                record = run_model(args, ctx, label, specs, probe, versions)
                if not record["verified"]:
                    code = code or 3
            except tb.Skip as s:
                record = dict(head, skipped=str(s))
            except KeyboardInterrupt:
                emit(dict(head, error="interrupted"), out)
                return 130
            except Exception:  # noqa: BLE001 - one JSON line whatever happens
                record = dict(head, error=traceback.format_exc())
                print(record["error"], file=sys.stderr)
                code = 1
            emit(record, out)
        return code
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    sys.exit(main())
