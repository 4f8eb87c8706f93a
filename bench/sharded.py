#!/usr/bin/env python3
"""A sharded trainer's update, two ways, into one engine (a weightlift Receiver in a process of
its own, listening on a Unix socket): N trainer ranks (torch.distributed, gloo on the CPU; NCCL
with --device cuda) hold FSDP2 (`fully_shard`) shards of a synthetic model of Qwen3-30B-A3B's
tensor shapes (its first --layers layers with --experts of its 128 experts each, and with
--embeddings its embedding and lm_head), and every update

  gather   the baseline run today: every rank `full_tensor()`s every parameter (an all-gather
           each), rank 0 keeps the full tensors and pushes them with a plain `Sender`;
  sharded  every rank pushes its own shards with `Sender(rank=, world=)`: no gather.

Each mode runs in fresh rank processes (peak RSS is per process lifetime): one warm-up update
(connecting, planning), then --updates timed ones, each after a cheap in-place change of every
shard (a "step"), timed on rank 0 from a barrier before to a barrier after (all ranks done).
Reports the median seconds, each rank's peak RSS (getrusage) and its RSS before the first
update, and the bytes moved: all-gather bytes received over all ranks, and bytes pushed into
the engine (the engine's bytes; each rank's share for `sharded`). The engine holds the trainer's
names and shapes (identity preset: no fusion, no TP), as bench/baselines do.

    python3 bench/sharded.py [--ranks 4] [--layers 2] [--experts 16] [--updates 3] [--json out.json]

--device cuda (NCCL, rank r on cuda:r % GPUs, the engine still in host memory: receivers on a
GPU do not take sharded trainers yet) has not been run on a GPU machine: treat it as untested.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import weightlift as wl

MODEL = "qwen3-30b-a3b"


def manifest(layers: int, experts: int, embeddings: bool) -> list[tuple[str, list[int]]]:
    """(name, shape) of the synthetic model's tensors kept for this run, all bf16."""
    keep = []
    for name, shape, _ in wl.synthetic_manifest(MODEL):
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            if int(parts[2]) >= layers:
                continue
            if "experts" in parts and int(parts[parts.index("experts") + 1]) >= experts:
                continue
        elif not embeddings and name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        keep.append((name, shape))
    return keep


def rss_bytes() -> int:
    """This process's resident set now (bytes)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- the engine ---


def engine(specs, endpoint_box, stop, workdir):
    torch.set_num_threads(1)
    tensors = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in specs}
    receiver = wl.Receiver(tensors, listen=f"unix:{workdir}/engine.sock", timeout=300.0)
    endpoint_box.put(receiver.endpoint)
    stop.wait()
    endpoint_box.put(dict(version=receiver.version, dirty=len(receiver.dirty), peak_rss=peak_rss_bytes()))


# --- the trainer's ranks ---


class Node(torch.nn.Module):
    pass


def sharded_model(specs, mesh, device):
    """The model as FSDP2 leaves it, each rank allocating only its shards (meta init)."""
    from torch.distributed.fsdp import fully_shard

    root = Node()
    with torch.device("meta"):
        for name, shape in specs:
            *path, leaf = name.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, Node())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(torch.empty(shape, dtype=torch.bfloat16)))
    for layer in root.model.layers.children():
        fully_shard(layer, mesh=mesh)
    fully_shard(root, mesh=mesh)
    root.to_empty(device=device)
    with torch.no_grad():
        for p in root.parameters():
            p.to_local().uniform_(-1, 1)
    return root


def step(model):
    """A cheap in-place change of every shard, so every tensor's bytes are new."""
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            if local.numel():
                local.view(-1)[:64].add_(1)


def rank_main(rank, world, mode, init, specs, endpoint, updates, device, results):
    try:
        torch.set_num_threads(1)
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,))
        here = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        model = sharded_model(specs, mesh, here)
        before = rss_bytes()
        # CUDA tensors to a receiver in host memory: through the shared-memory ring.
        transport = "shm" if device == "cuda" else None
        if mode == "gather":
            sender = wl.Sender(endpoint, transport=transport) if rank == 0 else None
        else:
            sender = wl.Sender(endpoint, transport=transport, rank=rank, world=world)
        version = 1 if mode == "gather" else 1 + (updates + 1)
        gathered, seconds, report = 0, [], None
        for i in range(updates + 1):
            step(model)
            if device == "cuda":
                torch.cuda.synchronize()
            dist.barrier()
            started = time.perf_counter()
            if mode == "gather":
                full = {}
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        t = p.full_tensor()
                        if i == 0:
                            gathered += t.numel() * t.element_size() - p.to_local().numel() * t.element_size()
                        if rank == 0:
                            full[name] = t
                        del t
                if rank == 0:
                    report = sender.push(full, version=version + i)
                del full
            else:
                report = sender.push(model.named_parameters(), version=version + i)
            dist.barrier()
            if i > 0:
                seconds.append(time.perf_counter() - started)
            assert report is None or (report["committed"] and report["verified"]), report
        pushed = 0
        if report is not None:
            pushed = report["shard"]["bytes"] if mode == "sharded" else report["bytes"]
        results.put(dict(rank=rank, seconds=seconds, rss_before=before, peak_rss=peak_rss_bytes(),
                         gathered_bytes=gathered, pushed_bytes=pushed,
                         engine_bytes=report["bytes"] if report is not None else None))
        if sender is not None:
            sender.close()
        dist.destroy_process_group()
    except BaseException as e:
        results.put(dict(rank=rank, error=f"{type(e).__name__}: {e}"))
        raise


