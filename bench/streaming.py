#!/usr/bin/env python3
"""The streaming receiver into an engine's own `load_weights`, colocated on one GPU: a trainer
holding the model's tensors (torch, on the GPU) pushes in-process over CUDA IPC to a
`StagingReceiver`, whose iterator the engine loads from. Against the device copy ceiling
measured in the same run (one large `copy_`, bytes moved per second).

Rows per model:
- `stream, no-op loader`: the engine only takes each tensor (weightlift's own rate), verified
  (the trainer digests its memory) and with the receiver's digests only;
- `stream, copy loader`: the engine copies each tensor into its own (`copy_`, one launch per
  tensor); the same copies timed alone, without weightlift, are reported apart, and the row's
  time less them (`copy loader less copies`: weightlift's part of the update);
- Python-visible overhead of the iterator: the no-op loop's time outside weightlift's waits,
  and the calls into weightlift per update;
- device memory weightlift holds (the ring) against the model;
- where each row's time went (the receiver's `stream_timing`, medians over the timed
  updates): on the connection's thread, waiting for a buffer to be given back, launching a
  bucket's pull, waiting for the GPU, comparing and handing over, waiting for the sender's
  `End`, for the engine to give the last bucket back, and the rest (`other`); on the engine's,
  waiting for each bucket (the first apart: it also waits out the update's setup). In ms per
  update and in us per bucket.

For Qwen3-30B-A3B the engine's "own tensors" are one per distinct (shape, dtype): every byte
is copied as a real load copies it, without a second 61 GB model on the GPU.

    python3 bench/streaming.py [--models qwen3-8b,qwen3-30b-a3b] [--steps 3] [--depth 2] [--json out.json]
"""

import argparse
import datetime
import json
import statistics
import threading
import time

import torch

import weightlift as wl

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def copy_ceiling(device) -> float:
    """Bytes per second of one 4 GiB device-to-device copy, best of five."""
    n = 4 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    del src, dst
    return n / best


def one_update(staging, sender, trainer, version, load) -> dict:
    """Pushes `version` from a thread while this one loads it; wall seconds from the push's
    start to its commit, and the iterator's counts."""
    box = {}

    def push():
        box["report"] = sender.push(trainer, version=version)

    thread = threading.Thread(target=push)
    torch.cuda.synchronize()
    started = time.perf_counter()
    thread.start()
    got, weights = staging.next_update(timeout=120)
    assert got == version
    loop = time.perf_counter()
    load(weights)
    loop = time.perf_counter() - loop
    thread.join()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    report = box["report"]
    assert report["committed"], report
    return {"seconds": seconds, "loop_s": loop, **weights.stats, "verified": report["verified"],
            "device_extra_bytes": report.get("device_extra_bytes", 0),
            "stream_timing": report["ranks"][0].get("stream_timing")}


# The connection thread's steps in the receiver's `stream_timing` (seconds summed per update),
# with the short names the table prints.
THREAD_STEPS = [("buffer_wait_seconds", "buffer"), ("launch_seconds", "launch"), ("gpu_wait_seconds", "gpu"),
                ("write_seconds", "write"), ("hand_over_seconds", "hand"), ("end_wait_seconds", "end"),
                ("last_given_back_seconds", "last")]


def breakdown(timings: list) -> dict:
    """Medians over updates of each step's seconds (ms per update and us per bucket): the
    connection thread's steps, the rest of its time (`other`), and the engine's waits (the
    first bucket's apart)."""
    timings = [t for t in timings if t]
    if not timings:
        return {}
    parts = {}
    for key, name in THREAD_STEPS:
        parts[name] = statistics.median(t[key] for t in timings)
    parts["other"] = statistics.median(t["seconds"] - sum(t[k] for k, _ in THREAD_STEPS) for t in timings)
    parts["thread"] = statistics.median(t["seconds"] for t in timings)
    parts["engine"] = statistics.median(t["engine_wait_seconds"] - t["engine_first_wait_seconds"] for t in timings)
    parts["engine_first"] = statistics.median(t["engine_first_wait_seconds"] for t in timings)
    buckets = timings[-1]["buckets"]
    # The engine's steady waits are over every bucket but the first.
    per_bucket = {k: v / max(buckets - (k == "engine"), 1) * 1e6 for k, v in parts.items() if k != "engine_first"}
    return {"buckets": buckets, "engine_buckets": timings[-1]["engine_buckets"],
            "ms": {k: v * 1e3 for k, v in parts.items()}, "us_per_bucket": per_bucket}


def noop(weights):
    for _ in weights:
        pass


