#!/usr/bin/env python3
"""Python-side overhead of an update: the same engine (`weightlift serve` on a GPU, over CUDA
IPC) updated by `weightlift push` (Rust) and by `weightlift.Sender.push` from Python with torch
tensors, alternately, in one run. Prints one table; writes JSON with --json.

The Python trainer holds one torch tensor per parameter (as a Hugging Face model does), not one
allocation: pushes cost one call into Rust whatever the number of tensors, and the figure to
compare is the trainer's wall time per push (Rust: the step's seconds; Python: around push()).

    python3 bench/python_push.py --weightlift .gpu/weightlift [--model qwen3-30b-a3b] [--steps 5]
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import weightlift as wl

TORCH_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def rust_push(exe: str, model: str, endpoint: str, first_version: int, steps: int) -> list[float]:
    """Seconds of each step of `weightlift push` (one warm-up step first, not counted)."""
    out = subprocess.run(
        [exe, "push", "--synthetic", model, "--device", "cuda:0", "--to", endpoint,
         "--version", str(first_version), "--steps", str(steps + 1), "--gpu-fill", "--json"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        sys.exit(f"weightlift push failed: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    assert all(s["verified"] for s in result["steps"]), "a Rust push was not verified"
    return [s["seconds"] for s in result["steps"][1:]]


def python_push(model: str, endpoint: str, first_version: int, steps: int) -> tuple[list[float], int, dict]:
    """Wall seconds of each Sender.push() (one warm-up first, not counted), the tensor count and
    the last report. Tensors change (on the GPU) before every push, outside the timing."""
    tensors = {
        name: torch.empty(shape, dtype=TORCH_DTYPES[dtype], device="cuda:0")
        for name, shape, dtype in wl.synthetic_manifest(model)
    }
    sender = wl.Sender(endpoint, preset="qwen3-moe" if "a3b" in model or "moe" in model else "qwen3")
    seconds, report = [], {}
    for step in range(steps + 1):
        for t in tensors.values():
            t.view(torch.uint8).fill_(0x11 + step)
        torch.cuda.synchronize()
        started = time.perf_counter()
        report = sender.push(tensors, version=first_version + step)
        elapsed = time.perf_counter() - started
        assert report["verified"], report
        if step > 0:
            seconds.append(elapsed)
    count = len(tensors)
    sender.close()
    del tensors
    torch.cuda.empty_cache()
    return seconds, count, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weightlift", default=os.environ.get("WEIGHTLIFT_BIN", ".gpu/weightlift"))
    parser.add_argument("--model", default="qwen3-30b-a3b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        listen = f"unix:{tmp}/engine.sock"
        serve = subprocess.Popen(
            [args.weightlift, "serve", "--synthetic", args.model, "--device", "cuda:0", "--listen", listen,
             "--timeout-s", "300"],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            first = serve.stdout.readline().strip()
            if not first.startswith("listening on "):
                sys.exit(f"weightlift serve did not start (it said {first!r})")
            endpoint = first.removeprefix("listening on ")
            n = args.steps + 1
            # Rust, Python, Rust again: drift between the halves shows as a Rust spread.
            rust_a = rust_push(args.weightlift, args.model, endpoint, 1, args.steps)
            py, tensors, report = python_push(args.model, endpoint, 1 + n, args.steps)
            rust_b = rust_push(args.weightlift, args.model, endpoint, 1 + 2 * n, args.steps)
        finally:
            serve.terminate()
            serve.wait(timeout=60)
    rust = rust_a + rust_b
    result = {
        "benchmark": "python-push",
        "device": torch.cuda.get_device_name(0),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "model": args.model,
        "tensors": tensors,
        "bytes": report["bytes"],
        "calls_into_rust_per_push": 1,
        "rust_seconds": rust,
        "python_seconds": py,
        "rust_median_seconds": statistics.median(rust),
        "python_median_seconds": statistics.median(py),
        "python_over_rust": statistics.median(py) / statistics.median(rust),
        "python_stages_last": report.get("stages"),
        "tensors_reused_last": report.get("tensors_reused"),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    print(f"{result['device']}, {args.model}: {tensors} tensors, {report['bytes'] / 1e9:.1f} GB, colocated cuda-ipc")
    print(f"{'driver':<22} {'median s':>9} {'min s':>7} {'max s':>7}")
    for name, xs in (("weightlift push (Rust)", rust), ("Sender.push (Python)", py)):
        print(f"{name:<22} {statistics.median(xs):>9.4f} {min(xs):>7.4f} {max(xs):>7.4f}")
    print(f"python / rust: {result['python_over_rust']:.3f}; python stages (last push): {result['python_stages_last']}")


if __name__ == "__main__":
    main()
