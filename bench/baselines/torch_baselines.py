#!/usr/bin/env python3
"""PyTorch baselines for moving RL policy weights from a trainer into an inference engine.

Each run measures one method in one mode and writes one JSON result. The tensors are a real
model's (names, dtypes, shapes from a `weightlift plan --save` file); the "trainer" holds them
with random contents on the sender GPU, the "engine" holds identically shaped parameters on the
receiver GPU. Copying tensor to identically shaped tensor (no qkv / gate_up fusion, no TP
slicing) is the best case for every baseline here.

Methods
-------
d2d          Ceiling: one process, one contiguous `dst.copy_(src)` of --ceiling-bytes on cuda:0.
             Reports bytes copied per second (each byte counted once, not read + write).
peer         Ceiling: the same copy from cuda:0 to cuda:1 (NVLink / PCIe peer copy).
hbm_read     Ceiling: a read-only kernel, `x.sum()` over --ceiling-bytes of float32 on cuda:0.
             Reports bytes read per second.
ipc          What SGLang's `update_weights_from_tensor` does on one host: the trainer turns every
             tensor into a CUDA IPC handle (`torch.multiprocessing.reductions.reduce_tensor`),
             pickles the list of (name, (rebuild_fn, args)) once per update through a
             ForkingPickler (SGLang's MultiprocessingSerializer) and sends it over a Pipe; the
             engine rebuilds every tensor (opening the IPC handle) and copies it into its
             parameter (`param.copy_(t)`, as `load_weights` does).
nccl         torch.distributed + NCCL, ranks 0 (trainer) and 1 (engine): one
             `dist.broadcast(tensor, src=0)` per tensor; the engine broadcasts straight into its
             parameter. Cross-GPU only: NCCL needs one GPU per rank.
nccl_bucket  Same ranks, --bucket-bytes (1 GiB) buckets: the trainer copies consecutive tensors
             into slices of one persistent flat buffer, broadcasts the used part, the engine
             copies the slices out into its parameters. Not pipelined: pack, broadcast, unpack
             in sequence. A tensor larger than the bucket is broadcast directly.

Modes: `colocated` (trainer and engine processes both on cuda:0) and `cross` (trainer on cuda:0,
engine on cuda:1). The ceilings have a fixed mode (d2d and hbm_read: colocated; peer: cross);
asked for the other mode they report `skipped`.

Timing
------
The timed region is one whole update of every tensor: from the moment the sender starts sending
(before the first `reduce_tensor` / broadcast) until the receiver has written every parameter,
read on the wall clock after `torch.cuda.synchronize` of every device involved, on whichever side
finishes last. Both processes read CLOCK_MONOTONIC, which is one clock for the whole host, so the
sender's start and the receiver's end are comparable. Before each update the receiver overwrites
its parameters with a poison value and synchronizes, then tells the sender it is ready; the
poisoning is outside the timed region, and it makes the final check prove that the *last timed*
update wrote every checked byte. One warm-up update (NCCL communicator set-up, IPC handle opening,
CUDA context on the peer GPU) precedes --repeats timed updates; we report the best and the median.
IPC handles are closed after the receiver's clock is read: the parameters are written by then.

Ceilings time --ceiling-iters back-to-back operations between two synchronizations and report
the mean per operation for each of --repeats samples (a 4 GiB copy takes ~2 ms, too short for a
single wall-clock reading to be steady).

Verification
------------
After the timed updates both sides compute, each from its own GPU memory: a checksum of every
tensor (its bits viewed as integers, summed in int64) and a BLAKE2b digest of the raw bytes of a
few sampled tensors (the first, the last, the largest and --verify-samples - 3 random ones).
Equal digests mean bitwise-equal tensors (what torch.equal on one device would say, but without
moving GBs between processes). "verified" is true only if every checksum and every sampled
digest matches. Ceilings compare dst with src directly (hbm_read: the float32 sum against a
float64 reference).

Safety: NCCL_NVLS_ENABLE=0 is forced (NVLink multicast must stay off on the shared machines);
every blocking receive in the parent and the workers has a timeout; on error, timeout or Ctrl-C
the parent terminates its worker processes.

torch is imported lazily so that `--help` works without it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pickle
import random
import socket
import statistics
import sys
import time
import traceback

GiB = 1 << 30

# safetensors dtype names used in weightlift plans -> (torch dtype attribute, bytes per element)
DTYPES = {
    "F32": ("float32", 4),
    "BF16": ("bfloat16", 2),
    "F16": ("float16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}

CEILINGS = ("d2d", "peer", "hbm_read")
PAIR_METHODS = ("ipc", "nccl", "nccl_bucket")
METHODS = CEILINGS + PAIR_METHODS
MODES = ("colocated", "cross")
CEILING_MODE = {"d2d": "colocated", "hbm_read": "colocated", "peer": "cross"}

POISON = 7  # written into the receiver's parameters before every update
CHECKSUM_CHUNK = 1 << 24  # elements summed per kernel in checksums (bounds the int64 temporary)
ALIGN = 256  # byte alignment of tensors packed into a bucket


class Skip(Exception):
    """The method cannot run on this machine / in this mode; the message says why."""


def now() -> float:
    """CLOCK_MONOTONIC in seconds: one clock for every process on the host."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def force_safe_env() -> None:
    """NVLink multicast (NVLS) must never be enabled on these machines; children inherit this."""
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
    os.environ["NVSHMEM_DISABLE_NVLS"] = "1"


