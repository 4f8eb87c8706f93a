#!/usr/bin/env python3
"""Where a pause without backup spends its time, and whether threads shorten it.

Issue 6 asks for a 32 GiB pause without backup in under 5 ms; weightlift's pool takes 15-25 ms,
and its driver timings put that in cuMemRelease (0.5-0.7 ms per GiB). This script maps 32 GiB
of VMM memory in handles of one size, then gives it back, timing each driver call kind, with
the handles split over 1, 2, 4 or 8 threads (ctypes lets go of the GIL in foreign calls), and
for several handle sizes. It answers: is the release cost per byte or per handle, and does the
driver run releases from several threads at once?

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

prop = Prop(type=1, requestedHandleTypes=0, location=Location(type=1, id=dev.value))
access = AccessDesc(location=Location(type=1, id=dev.value), flags=3)


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


def cycle(total, handle_bytes, threads, base):
    """Maps `total` bytes at `base` in handles, then unmaps and releases them: ms per step."""
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
    rows = []
    for handle_mib in (256, 2048):
        for threads in (1, 2, 4, 8):
            cycle(total, handle_mib << 20, threads, base.value)  # warm-up
            runs = [cycle(total, handle_mib << 20, threads, base.value) for _ in range(3)]
            med = {k: sorted(r[0][k] for r in runs)[1] for k in runs[0][0]}
            rows.append({"handle_mib": handle_mib, "threads": threads, "ms": med,
                         "pause_ms": med["unmap"] + med["release"],
                         "released_gib": min(r[1] for r in runs) / (1 << 30)})
    check(cuda.cuMemAddressFree(base.value, total), "cuMemAddressFree")
    out = {"benchmark": "vmm_release", "device": name.value.decode(), "gib": args.gib,
           "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    print(f"{out['device']}: {args.gib} GiB mapped then given back (median of 3, ms)")
    print(f"{'handle':>8} {'threads':>7} {'create':>8} {'map':>7} {'access':>7} {'unmap':>7} {'release':>8} "
          f"{'pause':>7} {'freed GiB':>9}")
    for r in rows:
        m = r["ms"]
        print(f"{r['handle_mib']:>6}Mi {r['threads']:>7} {m['create']:>8.2f} {m['map']:>7.2f} {m['set_access']:>7.2f} "
              f"{m['unmap']:>7.2f} {m['release']:>8.2f} {r['pause_ms']:>7.2f} {r['released_gib']:>9.2f}")


if __name__ == "__main__":
    main()