def run_mode(ctx, mode, args, specs, endpoint, workdir):
    results = ctx.Queue()
    init = f"file://{workdir}/store-{mode}"
    procs = [
        ctx.Process(target=rank_main, args=(r, args.ranks, mode, init, specs, endpoint, args.updates, args.device,
                                            results))
        for r in range(args.ranks)
    ]
    for p in procs:
        p.start()
    ranks = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r["error"] for r in ranks if "error" in r]
    if errors:
        sys.exit(f"{mode}: {errors}")
    ranks.sort(key=lambda r: r["rank"])
    seconds = ranks[0]["seconds"]
    return dict(
        seconds=seconds,
        median_seconds=statistics.median(seconds),
        peak_rss=[r["peak_rss"] for r in ranks],
        rss_before=[r["rss_before"] for r in ranks],
        gathered_bytes=sum(r["gathered_bytes"] for r in ranks),
        pushed_bytes=sum(r["pushed_bytes"] for r in ranks),
        engine_bytes=ranks[0]["engine_bytes"],
    )


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--embeddings", action="store_true", help="also the embedding and lm_head (1.2 GB)")
    parser.add_argument("--updates", type=int, default=3, help="timed updates per mode (after one warm-up)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    specs = manifest(args.layers, args.experts, args.embeddings)
    model_bytes = sum(2 * int(torch.Size(s).numel()) for _, s in specs)
    ctx = mp.get_context("spawn")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="wl-sharded-") as workdir:
        box, stop = ctx.Queue(), ctx.Event()
        engine_proc = ctx.Process(target=engine, args=(specs, box, stop, workdir))
        engine_proc.start()
        endpoint = box.get(timeout=300)
        try:
            modes = {mode: run_mode(ctx, mode, args, specs, endpoint, workdir) for mode in ("gather", "sharded")}
        finally:
            stop.set()
        engine_after = box.get(timeout=60)
        engine_proc.join(timeout=60)
    assert engine_after["version"] == 2 * (args.updates + 1) and engine_after["dirty"] == 0, engine_after
    gather, sharded = modes["gather"], modes["sharded"]
    result = {
        "benchmark": "sharded",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "backend": "nccl" if args.device == "cuda" else "gloo",
        "torch": torch.__version__,
        "weightlift": wl.__version__,
        "model": f"{MODEL} shapes: {args.layers} layer(s), {args.experts} expert(s)"
                 + (", embeddings" if args.embeddings else ""),
        "tensors": len(specs),
        "model_bytes": model_bytes,
        "ranks": args.ranks,
        "updates": args.updates,
        "modes": modes,
        "speedup": gather["median_seconds"] / sharded["median_seconds"],
        "engine_peak_rss": engine_after["peak_rss"],
        "wall_seconds": time.monotonic() - started,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    gb = lambda b: f"{b / 1e9:.2f}"
    print(f"{result['device']} ({result['cpu']}, {result['cores']} cores), {result['backend']}, {args.ranks} ranks: "
          f"{result['model']}, {len(specs)} tensors, {gb(model_bytes)} GB bf16")
    print(f"{'mode':<8} {'median s':>9} {'min s':>7} {'max s':>7} {'peak RSS GB (rank 0; max other)':>32} "
          f"{'gathered GB':>12} {'pushed GB':>10}")
    for mode, m in modes.items():
        rss = f"{gb(m['peak_rss'][0])}; {gb(max(m['peak_rss'][1:], default=0))}"
        print(f"{mode:<8} {m['median_seconds']:>9.3f} {min(m['seconds']):>7.3f} {max(m['seconds']):>7.3f} "
              f"{rss:>32} {gb(m['gathered_bytes']):>12} {gb(m['pushed_bytes']):>10}")
    print(f"sharded is {result['speedup']:.2f}x the gather's speed; RSS before the first update: "
          f"gather {gb(gather['rss_before'][0])} GB, sharded {gb(sharded['rss_before'][0])} GB (rank 0)")


if __name__ == "__main__":
    main()