# ----------------------------------------------------------------------------------------------
# Plan loading and helpers that need no torch


def load_specs(path: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every `sources[*].spec` in a `weightlift plan --save` file."""
    with open(path) as f:
        plan = json.load(f)
    sources = plan.get("sources") if isinstance(plan, dict) else None
    if not sources:
        raise SystemExit(f"{path}: no 'sources' array (expected a `weightlift plan --save` file)")
    specs = []
    names = set()
    for src in sources:
        spec = src["spec"]
        name, dtype, shape = spec["name"], spec["dtype"], tuple(int(d) for d in spec["shape"])
        if dtype not in DTYPES:
            raise SystemExit(f"{path}: tensor {name}: unsupported dtype {dtype}")
        if name in names:  # several senders (TP shards) may carry one name: keep keys unique
            name = f"{name}@{src.get('sender', 0)}:{src.get('row_offset', 0)}"
        names.add(name)
        specs.append((name, dtype, shape))
    return specs


def spec_bytes(spec) -> int:
    return math.prod(spec[2]) * DTYPES[spec[1]][1]


def sample_indices(specs, count: int, seed: int) -> list[int]:
    """The first, the last, the largest and random tensors, `count` in all (fewer if few)."""
    n = len(specs)
    if n == 0:
        return []
    chosen = {0, n - 1, max(range(n), key=lambda i: spec_bytes(specs[i]))}
    rest = [i for i in range(n) if i not in chosen]
    extra = max(0, count - len(chosen))
    chosen.update(random.Random(seed).sample(rest, min(extra, len(rest))))
    return sorted(chosen)


def bucket_groups(specs, bucket_bytes: int):
    """Greedy packing of consecutive tensors into buckets.

    Returns a list of ("bucket", [(index, offset, nbytes), ...], used_bytes) and
    ("direct", index) entries, in tensor order. Offsets are ALIGN-aligned.
    """
    groups, items, used = [], [], 0
    for i, spec in enumerate(specs):
        nbytes = spec_bytes(spec)
        if nbytes > bucket_bytes:
            if items:
                groups.append(("bucket", items, used))
                items, used = [], 0
            groups.append(("direct", i))
            continue
        off = -(-used // ALIGN) * ALIGN
        if off + nbytes > bucket_bytes:
            groups.append(("bucket", items, used))
            items, off = [], 0
        items.append((i, off, nbytes))
        used = off + nbytes
    if items:
        groups.append(("bucket", items, used))
    return groups


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_timeout(conn, timeout: float, what: str):
    """conn.recv() that raises TimeoutError instead of blocking forever."""
    if not conn.poll(timeout):
        raise TimeoutError(f"no {what} within {timeout:.0f} s")
    return conn.recv()


def expect(conn, timeout: float, tag, what: str):
    msg = recv_timeout(conn, timeout, what)
    if msg != tag:
        raise RuntimeError(f"protocol: expected {tag!r}, got {msg!r}")


# ----------------------------------------------------------------------------------------------
# Helpers that run with torch, in the workers (and the parent for ceilings)


def torch_dtype(torch, name: str):
    return getattr(torch, DTYPES[name][0])


def alloc_random(torch, specs, device, seed: int):
    """The trainer's tensors: random normal values for float types, random integers otherwise."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    out = []
    for _, dt, shape in specs:
        dtype = torch_dtype(torch, dt)
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        elif dtype.is_floating_point:  # float8: no randn, draw in bf16 and cast
            t = torch.randn(shape, dtype=torch.bfloat16, device=device, generator=gen).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, dtype=torch.uint8, device=device, generator=gen).bool()
        else:
            t = torch.randint(0, 100, shape, dtype=dtype, device=device, generator=gen)
        out.append(t)
    return out


