#!/usr/bin/env python3
"""Tagged memory, side by side in one run: weightlift.memory.Pool against torch_memory_saver
0.0.10 (its default hook_mode "preload", as SGLang runs it), each in its own process, next to
the pinned host copy ceiling measured in the same run. Prints one table; writes JSON with --json.

For each system, ten pause/resume cycles (with --gap-s seconds between pause and resume, the
trainer's step: the driver scrubs released memory in the background, and resuming at once
competes with that; and --settle-s seconds between the pause of the weights and the pause of
the KV cache, so the KV pause is timed on its own and not while the driver still finishes the
weights' release; 0 pauses them back to back) of:
  - "weights": 8 GiB in 400 torch tensors (Qwen3-8B-like, ~20 MiB each), with CPU backup;
  - "kv_cache": 32 GiB in 72 torch tensors (a K and a V buffer per layer of a 36-layer model,
    as SGLang allocates them), without backup.
Every cycle checks the restored bytes (a digest of the weights, on the GPU) and records device
free memory and host RSS, so leaks show. A separate worker ("fresh") measures pinned -> device
copy rates into weightlift pool memory, steady and right after a resume (fresh physical pages).
Handle sizes are measured with the raw driver by bench/vmm_release.py: the pool merges adjacent
chunks on resume, so its chunk size is not its handle size after the first cycle.

    python3 bench/memory.py [--json out.json] [--weights-gib 8] [--kv-gib 32] [--kv-tensors 72] [--cycles 10]
                            [--gap-s 1.0] [--settle-s 1.0]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

GiB = 1 << 30


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def pinned_ceiling(nbytes: int) -> dict:
    """Pinned host <-> device copy rates (bytes/s), best of 3, and the first-touch cost."""
    import torch

    started = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pin_seconds = time.perf_counter() - started
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    out = {"pinned_alloc_seconds": pin_seconds}
    for name, (dst, src) in {"d2h": (host, device), "h2d": (device, host)}.items():
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"{name}_bytes_per_s"] = nbytes / min(times)
    return out


def weights_shapes(total: int, count: int = 400) -> list:
    per = total // count // 2  # bf16 elements
    return [per] * count


def run_cycles(system: str, weights_bytes: int, kv_bytes: int, kv_tensors: int, cycles: int, chunk_bytes: int,
               gap_s: float, settle_s: float) -> dict:
    import torch

    import weightlift as wl

    if system == "weightlift":
        import weightlift.memory

        pool = weightlift.memory.Pool(0, chunk_bytes=chunk_bytes)
        region = lambda tag, backup: pool.region(tag, cpu_backup=backup)  # noqa: E731
        pause, resume = pool.pause, pool.resume
    else:
        from torch_memory_saver import torch_memory_saver as tms

        region = lambda tag, backup: tms.region(tag=tag, enable_cpu_backup=backup)  # noqa: E731
        pause, resume = tms.pause, tms.resume

    with region("weights", True):
        weights = [torch.empty(n, dtype=torch.bfloat16, device="cuda:0") for n in weights_shapes(weights_bytes)]
    with region("kv_cache", False):
        kv = [torch.empty(kv_bytes // kv_tensors, dtype=torch.uint8, device="cuda:0") for _ in range(kv_tensors)]
    for i, w in enumerate(weights):
        w.view(torch.int16).random_(-32768, 32767, generator=None)
    for buffer in kv:
        buffer.fill_(1)
    want = [wl.digest(w) for w in weights[:: max(1, len(weights) // 40)]]
    torch.cuda.synchronize()

    def timed(f, tag):
        torch.cuda.synchronize()
        t = time.perf_counter()
        f(tag)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    rows = {"weights_pause": [], "weights_resume": [], "kv_pause": [], "kv_resume": []}
    driver_before = {c: t for c, _, t in pool._native.driver_times()} if system == "weightlift" else {}
    free_released = []
    memory = []  # (device free, host rss) after each cycle
    for cycle in range(cycles):
        free_before = torch.cuda.mem_get_info(0)[0]
        rows["weights_pause"].append(timed(pause, "weights"))
        time.sleep(settle_s)  # lets the driver finish releasing the weights before the KV pause is timed
        rows["kv_pause"].append(timed(pause, "kv_cache"))
        free_released.append(torch.cuda.mem_get_info(0)[0] - free_before)
        time.sleep(gap_s)  # the trainer's step: released memory is scrubbed by the driver meanwhile
        rows["weights_resume"].append(timed(resume, "weights"))
        rows["kv_resume"].append(timed(resume, "kv_cache"))
        got = [wl.digest(w) for w in weights[:: max(1, len(weights) // 40)]]
        if got != want:
            raise SystemExit(f"{system}: cycle {cycle}: the weights were not restored bit for bit")
        torch.cuda.synchronize()
        memory.append((torch.cuda.mem_get_info(0)[0], rss()))
    driver = {}
    if system == "weightlift":
        driver = {c: (t - driver_before.get(c, 0.0)) / cycles for c, _, t in pool._native.driver_times()}
    return {
        "seconds": rows,
        "driver_s_per_cycle": driver,
        "released_bytes": free_released,
        "device_free_after_cycle": [m[0] for m in memory],
        "host_rss_after_cycle": [m[1] for m in memory],
    }


def fresh(nbytes: int) -> dict:
    """Pinned -> device copy rates into pool memory (fresh_page_copies), and what one
    cuMemGetInfo costs (run_cycles calls it between timed steps)."""
    import torch

    t = time.perf_counter()
    for _ in range(100):
        torch.cuda.mem_get_info(0)
    return {"mem_get_info_seconds": (time.perf_counter() - t) / 100, "h2d": fresh_page_copies(nbytes)}


def fresh_page_copies(nbytes: int) -> dict:
    """Pinned -> device copy rates into pool memory: steady, and right after a resume (fresh
    physical pages), as one copy and as 400 copies."""
    import torch

    import weightlift.memory

    pool = weightlift.memory.Pool(0)
    with pool.region("probe"):
        dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    plain = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    piece = nbytes // 400

    def copy(target, pieces: bool) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        if pieces:
            for i in range(400):
                target[i * piece:(i + 1) * piece].copy_(host[i * piece:(i + 1) * piece], non_blocking=True)
        else:
            target.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        return nbytes / (time.perf_counter() - t)

    rates = {"torch_memory_one": copy(plain, False), "torch_memory_400": copy(plain, True)}
    copy(dst, False)
    rates["pool_steady_one"] = copy(dst, False)
    rates["pool_steady_400"] = copy(dst, True)
    for pieces in (False, True):
        pool.pause("probe")
        pool.resume("probe")
        rates[f"pool_fresh_{'400' if pieces else 'one'}"] = copy(dst, pieces)
    return rates


def worker(args) -> None:
    import torch

    result = {"system": args.worker, "device": torch.cuda.get_device_name(0)}
    if args.worker == "ceiling":
        result.update(pinned_ceiling(args.weights_gib * GiB))
    elif args.worker == "fresh":
        result.update(fresh(min(args.kv_gib * GiB, 8 * GiB)))
    else:
        result.update(run_cycles(args.worker, args.weights_gib * GiB, args.kv_gib * GiB, args.kv_tensors, args.cycles,
                                 args.chunk_mib << 20, args.gap_s, args.settle_s))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--weights-gib", type=int, default=8)
    parser.add_argument("--kv-gib", type=int, default=32)
    parser.add_argument("--kv-tensors", type=int, default=72, help="tensors the KV cache is allocated as")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--gap-s", type=float, default=1.0,
                        help="seconds between pause and resume (the trainer's step); 0 resumes at once")
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="seconds between the weights' pause and the KV cache's pause; 0 pauses back to back")
    parser.add_argument("--chunk-mib", type=int, default=256, help="weightlift's chunk size (a worker's)")
    parser.add_argument("--weightlift-chunks-mib", default="256",
                        help="chunk sizes to run weightlift with, comma-separated (the first is the default)")
    parser.add_argument("--worker", choices=["ceiling", "fresh", "weightlift", "torch_memory_saver"])
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    results = {}
    chunk_sizes = [int(c) for c in args.weightlift_chunks_mib.split(",")]
    runs = [("ceiling", "ceiling", 256), ("fresh", "fresh", 256)]
    runs += [("weightlift" if i == 0 else f"weightlift/{c}MiB", "weightlift", c) for i, c in enumerate(chunk_sizes)]
    runs += [("torch_memory_saver", "torch_memory_saver", 256)]
    systems = [name for name, _, _ in runs if name not in ("ceiling", "fresh")]
    for name, system, chunk_mib in runs:
        cmd = [sys.executable, __file__, "--worker", system, "--weights-gib", str(args.weights_gib),
               "--kv-gib", str(args.kv_gib), "--kv-tensors", str(args.kv_tensors), "--cycles", str(args.cycles), "--chunk-mib", str(chunk_mib),
               "--gap-s", str(args.gap_s), "--settle-s", str(args.settle_s)]
        env = dict(os.environ)
        if system == "torch_memory_saver":
            # Its default mode (what SGLang runs): cudaMalloc intercepted through LD_PRELOAD.
            try:
                from torch_memory_saver import configure_subprocess
            except ImportError as e:
                results[name] = {"error": f"torch_memory_saver is not installed: {e}"}
                continue
            with configure_subprocess():
                env = dict(os.environ)
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if out.returncode != 0:
            print(f"{name} failed:\n{out.stderr[-3000:]}", file=sys.stderr)
            results[name] = {"error": out.stderr[-3000:]}
            continue
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        results[name]["chunk_mib"] = chunk_mib

    ceiling = results.get("ceiling", {})
    d2h, h2d = ceiling.get("d2h_bytes_per_s"), ceiling.get("h2d_bytes_per_s")
    wbytes, kvbytes = args.weights_gib * GiB, args.kv_gib * GiB
    lines = [
        f"pinned copy ceiling: D2H {d2h / 1e9:.1f} GB/s, H2D {h2d / 1e9:.1f} GB/s; "
        f"pinning {args.weights_gib} GiB took {ceiling.get('pinned_alloc_seconds', float('nan')):.2f} s"
        if d2h else "pinned copy ceiling: not measured",
        f"{args.cycles} cycles each; {args.gap_s:g} s between pause and resume, {args.settle_s:g} s between the "
        f"weights' pause and the KV cache's pause",
        f"{'system':<20} {'operation':<28} {'first ms':>9} {'median ms':>10} {'GB/s':>7} {'x ceiling':>9}",
    ]
    summary = {}
    for system in systems:
        r = results.get(system, {})
        if "seconds" not in r:
            lines.append(f"{system:<20} failed")
            continue
        for key, label, nbytes, rate in [
            ("weights_pause", f"pause {args.weights_gib} GiB, backup", wbytes, d2h),
            ("weights_resume", f"resume {args.weights_gib} GiB, backup", wbytes, h2d),
            ("kv_pause", f"pause {args.kv_gib} GiB in {args.kv_tensors} tensors, no backup", None, None),
            ("kv_resume", f"resume {args.kv_gib} GiB in {args.kv_tensors} tensors, no backup", None, None),
        ]:
            s = r["seconds"][key]
            first, med = s[0], statistics.median(s[1:] if len(s) > 1 else s)
            gbps = nbytes / med / 1e9 if nbytes else None
            ratio = nbytes / med / rate if nbytes and rate else None
            first_ratio = nbytes / first / rate if nbytes and rate else None
            summary[f"{system}.{key}"] = {"first_s": first, "median_s": med, "gb_per_s": gbps,
                                          "ratio_to_ceiling": ratio, "first_ratio_to_ceiling": first_ratio}
            lines.append(
                f"{system:<20} {label:<28} {first * 1e3:>9.1f} {med * 1e3:>10.1f} "
                f"{gbps if gbps else float('nan'):>7.1f} {ratio if ratio else float('nan'):>9.2f}"
            )
        if r.get("driver_s_per_cycle"):
            lines.append(f"{system:<20} driver ms per cycle: " + ", ".join(
                f"{c} {t * 1e3:.2f}" for c, t in sorted(r["driver_s_per_cycle"].items()) if t > 1e-5))
        free, host = r["device_free_after_cycle"], r["host_rss_after_cycle"]
        drift = {"device_free_drift_bytes": free[-1] - free[0], "host_rss_drift_bytes": host[-1] - host[0]}
        summary[f"{system}.leak"] = drift
        lines.append(
            f"{system:<20} after cycle 1 -> {len(free)}: device free {drift['device_free_drift_bytes'] / 2**20:+.0f} MiB, "
            f"host RSS {drift['host_rss_drift_bytes'] / 2**20:+.0f} MiB; released per cycle "
            f"{statistics.median(r['released_bytes']) / GiB:.2f} GiB"
        )
    fresh_rates = results.get("fresh", {})
    if "h2d" in fresh_rates:
        lines.append("pinned -> device GB/s: " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in fresh_rates["h2d"].items())
                     + f"; cuMemGetInfo {fresh_rates['mem_get_info_seconds'] * 1e6:.0f} us")
    table = "\n".join(lines)
    print(table)
    if args.json:
        device = next((r.get("device") for r in results.values() if r.get("device")), "unknown")
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": device, "args": vars(args),
                       "summary": summary, "results": results, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
