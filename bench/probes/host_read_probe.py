"""Probe: how fast can a checkpoint file's bytes reach page-locked memory on this machine?

Not run by any command; kept beside the results it produced
(bench/results/*/probe-*.txt). Measures, on one file written here:
- cold (evicted with posix_fadvise DONTNEED after fsync): O_DIRECT reads in several patterns,
  buffered reads with readahead;
- warm (in the page cache): pread into a pinned buffer with N threads, memcpy from a fresh
  mmap with N threads, cuMemHostRegister of a fresh mmap per chunk with N threads;
- the loopback TCP socket from a cache-sized buffer and from memory the size of the model.

Usage: python3 host_read_probe.py [--gib 8] [--dir /tmp]
"""

import argparse
import ctypes
import mmap
import os
import socket
import threading
import time

import numpy as np
import torch

MiB = 1 << 20
GiB = 1 << 30


def write_file(path, size):
    chunk = np.random.default_rng(0).integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def warm(path):
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(64 * MiB)
    mv = memoryview(buf)
    off = 0
    while True:
        n = os.preadv(fd, [mv], off)
        if n <= 0:
            break
        off += n
    os.close(fd)


def aligned(size):
    return mmap.mmap(-1, size)


def run_threads(n, target):
    ts = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return time.perf_counter() - t0


def direct_streams(path, size, threads, read_bytes):
    """Each thread reads its own contiguous 1/threads of the file, read_bytes at a time."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    share = size // threads

    def work(i):
        buf = aligned(read_bytes)
        mv = memoryview(buf)
        off, end = i * share, (i + 1) * share
        while off < end:
            off += os.preadv(fd, [mv[: min(read_bytes, end - off)]], off)

    dt = run_threads(threads, work)
    os.close(fd)
    return dt


def direct_buckets(path, size, threads, read_bytes, bucket):
    """Like weightlift today: each 64 MiB bucket split over the threads in read_bytes reads,
    then a barrier before the next bucket."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [aligned(read_bytes) for _ in range(threads)]
    t0 = time.perf_counter()
    for start in range(0, size, bucket):
        reads = list(range(start, min(start + bucket, size), read_bytes))

        def work(i):
            mv = memoryview(bufs[i])
            for off in reads[i::threads]:
                os.preadv(fd, [mv], off)

        run_threads(min(threads, len(reads)), work)
    os.close(fd)
    return time.perf_counter() - t0