def alloc_empty(torch, specs, device):
    return [torch.empty(shape, dtype=torch_dtype(torch, dt), device=device) for _, dt, shape in specs]


def byte_view(torch, t):
    """A flat uint8 view of a contiguous tensor (shares its memory)."""
    return t.reshape(-1).view(torch.uint8)


def checksums(torch, tensors) -> list[int]:
    """Per tensor: its elements' bits as integers of the same width, summed in int64."""
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    sums = []
    for t in tensors:
        flat = t.reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        flat = flat.view(as_int[flat.element_size()])
        acc = torch.zeros((), dtype=torch.int64, device=t.device)
        for chunk in flat.split(CHECKSUM_CHUNK):
            acc += chunk.sum(dtype=torch.int64)
        sums.append(acc)
    return torch.stack(sums).cpu().tolist() if sums else []


def digests(torch, tensors, indices) -> dict[int, str]:
    """BLAKE2b of the raw bytes of the sampled tensors, read back to the host."""
    out = {}
    for i in indices:
        host = byte_view(torch, tensors[i]).cpu().numpy()
        out[i] = hashlib.blake2b(host, digest_size=16).hexdigest()
    return out


def sync_devices(torch, devices) -> None:
    for d in devices:
        torch.cuda.synchronize(d)


# ----------------------------------------------------------------------------------------------
# Two-process methods: the worker side