def bench_model(model: str, steps: int, ceiling: float, bucket_mib: float, depth: int) -> dict:
    device = torch.device("cuda:0")
    specs = wl.synthetic_manifest(model)
    trainer = {n: torch.empty(s, dtype=DTYPES[d], device=device) for n, s, d in specs}
    for t in trainer.values():
        t.view(torch.uint8).fill_(0x5A)
    model_bytes = sum(t.numel() * t.element_size() for t in trainer.values())
    pool = {}
    for t in trainer.values():
        pool.setdefault((tuple(t.shape), t.dtype), torch.empty_like(t))
    engine = {n: pool[(tuple(t.shape), t.dtype)] for n, t in trainer.items()}

    def copy_loader(weights):
        for name, tensor in weights:
            engine[name].copy_(tensor)

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    staging = wl.StagingReceiver(specs, device="cuda:0", depth=depth, bucket_mib=bucket_mib, timeout=120)
    held = torch.cuda.memory_allocated(device) - before
    out = {"model": model, "tensors": len(specs), "bytes": model_bytes, "ring_bytes": staging.memory_bytes,
           "held_bytes": held, "rows": {}}
    version = 0
    for label, digests, load in [("no-op, verified", True, noop), ("no-op, receiver digests", False, noop),
                                 ("copy loader, verified", True, copy_loader)]:
        sender = wl.Sender(staging.receiver, sender_digests=digests)
        runs = []
        for step in range(steps + 1):  # the first binds the plans: reported, not counted
            version += 1
            for t in trainer.values():
                t.view(torch.uint8).fill_((version * 7) % 251)
            runs.append(one_update(staging, sender, trainer, version, load))
        timed = runs[1:]
        seconds = statistics.median(r["seconds"] for r in timed)
        row = {"first_s": runs[0]["seconds"], "seconds": seconds, "gbps": model_bytes / seconds / 1e9,
               "device_extra_bytes": timed[-1]["device_extra_bytes"],
               "of_ceiling": model_bytes / seconds / ceiling, "runs": timed,
               "stream_timing": breakdown([r["stream_timing"] for r in timed])}
        if load is noop:
            # Outside weightlift's waits and the stream syncs: what the Python loop itself cost.
            row["python_overhead_s"] = statistics.median(r["loop_s"] - r["wait_s"] - r["sync_s"] for r in timed)
            row["calls"] = timed[-1]["calls"]
        out["rows"][label] = row
    # The loader's copies alone, no weightlift: what the engine's own loading costs.
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for name, tensor in trainer.items():
            engine[name].copy_(tensor)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    out["engine_copies_alone_s"] = statistics.median(times)
    del staging, trainer, engine, pool
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="qwen3-8b,qwen3-30b-a3b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--bucket-mib", type=float, default=64)
    parser.add_argument("--depth", type=int, default=2, help="ring buffers (the receiver's default: 2)")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda:0")
    ceiling = copy_ceiling(device)
    results = {"device": torch.cuda.get_device_name(device), "date": datetime.date.today().isoformat(),
               "d2d_copy_gbps": ceiling / 1e9, "bucket_mib": args.bucket_mib, "depth": args.depth, "models": []}
    for model in args.models.split(","):
        results["models"].append(bench_model(model, args.steps, ceiling, args.bucket_mib, args.depth))
    print(f"{results['device']}, {results['date']}: device copy {ceiling / 1e9:.0f} GB/s,"
          f" buckets {args.bucket_mib} MiB, depth {args.depth}")
    print(f"{'model':<15} {'row':<26} {'first s':>8} {'s':>7} {'GB/s':>7} {'of D2D':>7} {'py ms':>7} {'calls':>6}")
    for m in results["models"]:
        for label, r in m["rows"].items():
            py = r.get("python_overhead_s")
            py = f"{py * 1e3:7.1f}" if py is not None else " " * 7
            calls = r.get("calls", "")
            print(f"{m['model']:<15} {label:<26} {r['first_s']:8.3f} {r['seconds']:7.3f} {r['gbps']:7.0f}"
                  f" {r['of_ceiling']:7.2f} {py} {calls:>6}")
        print(f"{m['model']:<15} {'engine copies alone':<26} {'':>8} {m['engine_copies_alone_s']:7.3f}"
              f" {m['bytes'] / m['engine_copies_alone_s'] / 1e9:7.0f}")
        # The copy loader's update less the engine's own copies: weightlift's part of it.
        beyond = m["rows"]["copy loader, verified"]["seconds"] - m["engine_copies_alone_s"]
        m["copy_loader_beyond_engine_copies"] = {"seconds": beyond, "of_ceiling": m["bytes"] / beyond / ceiling}
        print(f"{m['model']:<15} {'copy loader less copies':<26} {'':>8} {beyond:7.3f} {m['bytes'] / beyond / 1e9:7.0f}"
              f" {m['bytes'] / beyond / ceiling:7.2f}")
        extra = max(r["device_extra_bytes"] for r in m["rows"].values())
        print(f"{m['model']:<15} memory: ring {m['ring_bytes'] / 2**20:.0f} MiB (torch saw {m['held_bytes'] / 2**20:.0f}"
              f" MiB), bound plans {extra / 2**20:.0f} MiB, against the model's {m['bytes'] / 2**30:.1f} GiB;"
              f" {m['tensors']} tensors")
    print_breakdown(results["models"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def print_breakdown(models: list) -> None:
    """Each row's `stream_timing`: ms per update, then us per bucket."""
    names = [name for _, name in THREAD_STEPS] + ["other", "thread", "engine"]
    print("where the time went (receiver thread: buffer .. other = thread; engine: its wait per bucket after"
          " the first; medians)")
    print(f"{'model':<15} {'row':<26} {'unit':<6} {'bkts':>5}" + "".join(f" {n:>7}" for n in names)
          + f" {'eng 1st':>7}")
    for m in models:
        for label, r in m["rows"].items():
            b = r.get("stream_timing")
            if not b:
                print(f"{m['model']:<15} {label:<26} (no stream_timing in the report)")
                continue
            ms, us = b["ms"], b["us_per_bucket"]
            print(f"{m['model']:<15} {label:<26} {'ms':<6} {b['buckets']:>5}" + "".join(f" {ms[n]:7.2f}" for n in names)
                  + f" {ms['engine_first']:7.2f}")
            print(f"{'':<15} {'':<26} {'us/bkt':<6} {'':>5}" + "".join(f" {us[n]:7.1f}" for n in names))


if __name__ == "__main__":
    main()