def direct_queue(path, size, threads, read_bytes):
    """A shared cursor: threads take the next read_bytes of the file (sequential order, depth =
    threads)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    lock = threading.Lock()
    cursor = [0]

    def work(i):
        buf = aligned(read_bytes)
        mv = memoryview(buf)
        while True:
            with lock:
                off = cursor[0]
                cursor[0] += read_bytes
            if off >= size:
                return
            os.preadv(fd, [mv], off)

    dt = run_threads(threads, work)
    os.close(fd)
    return dt


def buffered_queue(path, size, threads, read_bytes, into):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    lock = threading.Lock()
    cursor = [0]

    def work(i):
        mv = memoryview(into[i * read_bytes : (i + 1) * read_bytes])
        while True:
            with lock:
                off = cursor[0]
                cursor[0] += read_bytes
            if off >= size:
                return
            os.preadv(fd, [mv], off)

    dt = run_threads(threads, work)
    os.close(fd)
    return dt


def mmap_copy(path, size, threads, chunk, into):
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    src = np.frombuffer(m, dtype=np.uint8)
    lock = threading.Lock()
    cursor = [0]

    def work(i):
        dst = into[i * chunk : (i + 1) * chunk]
        while True:
            with lock:
                off = cursor[0]
                cursor[0] += chunk
            if off >= size:
                return
            np.copyto(dst, src[off : off + chunk])

    dt = run_threads(threads, work)
    del src
    m.close()
    os.close(fd)
    return dt


def register_chunks(path, size, threads, chunk, cuda, ctx):
    fd = os.open(path, os.O_RDONLY)
    m = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    arr = np.frombuffer(m, dtype=np.uint8)
    base = arr.ctypes.data
    lock = threading.Lock()
    cursor = [0]
    failures = []

    def work(i):
        cuda.cuCtxSetCurrent(ctx)
        while True:
            with lock:
                off = cursor[0]
                cursor[0] += chunk
            if off >= size:
                return
            r = cuda.cuMemHostRegister_v2(ctypes.c_void_p(base + off), ctypes.c_size_t(chunk), 0x08)
            if r != 0:
                failures.append(r)
                continue
            cuda.cuMemHostUnregister(ctypes.c_void_p(base + off))

    dt = run_threads(threads, work)
    del arr
    m.close()
    os.close(fd)
    return dt, failures


def tcp(size, buffer_bytes, write_bytes=64 * MiB):
    src = np.random.default_rng(1).integers(0, 256, buffer_bytes, dtype=np.uint8)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    got = [0]

    def reader():
        conn, _ = server.accept()
        buf = bytearray(64 * MiB)
        mv = memoryview(buf)
        while got[0] < size:
            n = conn.recv_into(mv)
            if n == 0:
                break
            got[0] += n
        conn.close()

    t = threading.Thread(target=reader)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    mv = memoryview(src)
    t0 = time.perf_counter()
    sent = 0
    while sent < size:
        off = sent % buffer_bytes
        c.sendall(mv[off : off + write_bytes])
        sent += write_bytes
    t.join()
    dt = time.perf_counter() - t0
    c.close()
    server.close()
    return dt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=int, default=8)
    p.add_argument("--dir", default="/tmp")
    a = p.parse_args()
    size = a.gib * GiB
    path = os.path.join(a.dir, "wl-probe.bin")
    t0 = time.perf_counter()
    write_file(path, size)
    print(f"wrote {a.gib} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []

    def row(name, dt, nbytes=size):
        rows.append((name, nbytes / dt / 1e9))
        print(f"{name:60s} {nbytes / dt / 1e9:7.2f} GB/s", flush=True)

    cold = size // 2  # half the file per cold pattern keeps the probe short
    for name, f in [
        ("cold O_DIRECT 1 stream x 64 MiB", lambda: direct_streams(path, cold, 1, 64 * MiB)),
        ("cold O_DIRECT 1 stream x 8 MiB", lambda: direct_streams(path, cold, 1, 8 * MiB)),
        ("cold O_DIRECT 64 MiB buckets, 8 thr x 8 MiB, barrier", lambda: direct_buckets(path, cold, 8, 8 * MiB, 64 * MiB)),
        ("cold O_DIRECT 64 MiB buckets, 16 thr x 4 MiB, barrier", lambda: direct_buckets(path, cold, 16, 4 * MiB, 64 * MiB)),
        ("cold O_DIRECT queue, 4 thr x 16 MiB", lambda: direct_queue(path, cold, 4, 16 * MiB)),
        ("cold O_DIRECT queue, 8 thr x 8 MiB", lambda: direct_queue(path, cold, 8, 8 * MiB)),
        ("cold O_DIRECT queue, 4 thr x 64 MiB", lambda: direct_queue(path, cold, 4, 64 * MiB)),
        ("cold O_DIRECT 4 streams x 16 MiB", lambda: direct_streams(path, cold, 4, 16 * MiB)),
    ]:
        evict(path)
        row(name, f(), cold)

    gpu = torch.cuda.is_available()
    if gpu:
        torch.zeros(1, device="cuda")
    pinned = torch.empty(16 * 8 * MiB, dtype=torch.uint8, pin_memory=gpu).numpy()
    evict(path)
    row("cold buffered queue, 4 thr x 8 MiB (readahead)", buffered_queue(path, cold, 4, 8 * MiB, pinned), cold)

    warm(path)
    for n in (1, 4, 8, 16):
        row(f"warm pread into pinned, {n} thr x 8 MiB", buffered_queue(path, size, n, 8 * MiB, pinned))
    for n in (4, 8, 16):
        row(f"warm memcpy from a fresh mmap, {n} thr x 8 MiB", mmap_copy(path, size, n, 8 * MiB, pinned))
    cuda = ctypes.CDLL("libcuda.so.1") if gpu else None
    ctx = ctypes.c_void_p()
    if gpu:
        cuda.cuCtxGetCurrent(ctypes.byref(ctx))
    for n, chunk in ((1, 64 * MiB), (4, 64 * MiB), (8, 64 * MiB), (8, 16 * MiB)) if gpu else ():
        dt, fails = register_chunks(path, size, n, chunk, cuda, ctx)
        row(f"warm cuMemHostRegister fresh mmap, {n} thr x {chunk // MiB} MiB{' FAILED' if fails else ''}", dt)

    row("tcp loopback, 64 MiB buffer resent", tcp(4 * GiB, 64 * MiB), 4 * GiB)
    row("tcp loopback, from 4 GiB of distinct memory", tcp(4 * GiB, 4 * GiB), 4 * GiB)
    os.unlink(path)
    print()
    print(f"{'pattern':60s} {'GB/s':>7s}")
    for name, gbps in rows:
        print(f"{name:60s} {gbps:7.2f}")


if __name__ == "__main__":
    main()