def make_transfer(torch, cfg, role, specs, tensors, peer):
    """One update's work on this side, as a function returning what must stay alive until the
    caller has synchronized (IPC tensors must not be closed while copies into them run)."""
    method, timeout = cfg["method"], cfg["timeout"]
    names = [s[0] for s in specs]

    if method == "ipc":
        if role == "sender":
            from multiprocessing.reduction import ForkingPickler

            from torch.multiprocessing.reductions import reduce_tensor

            def send_update():
                # One IPC handle (+ event, + ref counter) per tensor, one message per update.
                items = [(name, reduce_tensor(t)) for name, t in zip(names, tensors)]
                peer.send_bytes(ForkingPickler.dumps(items))
                return None

            return send_update

        params = dict(zip(names, tensors))

        def recv_update():
            if not peer.poll(timeout):
                raise TimeoutError(f"no IPC handles within {timeout:.0f} s")
            items = pickle.loads(peer.recv_bytes())
            rebuilt = [(name, fn(*args)) for name, (fn, args) in items]  # opens the IPC handles
            if len(rebuilt) != len(params):
                raise RuntimeError(f"got {len(rebuilt)} tensors, expected {len(params)}")
            for name, t in rebuilt:
                params[name].copy_(t)
            return rebuilt

        return recv_update

    import torch.distributed as dist

    if method == "nccl":

        def broadcast_each():
            for t in tensors:  # sender: its tensors; receiver: its parameters, in place
                dist.broadcast(t, src=0)
            return None

        return broadcast_each

    if method == "nccl_bucket":
        groups = bucket_groups(specs, cfg["bucket_bytes"])
        need = max((g[2] for g in groups if g[0] == "bucket"), default=0)
        bucket = torch.empty(max(need, 1), dtype=torch.uint8, device=tensors[0].device)
        views = [byte_view(torch, t) for t in tensors]
        sending = role == "sender"

        def bucketed():
            for g in groups:
                if g[0] == "direct":
                    dist.broadcast(tensors[g[1]], src=0)
                    continue
                _, items, used = g
                if sending:
                    for i, off, n in items:
                        bucket[off : off + n].copy_(views[i])
                dist.broadcast(bucket[:used], src=0)
                if not sending:
                    for i, off, n in items:
                        views[i].copy_(bucket[off : off + n])
            return None

        bucketed.bucket = bucket  # keep it alive with the closure
        return bucketed

    raise ValueError(method)


def pair_worker(role, cfg, specs, peer, report):
    """Entry point of the sender ('sender', rank 0) and receiver ('receiver', rank 1) processes."""
    force_safe_env()
    try:
        import torch

        result = run_role(torch, role, cfg, specs, peer, report)
        report.send(("result", result))
        finish_role(torch, role, cfg, peer)
    except BaseException:  # noqa: BLE001 - report everything, Ctrl-C included
        try:
            report.send(("error", f"{role}:\n{traceback.format_exc()}"))
        except Exception:
            pass
        os._exit(1)  # don't hang in NCCL / CUDA destructors after a failure


_STATE = {}  # objects a worker keeps until finish_role


def run_role(torch, role, cfg, specs, peer, report):
    timeout, repeats, method = cfg["timeout"], cfg["repeats"], cfg["method"]
    dev = cfg["sender_device"] if role == "sender" else cfg["receiver_device"]
    torch.cuda.set_device(dev)
    device = torch.device("cuda", dev)
    # An IPC receiver works on the sender's GPU too: the opened handles live there.
    devices = sorted({dev, cfg["sender_device"]}) if role == "receiver" and method == "ipc" else [dev]

    def progress(msg):
        report.send(("progress", f"{role}: {msg}"))

    if role == "sender":
        tensors = alloc_random(torch, specs, device, cfg["seed"])
    else:
        tensors = alloc_empty(torch, specs, device)
    sync_devices(torch, devices)
    _STATE["tensors"] = tensors
    progress("tensors allocated")

    if method in ("nccl", "nccl_bucket"):
        import torch.distributed as dist

        dist.init_process_group(
            backend="nccl",
            init_method=f"tcp://127.0.0.1:{cfg['port']}",
            rank=0 if role == "sender" else 1,
            world_size=2,
            timeout=datetime.timedelta(seconds=timeout),
            device_id=device,
        )
        probe = torch.ones(1, device=device)
        dist.broadcast(probe, src=0)
        torch.cuda.synchronize(device)
        _STATE["dist"] = dist
        progress("NCCL ready")

    transfer = make_transfer(torch, cfg, role, specs, tensors, peer)
    starts, ends = [], []
    for i in range(1 + repeats):  # update 0 is the warm-up
        if role == "receiver":
            for t in tensors:
                t.fill_(POISON)
            sync_devices(torch, devices)
            peer.send(("ready", i))
            keep = transfer()
            sync_devices(torch, devices)
            ends.append(now())
            del keep  # closes this update's IPC handles, after the clock is read
        else:
            expect(peer, timeout, ("ready", i), f"'ready' for update {i}")
            sync_devices(torch, devices)
            starts.append(now())
            transfer()
            sync_devices(torch, devices)
            ends.append(now())
        progress(f"update {i} done" + (" (warm-up)" if i == 0 else ""))
    if role == "receiver":
        peer.send(("done",))
    else:
        expect(peer, timeout, ("done",), "'done' after the last update")

    result = {
        "role": role,
        "starts": starts,
        "ends": ends,
        "checksums": checksums(torch, tensors),
        "digests": digests(torch, tensors, cfg["samples"]),
    }
    if method == "nccl_bucket":
        result["bucket_bytes_allocated"] = transfer.bucket.numel()
    return result


