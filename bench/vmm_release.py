#!/usr/bin/env python3
"""Where a pause without backup spends its time, whether threads shorten it, and whether it is
the driver writing the bytes.

Issue 6 asks for a 32 GiB pause without backup in under 5 ms; weightlift's pool takes 15-25 ms,
and its driver timings put that in cuMemRelease (0.5-0.7 ms per GiB). This script maps 32 GiB
of VMM memory in handles of one size (256 MiB, 2048 MiB, or one handle of it all), then gives it
back, timing each driver call kind, with the handles split over 1, 2, 4 or 8 threads (ctypes
lets go of the GIL in foreign calls). In the same run it times cuMemsetD8 over the whole range
(the rate the GPU writes memory at), and repeats some cycles with the memory written before it
is given back. It answers: is the release cost per byte or per handle, does the driver run
releases from several threads at once, and is cuMemRelease's cost the driver scrubbing the bytes
(release ms per GiB close to memset's, and the same whether the memory was written or not)?

    python3 bench/vmm_release.py [--gib 32] [--json out.json]

Needs only libcuda (no torch). Prints a table last.
"""

import argparse
import ctypes
import json
import threading
import time

cuda = ctypes.CDLL("libcuda.so.1")


class Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class AllocFlags(ctypes.Structure):
    _fields_ = [("compressionType", ctypes.c_ubyte), ("gpuDirectRDMACapable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class Prop(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", Location),
                ("win32HandleMetaData", ctypes.c_void_p), ("allocFlags", AllocFlags)]


class AccessDesc(ctypes.Structure):
    _fields_ = [("location", Location), ("flags", ctypes.c_int)]


def check(rc, call):
    if rc != 0:
        raise RuntimeError(f"{call} failed with CUDA error {rc}")


check(cuda.cuInit(0), "cuInit")
dev = ctypes.c_int()
check(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
ctx = ctypes.c_void_p()
check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
cuda.cuMemAddressReserve.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_size_t,
                                     ctypes.c_uint64, ctypes.c_uint64]
cuda.cuMemCreate.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.POINTER(Prop), ctypes.c_uint64]
cuda.cuMemMap.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64]
cuda.cuMemSetAccess.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.POINTER(AccessDesc), ctypes.c_size_t]
cuda.cuMemUnmap.argtypes = [ctypes.c_uint64, ctypes.c_size_t]
cuda.cuMemRelease.argtypes = [ctypes.c_uint64]
cuda.cuMemAddressFree.argtypes = [ctypes.c_uint64, ctypes.c_size_t]
cuda.cuMemGetInfo_v2.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
cuda.cuMemsetD8_v2.argtypes = [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t]

prop = Prop(type=1, requestedHandleTypes=0, location=Location(type=1, id=dev.value))
access = AccessDesc(location=Location(type=1, id=dev.value), flags=3)
FILL = 0x5A  # what written memory holds: not zero, so not what a scrub would leave


def fill(base, nbytes):
    """cuMemsetD8 over `nbytes` at `base`, waited for (the memset itself is asynchronous)."""
    check(cuda.cuMemsetD8_v2(base, FILL, nbytes), "cuMemsetD8")
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")


def free_bytes():
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    check(cuda.cuMemGetInfo_v2(ctypes.byref(free), ctypes.byref(total)), "cuMemGetInfo")
    return free.value


def in_threads(items, threads, work):
    """Runs work(item) for every item, the items split into `threads` contiguous parts."""
    if threads == 1:
        for item in items:
            work(item)
        return
    parts = [items[i::threads] for i in range(threads)]
    errors = []

    def run(part):
        try:
            check(cuda.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            for item in part:
                work(item)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]


def memset_ceiling(total, base):
    """cuMemsetD8 over `total` bytes mapped at `base` as one handle, best of 3 after a warm-up:
    ms. How fast the GPU writes memory, the yardstick for a release that scrubs it."""
    handle = ctypes.c_uint64()
    check(cuda.cuMemCreate(ctypes.byref(handle), total, ctypes.byref(prop), 0), "cuMemCreate")
    check(cuda.cuMemMap(base, total, 0, handle.value, 0), "cuMemMap")
    check(cuda.cuMemSetAccess(base, total, ctypes.byref(access), 1), "cuMemSetAccess")
    times = []
    for _ in range(4):
        check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
        t = time.perf_counter()
        fill(base, total)
        times.append(time.perf_counter() - t)
    check(cuda.cuMemUnmap(base, total), "cuMemUnmap")
    check(cuda.cuMemRelease(handle.value), "cuMemRelease")
    return min(times[1:]) * 1e3