def finish_role(torch, role, cfg, peer):
    """Tear down in an order that leaves no IPC reference dangling: the receiver frees first."""
    timeout = cfg["timeout"]
    if role == "receiver":
        _STATE.clear()
        torch.cuda.empty_cache()
        peer.send(("bye",))
    else:
        expect(peer, timeout, ("bye",), "'bye' from the receiver")
        _STATE.pop("tensors", None)
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()
    dist = _STATE.pop("dist", None)
    if dist is not None:
        dist.destroy_process_group()


def probe_worker(report):
    """Runs in a child so that the parent holds no CUDA context (its memory counts)."""
    try:
        import torch

        n = torch.cuda.device_count()
        info = {"gpus": n, "names": [], "free": [], "total": []}
        for i in range(n):
            info["names"].append(torch.cuda.get_device_name(i))
            free, total = torch.cuda.mem_get_info(i)
            info["free"].append(free)
            info["total"].append(total)
        try:
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
        except Exception:
            info["nccl"] = None
        report.send(("result", info))
    except BaseException:  # noqa: BLE001
        try:
            report.send(("error", f"probe:\n{traceback.format_exc()}"))
        except Exception:
            pass
        os._exit(1)


# ----------------------------------------------------------------------------------------------
# The parent: supervision of worker processes


def supervise(procs: dict, reports: dict, timeout: float, verbose: bool) -> dict:
    """Collect one result per worker. Every wait has `timeout`; a worker that dies, reports an
    error or stays silent too long fails the run (the caller terminates the others)."""
    from multiprocessing.connection import wait

    results, pending = {}, dict(reports)
    while pending:
        ready = wait(list(pending.values()), timeout=timeout)
        if not ready:
            raise TimeoutError(f"no message from {sorted(pending)} within {timeout:.0f} s")
        for role in [r for r, c in pending.items() if c in ready]:
            try:
                kind, payload = pending[role].recv()
            except EOFError:
                procs[role].join(5)
                raise RuntimeError(f"{role} exited (code {procs[role].exitcode}) without a result")
            if kind == "progress":
                if verbose:
                    print(f"  [{time.strftime('%H:%M:%S')}] {payload}", file=sys.stderr, flush=True)
            elif kind == "result":
                results[role] = payload
                del pending[role]
            else:
                raise RuntimeError(f"worker failed: {payload}")
    return results


def stop(procs: dict) -> None:
    """Terminate whatever is still running: SIGTERM, then SIGKILL."""
    for p in procs.values():
        if p.is_alive():
            p.terminate()
    for p in procs.values():
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join(10)


def spawn(ctx, targets: dict, timeout: float, verbose: bool, extra_close=()) -> dict:
    """Start one process per (role -> (fn, args)), collect their results, always clean up."""
    procs, reports = {}, {}
    try:
        for role, (fn, args) in targets.items():
            r, w = ctx.Pipe(duplex=False)
            p = ctx.Process(target=fn, args=(*args, w), name=f"baseline-{role}", daemon=True)
            p.start()
            w.close()  # the child holds the only write end: its death reads as EOF here
            procs[role], reports[role] = p, r
        for c in extra_close:  # the parent's copies of the peer pipe: children hold theirs
            c.close()
        results = supervise(procs, reports, timeout, verbose)
        for p in procs.values():
            p.join(timeout)
        return results
    finally:
        stop(procs)


def probe(ctx, timeout: float) -> dict:
    return spawn(ctx, {"probe": (probe_worker, ())}, timeout, False)["probe"]


# ----------------------------------------------------------------------------------------------
# Runs


def run_pair(args, specs) -> dict:
    method, mode = args.method, args.mode
    if method in ("nccl", "nccl_bucket") and mode == "colocated":
        raise Skip("NCCL needs one GPU per rank: two ranks cannot share cuda:0")
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    info = probe(ctx, args.timeout)
    gpus = info["gpus"]
    if gpus == 0:
        raise Skip("no CUDA GPU visible")
    if mode == "cross" and gpus < 2:
        raise Skip(f"cross mode needs 2 GPUs, found {gpus}")
    sender_dev, receiver_dev = (0, 0) if mode == "colocated" else (0, 1)

    total = sum(spec_bytes(s) for s in specs)
    per_side = total + (args.bucket_bytes if method == "nccl_bucket" else 0)
    need = {sender_dev: 0, receiver_dev: 0}
    need[sender_dev] += per_side  # colocated: both sides' tensors on cuda:0
    need[receiver_dev] += per_side
    for dev, b in need.items():
        if info["free"][dev] < b + args.headroom_bytes:
            raise Skip(
                f"cuda:{dev} needs {b / GiB:.1f} GiB + {args.headroom_bytes / GiB:.0f} GiB headroom, "
                f"has {info['free'][dev] / GiB:.1f} GiB free of {info['total'][dev] / GiB:.1f} GiB"
            )

    cfg = {
        "method": method,
        "mode": mode,
        "repeats": args.repeats,
        "timeout": args.timeout,
        "seed": args.seed,
        "bucket_bytes": args.bucket_bytes,
        "samples": sample_indices(specs, args.verify_samples, args.seed),
        "sender_device": sender_dev,
        "receiver_device": receiver_dev,
        "port": free_port() if method.startswith("nccl") else None,
    }
    peer_s, peer_r = ctx.Pipe(duplex=True)
    results = spawn(
        ctx,
        {
            "sender": (pair_worker, ("sender", cfg, specs, peer_s)),
            "receiver": (pair_worker, ("receiver", cfg, specs, peer_r)),
        },
        args.timeout,
        not args.quiet,
        extra_close=(peer_s, peer_r),
    )
    snd, rcv = results["sender"], results["receiver"]
    # update i: from the sender's start to the later of the two sides' ends
    seconds = [max(se, re) - st for st, se, re in zip(snd["starts"], snd["ends"], rcv["ends"])]
    warmup, timed = seconds[0], seconds[1:]
    sender_side = [se - st for st, se in zip(snd["starts"][1:], snd["ends"][1:])]

    bad_sums = [specs[i][0] for i, (a, b) in enumerate(zip(snd["checksums"], rcv["checksums"])) if a != b]
    bad_sums += ["<count mismatch>"] if len(snd["checksums"]) != len(rcv["checksums"]) else []
    bad_digests = [specs[i][0] for i in cfg["samples"] if snd["digests"].get(i) != rcv["digests"].get(i)]
    verified = not bad_sums and not bad_digests and len(rcv["checksums"]) == len(specs)

    out = result_record(args, info["names"][0], gpus, len(specs), total, timed)
    out.update(
        warmup_seconds=warmup,
        # the sender's own part (ipc: making handles + pickling + sending; nccl: until its
        # broadcasts completed), for telling serialization from copying
        sender_median_seconds=statistics.median(sender_side),
        verified=verified,
        verify={
            "checksummed_tensors": len(rcv["checksums"]),
            "checksum_mismatches": bad_sums[:20],
            "sampled_tensors": [specs[i][0] for i in cfg["samples"]],
            "digest_mismatches": bad_digests,
        },
    )
    if method.startswith("nccl"):
        out["nccl"] = info.get("nccl")
    if method == "nccl_bucket":
        groups = bucket_groups(specs, args.bucket_bytes)
        out["bucket_bytes"] = args.bucket_bytes
        out["buckets"] = sum(1 for g in groups if g[0] == "bucket")
        out["direct_tensors"] = sum(1 for g in groups if g[0] == "direct")
    return out