def cycle(total, handle_bytes, threads, base, written=False):
    """Maps `total` bytes at `base` in handles, then unmaps and releases them: ms per step.
    With `written`, all bytes are written first (not timed), so a release that only scrubs
    pages that were touched would show."""
    n = total // handle_bytes
    handles = [ctypes.c_uint64() for _ in range(n)]
    times = {}
    t = time.perf_counter()
    in_threads(list(range(n)), threads,
               lambda i: check(cuda.cuMemCreate(ctypes.byref(handles[i]), handle_bytes, ctypes.byref(prop), 0),
                               "cuMemCreate"))
    times["create"] = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(n):
        check(cuda.cuMemMap(base + i * handle_bytes, handle_bytes, 0, handles[i].value, 0), "cuMemMap")
    times["map"] = time.perf_counter() - t
    t = time.perf_counter()
    check(cuda.cuMemSetAccess(base, total, ctypes.byref(access), 1), "cuMemSetAccess")
    times["set_access"] = time.perf_counter() - t
    check(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
    if written:
        fill(base, total)
    mapped_free = free_bytes()
    t = time.perf_counter()
    in_threads(list(range(n)), threads,
               lambda i: check(cuda.cuMemUnmap(base + i * handle_bytes, handle_bytes), "cuMemUnmap"))
    times["unmap"] = time.perf_counter() - t
    t = time.perf_counter()
    in_threads(list(range(n)), threads, lambda i: check(cuda.cuMemRelease(handles[i].value), "cuMemRelease"))
    times["release"] = time.perf_counter() - t
    released = free_bytes() - mapped_free
    return {k: v * 1e3 for k, v in times.items()}, released


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=32)
    ap.add_argument("--json")
    args = ap.parse_args()
    total = args.gib << 30
    base = ctypes.c_uint64()
    check(cuda.cuMemAddressReserve(ctypes.byref(base), total, 1 << 30, 0, 0), "cuMemAddressReserve")
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, dev)
    memset_ms = memset_ceiling(total, base.value)
    whole_mib = args.gib << 10
    # (handle MiB, threads, written); sizes that do not divide the range are left out.
    configs = [(mib, threads, False) for mib in (256, 2048) for threads in (1, 2, 4, 8)]
    configs += [(whole_mib, 1, False), (2048, 1, True), (whole_mib, 1, True)]
    configs = [c for c in dict.fromkeys(configs) if whole_mib % c[0] == 0]
    rows = []
    for handle_mib, threads, written in configs:
        cycle(total, handle_mib << 20, threads, base.value, written)  # warm-up
        runs = [cycle(total, handle_mib << 20, threads, base.value, written) for _ in range(3)]
        med = {k: sorted(r[0][k] for r in runs)[1] for k in runs[0][0]}
        rows.append({"handle_mib": handle_mib, "threads": threads, "written": written, "ms": med,
                     "pause_ms": med["unmap"] + med["release"],
                     "release_ms_per_gib": med["release"] / args.gib,
                     "release_over_memset": med["release"] / memset_ms,
                     "released_gib": min(r[1] for r in runs) / (1 << 30)})
    check(cuda.cuMemAddressFree(base.value, total), "cuMemAddressFree")
    memset_gbps = total / (memset_ms / 1e3) / 1e9
    out = {"benchmark": "vmm_release", "device": name.value.decode(), "gib": args.gib,
           "date": time.strftime("%Y-%m-%d"), "memset_ms": memset_ms, "memset_gbps": memset_gbps, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"{out['device']}: {args.gib} GiB mapped then given back (median of 3, ms); "
          f"cuMemsetD8 over {args.gib} GiB {memset_ms:.2f} ms = {memset_gbps:.0f} GB/s "
          f"({memset_ms / args.gib:.3f} ms/GiB, best of 3)")
    print(f"{'handle':>8} {'threads':>7} {'written':>7} {'create':>8} {'map':>7} {'access':>7} {'unmap':>7} "
          f"{'release':>8} {'pause':>7} {'ms/GiB':>7} {'release/memset':>14} {'freed GiB':>9}")
    for r in rows:
        m = r["ms"]
        print(f"{r['handle_mib']:>6}Mi {r['threads']:>7} {'yes' if r['written'] else 'no':>7} {m['create']:>8.2f} "
              f"{m['map']:>7.2f} {m['set_access']:>7.2f} {m['unmap']:>7.2f} {m['release']:>8.2f} {r['pause_ms']:>7.2f} "
              f"{r['release_ms_per_gib']:>7.3f} {r['release_over_memset']:>14.2f} {r['released_gib']:>9.2f}")


if __name__ == "__main__":
    main()