def run_ceiling(args) -> dict:
    """d2d / peer / hbm_read, in this process."""
    import torch

    method, n = args.method, args.ceiling_bytes
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise Skip("no CUDA GPU visible")
    if method == "peer" and gpus < 2:
        raise Skip(f"peer copy needs 2 GPUs, found {gpus}")
    # bytes needed per device: src + dst (+ a copy of src on cuda:1 to check peer)
    need = {"d2d": {0: 2 * n}, "hbm_read": {0: n + n // 8}, "peer": {0: n, 1: 2 * n}}[method]
    for dev, b in need.items():
        free, total = torch.cuda.mem_get_info(dev)
        if free < b + args.headroom_bytes:
            raise Skip(
                f"cuda:{dev} needs {b / GiB:.1f} GiB + {args.headroom_bytes / GiB:.0f} GiB headroom, "
                f"has {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB"
            )

    d0 = torch.device("cuda", 0)
    gen = torch.Generator(device=d0)
    gen.manual_seed(args.seed)
    devices = [0, 1] if method == "peer" else [0]
    if method == "hbm_read":
        n -= n % 4
        src = torch.randn(n // 4, dtype=torch.float32, device=d0, generator=gen)

        def op():
            return src.sum()

    else:
        src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=d0, generator=gen)
        dst = torch.empty(n, dtype=torch.uint8, device=torch.device("cuda", 1 if method == "peer" else 0))
        dst.fill_(POISON)

        def op():
            return dst.copy_(src)

    sync_devices(torch, devices)
    samples = []
    for i in range(1 + args.repeats):  # sample 0 is the warm-up
        sync_devices(torch, devices)
        t0 = now()
        for _ in range(args.ceiling_iters):
            res = op()
        sync_devices(torch, devices)
        samples.append((now() - t0) / args.ceiling_iters)
    warmup, timed = samples[0], samples[1:]

    if method == "hbm_read":
        ref = torch.zeros((), dtype=torch.float64, device=d0)
        for chunk in src.split(1 << 26):
            ref += chunk.double().sum()
        # float32 rounding of a sum of N standard normals is far below sqrt(N) * 1e-3; a kernel
        # that skipped part of the data would be off by about sqrt(skipped) (checked: |sum| ~ sqrt(N)).
        verified = abs(float(res) - float(ref)) <= 1e-3 * math.sqrt(src.numel())
    elif method == "peer":
        verified = bool(torch.equal(dst, src.to(dst.device)))
    else:
        verified = bool(torch.equal(dst, src))

    out = result_record(args, torch.cuda.get_device_name(0), gpus, 1, n, timed)
    out.update(
        warmup_seconds=warmup,
        verified=verified,
        ceiling_iters=args.ceiling_iters,
        counts="bytes read" if method == "hbm_read" else "bytes copied (each byte once)",
    )
    del src, res
    if method != "hbm_read":
        del dst
    torch.cuda.empty_cache()
    return out


def result_record(args, device_name, gpus, tensors, nbytes, timed) -> dict:
    import torch

    median = statistics.median(timed)
    return {
        "method": args.method,
        "mode": args.mode,
        "model": args.model_name,
        "tensors": tensors,
        "bytes": nbytes,
        "repeats": len(timed),
        "seconds": timed,
        "best_seconds": min(timed),
        "median_seconds": median,
        "gbps": nbytes / median / 1e9,
        "device": device_name,
        "gpus": gpus,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
    }


def human_line(r: dict) -> str:
    head = f"{r['method']} {r['mode']}" + (f" {r['model']}" if r.get("model") else "")
    if "skipped" in r:
        return f"{head}: skipped: {r['skipped']}"
    if "error" in r:
        return f"{head}: FAILED: {r['error'].strip().splitlines()[-1] if r['error'].strip() else ''}"
    return (
        f"{head}: {r['tensors']} tensors, {r['bytes'] / 1e9:.2f} GB, "
        f"median {r['median_seconds'] * 1e3:.2f} ms ({r['gbps']:.1f} GB/s), "
        f"best {r['best_seconds'] * 1e3:.2f} ms ({r['bytes'] / r['best_seconds'] / 1e9:.1f} GB/s), "
        f"warm-up {r['warmup_seconds'] * 1e3:.1f} ms, verified={str(r['verified']).lower()} "
        f"[{r['device']}, torch {r['torch']}]"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="PyTorch weight-update baselines (CUDA IPC as SGLang does it, NCCL broadcast, "
        "bucketed NCCL) and copy ceilings. Writes one JSON result.",
        epilog="GB/s are decimal (1e9 bytes per second). See bench/baselines/README.md.",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--mode", choices=MODES, help="required for ipc/nccl/nccl_bucket; ceilings default to their own")
    p.add_argument("--plan", help="`weightlift plan --save` file: tensor names, dtypes, shapes (required except for ceilings)")
    p.add_argument("--model-name", help="model name for the JSON (default: the plan file's name)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--repeats", type=int, default=3, help="timed updates after 1 warm-up (default 3)")
    p.add_argument("--bucket-bytes", type=int, default=GiB, help="nccl_bucket bucket size (default 1 GiB)")
    p.add_argument("--ceiling-bytes", type=int, default=4 * GiB, help="ceiling buffer size (default 4 GiB)")
    p.add_argument("--ceiling-iters", type=int, default=10, help="operations per ceiling sample (default 10)")
    p.add_argument("--headroom-bytes", type=int, default=4 * GiB, help="free GPU memory to leave (default 4 GiB)")
    p.add_argument("--verify-samples", type=int, default=8, help="tensors compared byte for byte (default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds any wait may last (default 600)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.ceiling_iters < 1:
        p.error("--repeats and --ceiling-iters must be at least 1")
    if args.bucket_bytes < ALIGN:
        p.error(f"--bucket-bytes must be at least {ALIGN}")
    if args.method in PAIR_METHODS:
        if not args.mode:
            p.error(f"--mode is required for {args.method}")
        if not args.plan:
            p.error(f"--plan is required for {args.method}")
    if args.model_name is None and args.plan:
        base = os.path.basename(args.plan)
        args.model_name = base[: -len(".json")] if base.endswith(".json") else base
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    force_safe_env()
    record = None
    code = 0
    try:
        if args.method in CEILINGS:
            implied = CEILING_MODE[args.method]
            if args.mode is None:
                args.mode = implied
            if args.mode != implied:
                raise Skip(f"{args.method} is a {implied} ceiling (mode {args.mode} does not apply)")
            record = run_ceiling(args)
        else:
            record = run_pair(args, load_specs(args.plan))
    except Skip as s:
        record = {"method": args.method, "mode": args.mode, "model": args.model_name, "skipped": str(s)}
    except KeyboardInterrupt:
        record = {"method": args.method, "mode": args.mode, "model": args.model_name, "error": "interrupted"}
        code = 130
    except Exception:  # noqa: BLE001 - one JSON line whatever happens
        record = {"method": args.method, "mode": args.mode, "model": args.model_name, "error": traceback.format_exc()}
        code = 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    print(human_line(record), flush=True)
    if "error" in record and code == 1:
        print(record["error"], file=sys.stderr)
    if record.get("verified") is False:
        code = code or 3
    return code


if __name__ == "__main__":
    sys.exit(main())
