#!/usr/bin/env python3
"""One table for a `bench/gpu.sh` run: weightlift's GPU path next to the PyTorch baselines.

    python3 bench/gpu_table.py OUT [--models qwen3-8b,qwen3-30b-a3b]

Reads OUT/weightlift.json (`weightlift bench --device cuda --json`) and OUT/baselines/*.json
(bench/baselines/torch_baselines.py results, one per file; a file holding {"results": [...]} is
read too), prints the tables on stdout and writes OUT/summary.json. Python 3 standard library
only. Whatever is missing (a file, a field) is shown as "missing", never an exception.

Main table, models x modes (colocated: trainer and engine on the same GPU; cross: GPU0 -> GPU1):
one row per baseline and weightlift's rows: with the sender's and the receiver's digests, with
the receiver's only, and (colocated) with the trainer's tensors in VMM memory instead of
cudaMalloc memory (torch's expandable segments; one VMM allocation). seconds = the median of the method's timed updates;
GB/s = bytes / seconds; x ceiling = GB/s over the mode's ceiling (colocated: D2D copy, cross: peer
copy; weightlift.json's ceilings, measured in the weightlift run, else the torch ones); weightlift
speed-up (baseline rows) = baseline seconds / weightlift seconds.

Exit status: 0; 3 if any result says it was not verified; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import sys

MODES = ("colocated", "cross")
CEILING_METHODS = ("d2d", "peer", "hbm_read")
CEILING_MODE = {"d2d": "colocated", "hbm_read": "colocated", "peer": "cross"}
# The baselines expected in each mode, in table order (others found in the files are added).
EXPECTED = {"colocated": ["ipc"], "cross": ["ipc", "nccl", "nccl_bucket"]}
BASELINE_ORDER = ["ipc", "nccl", "nccl_bucket"]
WL_METHOD = "weightlift cuda-ipc"
# The same update with only the receiver's digests (no second read of the model by the sender).
WL_METHOD_RECEIVER = "weightlift cuda-ipc, receiver digests (not verified)"
# Colocated, receiver digests, with the trainer's tensors in VMM memory instead of cudaMalloc
# memory: torch's expandable segments (20 MiB pieces), and one allocation of weightlift's.
WL_MEMORY_VARIANTS = {
    "colocated": [
        ("colocated-pieces", "weightlift cuda-ipc, torch expandable segments, receiver digests"),
        ("colocated-vmm", "weightlift cuda-ipc, one VMM allocation, receiver digests"),
    ]
}
CEILING_NAME = {"colocated": "D2D copy", "cross": "peer copy"}
WL_CEILING_KEY = {"colocated": "d2d_copy_gbps", "cross": "peer_copy_gbps"}
TORCH_CEILING = {"colocated": "d2d", "cross": "peer"}
MISSING = "missing"


def num(x):
    """x as a float if it is a number (not a bool), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


def ms(seconds):
    s = num(seconds)
    return None if s is None else s * 1e3


def mib(nbytes) -> str:
    return MISSING if nbytes is None else f"{nbytes / (1 << 20):.1f} MiB"


def load(path: str, problems: list):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        problems.append(f"{path}: missing")
    except (OSError, ValueError) as e:
        problems.append(f"{path}: unreadable ({e.__class__.__name__}: {e})")
    return None


def one_line(text) -> str:
    lines = [l.strip() for l in str(text).strip().splitlines() if l.strip()]
    return lines[-1] if lines else "error"


def method_label(method: str, rec: dict | None) -> str:
    if method == "ipc":
        return "torch ipc"
    if method == "nccl":
        return "torch nccl per-tensor"
    if method == "nccl_bucket":
        b = num((rec or {}).get("bucket_bytes"))
        if b is None:
            return "torch nccl 1 GiB buckets"
        gib = b / (1 << 30)
        size = f"{gib:g} GiB" if gib >= 1 else f"{b / (1 << 20):g} MiB"
        return f"torch nccl {size} buckets"
    return f"torch {method}"


def status_of(rec) -> tuple[str, str]:
    """(status, reason) of one result: ok, skipped, failed or missing."""
    if rec is None:
        return "missing", MISSING
    if not isinstance(rec, dict):
        return "failed", "unreadable result"
    if rec.get("skipped"):
        return "skipped", f"skipped: {one_line(rec['skipped'])}"
    if rec.get("error"):
        return "failed", f"FAILED: {one_line(rec['error'])}"
    if num(rec.get("median_seconds")) is None:
        return "missing", "missing: no median_seconds"
    return "ok", ""


def fmt(x, spec: str, suffix: str = "") -> str:
    x = num(x)
    return MISSING if x is None else f"{x:{spec}}{suffix}"


def read_baselines(out: str, problems: list) -> dict:
    """(method, mode, model or None) -> record, the last file winning."""
    found = {}
    paths = sorted(glob.glob(os.path.join(out, "baselines", "*.json")))
    if not paths:
        problems.append(f"{os.path.join(out, 'baselines')}: no baseline results")
    for path in paths:
        data = load(path, problems)
        if data is None:
            continue
        recs = data.get("results") if isinstance(data, dict) and isinstance(data.get("results"), list) else [data]
        for rec in recs:
            if not isinstance(rec, dict) or not rec.get("method"):
                problems.append(f"{path}: not a baseline result")
                continue
            rec = dict(rec, _file=os.path.relpath(path, out))
            found[(rec["method"], rec.get("mode"), rec.get("model"))] = rec
    return found


def wl_skip_reason(skipped: list, model: str, mode: str | None) -> str | None:
    """weightlift.json's skip line for this model (and mode), if any."""
    for s in skipped:
        s = str(s)
        if mode and s.startswith(f"{model} {mode}:"):
            return s
    for s in skipped:
        s = str(s)
        if s.startswith(f"{model}:"):
            return s
    return None


def strip_prefix(line: str, model: str, mode: str | None) -> str:
    """A weightlift skip line without its "model[ mode]:" head (the row already says it)."""
    for head in ([f"{model} {mode}:"] if mode else []) + [f"{model}:"]:
        if line.startswith(head):
            return line[len(head) :].strip()
    return line


def speedup_cell(r: dict) -> str:
    if r["kind"] != "torch":
        return "-"
    if r["speedup"] is None:
        return "n/a (no weightlift)"
    return f"{r['speedup']:.2f}x"


def render(headers: list, rows: list, free_from: int) -> list[str]:
    """Aligned text rows. A row given as (cells, text) prints its first `free_from` cells
    aligned and then `text` unaligned (skip / failure reasons: they do not widen columns)."""
    widths = [len(h) for h in headers]
    for r in rows:
        cells = r[0] if isinstance(r, tuple) else r
        for i, c in enumerate(cells[: free_from if isinstance(r, tuple) else len(cells)]):
            widths[i] = max(widths[i], len(c))
    right = [False] * free_from + [True] * (len(headers) - free_from)

    def line(cells):
        return "  ".join(c.rjust(w) if rj else c.ljust(w) for c, w, rj in zip(cells, widths, right)).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    for r in rows:
        if isinstance(r, tuple):
            cells, text = r
            prefix = "  ".join(c.ljust(w) for c, w in zip(cells[:free_from], widths))
            out.append((prefix + "  " + text).rstrip())
        else:
            out.append(line(r))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tabulate a bench/gpu.sh run (weightlift vs torch baselines).")
    p.add_argument("out", help="the run's directory: weightlift.json, baselines/*.json")
    p.add_argument("--models", help="models in table order, comma-separated (default: those found)")
    p.add_argument("--no-summary", action="store_true", help="do not write OUT/summary.json")
    args = p.parse_args(argv)
    out = args.out
    problems: list[str] = []

    wl = load(os.path.join(out, "weightlift.json"), problems)
    if wl is not None and not isinstance(wl, dict):
        problems.append("weightlift.json: not a JSON object")
        wl = None
    wl = wl or {}
    wl_failure = None  # why there is no weightlift.json: the last line gpu.sh logged for it
    if not wl:
        try:
            with open(os.path.join(out, "logs", "weightlift.log")) as f:
                tail = [l.strip() for l in f.read().splitlines() if l.strip()]
            wl_failure = tail[-1] if tail else None
        except OSError:
            pass
    no_wl = f"weightlift bench failed: {wl_failure}" if wl_failure else "no readable weightlift.json"
    baselines = read_baselines(out, problems)

    # Ceilings: weightlift's own (new format: "ceilings"; older output: top-level keys) and torch's.
    wl_ceil = wl.get("ceilings") if isinstance(wl.get("ceilings"), dict) else {}
    wl_ceil = {k: num(wl_ceil.get(k, wl.get(k))) for k in ("d2d_copy_gbps", "hbm_read_gbps", "peer_copy_gbps")}
    torch_ceil = {}
    for m in CEILING_METHODS:
        # a measured one; else the result in the ceiling's own mode (e.g. peer skipped for want
        # of a second GPU); else anything (a "mode does not apply" skip)
        recs = [r for (meth, _, _), r in baselines.items() if meth == m]
        recs.sort(key=lambda r: (status_of(r)[0] != "ok", r.get("mode") != CEILING_MODE[m]))
        torch_ceil[m] = recs[0] if recs else None
    used = {}
    for mode in MODES:
        g = wl_ceil[WL_CEILING_KEY[mode]]
        if g is not None:
            used[mode] = {"name": CEILING_NAME[mode], "gbps": g, "source": "weightlift"}
        else:
            rec = torch_ceil[TORCH_CEILING[mode]]
            g = num(rec.get("gbps")) if rec and status_of(rec)[0] == "ok" else None
            used[mode] = {"name": CEILING_NAME[mode], "gbps": g, "source": "torch" if g is not None else None}

    same_process = wl.get("same_process", wl.get("rows"))  # older output: "rows"
    same_process = [r for r in same_process if isinstance(r, dict)] if isinstance(same_process, list) else None
    ipc = wl.get("ipc")
    ipc = [r for r in ipc if isinstance(r, dict)] if isinstance(ipc, list) else None
    wl_skipped = [str(s) for s in wl.get("skipped", [])] if isinstance(wl.get("skipped"), list) else []
    # Speed-ups are taken against the fully verified update (the sender digests its own memory).
    ipc_by = {(r.get("model"), r.get("mode")): r for r in ipc or [] if r.get("sender_digests", True)}
    ipc_receiver = {(r.get("model"), r.get("mode")): r for r in ipc or [] if r.get("sender_digests") is False}

    # Models: as asked, then any others found.
    models = [m for m in (args.models or "").split(",") if m]
    for r in (same_process or []) + (ipc or []):
        if r.get("model") and r["model"] not in models:
            models.append(r["model"])
    for (meth, _, model) in baselines:
        if model and meth not in CEILING_METHODS and model not in models:
            models.append(model)

    # Main rows.
    rows = []
    for model in models:
        for mode in MODES:
            ceiling = used[mode]["gbps"]
            w = ipc_by.get((model, mode))
            wst, wreason = status_of(w)
            if w is None:
                skip = wl_skip_reason(wl_skipped, model, mode)
                if skip:
                    wst, wreason = "skipped", "skipped: " + strip_prefix(skip, model, mode)
                elif not wl:
                    wreason = f"missing ({no_wl})"
                elif ipc is None:
                    wreason = "missing (weightlift.json has no \"ipc\" rows)"
            wsec = num(w.get("median_seconds")) if wst == "ok" else None
            methods = list(EXPECTED[mode])
            methods += sorted(
                {meth for (meth, md, mdl) in baselines if md == mode and mdl == model and meth not in methods and meth not in CEILING_METHODS},
                key=lambda m: (BASELINE_ORDER.index(m) if m in BASELINE_ORDER else 99, m),
            )
            for meth in methods:
                rec = baselines.get((meth, mode, model))
                st, reason = status_of(rec)
                if rec is None:
                    reason = "missing (no baselines/%s-%s-%s.json)" % (meth, mode, model)
                rows.append(make_row(model, mode, method_label(meth, rec), "torch", meth, rec, st, reason, ceiling, wsec))
            rows.append(make_row(model, mode, WL_METHOD, "weightlift", "cuda-ipc", w, wst, wreason, ceiling, None))
            count = len(methods) + 1
            wr = ipc_receiver.get((model, mode))
            if wr is not None:
                wrst, wrreason = status_of(wr)
                rows.append(make_row(model, mode, WL_METHOD_RECEIVER, "weightlift", "cuda-ipc", wr, wrst, wrreason, ceiling, None))
                count += 1
            # The same colocated update from the other kinds of trainer memory (same ceiling).
            for variant, label in WL_MEMORY_VARIANTS.get(mode, []):
                wv = ipc_receiver.get((model, variant))
                if wv is not None:
                    wvst, wvreason = status_of(wv)
                    rows.append(make_row(model, mode, label, "weightlift", "cuda-ipc", wv, wvst, wvreason, ceiling, None))
                    count += 1
            # bytes moved should be the same for every method of a model
            sizes = {r["bytes"] for r in rows[-count:] if r["bytes"] is not None}
            if len(sizes) > 1:
                problems.append(f"{model} {mode}: methods moved different byte counts: {sorted(sizes)}")

    # Header.
    device = wl.get("device")
    gpus = wl.get("gpus")
    date = wl.get("date")
    torch_version = None
    for rec in baselines.values():
        if status_of(rec)[0] == "ok":
            device = device or rec.get("device")
            gpus = gpus if gpus is not None else rec.get("gpus")
            date = date or rec.get("date")
            torch_version = torch_version or rec.get("torch")
    lines = []
    lines.append(
        f"GPU benchmark: {device or MISSING}"
        + (f" x {gpus}" if gpus is not None else "")
        + f", {date or MISSING}"
        + (f", torch {torch_version}" if torch_version else "")
    )
    lines.append(
        "ceilings, weightlift: "
        + ", ".join(
            f"{name} {fmt(wl_ceil[k], '.1f', ' GB/s')}"
            for name, k in (("D2D copy", "d2d_copy_gbps"), ("peer copy", "peer_copy_gbps"), ("HBM read", "hbm_read_gbps"))
        )
        + ("" if wl else f" ({no_wl})")
    )

    def torch_c(m):
        rec = torch_ceil[m]
        st, reason = status_of(rec)
        if st != "ok":
            return reason
        return fmt(rec.get("gbps"), ".1f", " GB/s") + ("" if rec.get("verified", True) else " NOT VERIFIED")

    lines.append(
        "ceilings, torch:      "
        + ", ".join(f"{name} {torch_c(m)}" for name, m in (("D2D copy", "d2d"), ("peer copy", "peer"), ("HBM read", "hbm_read")))
    )
    lines.append(
        "x ceiling: "
        + "; ".join(
            f"{mode} against {used[mode]['name']}"
            + (f" {used[mode]['gbps']:.1f} GB/s ({used[mode]['source']})" if used[mode]["gbps"] is not None else " (missing)")
            for mode in MODES
        )
        + ". seconds: median per update; speed-up: baseline seconds / weightlift seconds"
    )
    lines.append("")

    headers = ["model", "mode", "method", "seconds", "GB/s", "x ceiling", "weightlift speed-up", "verified"]
    table = []
    for r in rows:
        head = [r["model"], r["mode"], r["method"]]
        if r["status"] != "ok":
            table.append((head + [""] * 5, r["reason"]))
            continue
        table.append(
            head
            + [
                fmt(r["seconds"], ".4f"),
                fmt(r["gbps"], ".1f"),
                fmt(r["ratio_to_ceiling"], ".2f"),
                speedup_cell(r),
                verified_cell(r),
            ]
        )
    lines += render(headers, table, 3)

    # Same-process table.
    lines.append("")
    lines.append("weightlift in one process (copy + digest on one GPU, no IPC):")
    if same_process is None:
        lines.append("  missing" + ("" if wl else f" ({no_wl})"))
    else:
        sp_headers = ["model", "tensors", "copies", "GB", "copy ms", "digest ms", "update ms", "update GB/s", "x D2D", "digest x HBM read", "verified"]
        sp = []
        for r in same_process:
            b = num(r.get("bytes"))
            sp.append(
                [
                    str(r.get("model", MISSING)),
                    str(r.get("tensors", MISSING)),
                    str(r.get("copies", MISSING)),
                    MISSING if b is None else f"{b / 1e9:.2f}",
                    fmt(r.get("copy_ms"), ".2f"),
                    fmt(r.get("digest_ms"), ".2f"),
                    fmt(r.get("update_ms"), ".2f"),
                    fmt(r.get("update_gbps"), ".1f"),
                    fmt(r.get("update_ratio_to_d2d"), ".2f"),
                    fmt(r.get("digest_ratio_to_read"), ".2f"),
                    {True: "yes", False: "NO"}.get(r.get("verified_against_cpu"), MISSING),
                ]
            )
        have = {r.get("model") for r in same_process}
        for model in models:
            if model not in have:
                skip = wl_skip_reason(wl_skipped, model, "same process")
                sp.append(([model] + [""] * 10, "skipped: " + strip_prefix(skip, model, "same process") if skip else MISSING))
        lines += ["  " + l for l in render(sp_headers, sp, 1)]

    # Each fused kernel on the same plans (outputs from before 2026-11-29 have none).
    kernel_rows = [k for r in same_process or [] for k in r.get("fused_kernels") or []] + [
        k for k in wl.get("peer_kernels") or [] if isinstance(k, dict)
    ] if wl else []
    if kernel_rows:
        lines.append("")
        lines.append("weightlift fused copy+digest kernels on the same plans (x ceiling: D2D copy for this GPU, peer copy for a peer GPU):")
        k_headers = ["model", "sources", "kernel", "picked", "update ms", "x ceiling", "digest ms", "digest x HBM read", "agrees"]
        kr = [
            [
                str(k.get("model", MISSING)),
                str(k.get("sources", MISSING)),
                str(k.get("kernel", MISSING)),
                "yes" if k.get("default") else "",
                fmt(k.get("update_ms"), ".2f"),
                fmt(k.get("update_ratio_to_ceiling"), ".2f"),
                "-" if k.get("digest_ms") is None else fmt(k.get("digest_ms"), ".2f"),
                "-" if k.get("digest_ratio_to_read") is None else fmt(k.get("digest_ratio_to_read"), ".2f"),
                {True: "yes", False: "NO"}.get(k.get("agrees_with_default"), MISSING),
            ]
            for k in kernel_rows
        ]
        lines += ["  " + l for l in render(k_headers, kr, 1)]

    # IPC details.
    lines.append("")
    lines.append("weightlift cuda-ipc updates:")
    if ipc is None:
        lines.append("  missing" + ("" if wl else f" ({no_wl})"))
    elif not ipc:
        lines.append("  none")
    for r in ipc or []:
        extra = num(r.get("device_extra_bytes"))
        sender_extra = num(r.get("sender_device_extra_bytes"))
        lines.append(
            f"  {r.get('model', MISSING)} {r.get('mode', MISSING)}"
            f" ({'sender and receiver' if r.get('sender_digests', True) else 'receiver'} digests): first update {fmt(r.get('first_update_seconds'), '.3f', ' s')}, "
            f"IPC opens {r.get('ipc_opens_first', MISSING)} on the first update / {r.get('ipc_opens_later', MISSING)} on later ones, "
            f"extra device memory {mib(extra)}"
            + (f" (engine) / {mib(sender_extra)} (trainer)" if sender_extra is not None else "")
            + ", "
            f"receiver pull median {fmt(ms(r.get('receiver_pull_median_seconds')), '.2f', ' ms')}, "
            f"best {fmt(r.get('best_seconds'), '.4f', ' s')} of {r.get('updates', MISSING)} updates"
        )
    for s in wl_skipped:
        lines.append(f"  weightlift skipped: {s}")
    if problems:
        lines.append("")
        lines += [f"note: {p}" for p in problems]

    print("\n".join(lines))

    unverified = [
        f"{r['model']} {r['mode']} {r['method']}"
        for r in rows
        if r["status"] == "ok" and r["verified"] is False and not receiver_only(r)
    ]
    unverified += [f"same-process {r.get('model')}" for r in same_process or [] if r.get("verified_against_cpu") is False]
    unverified += [f"kernel {k.get('kernel')} ({k.get('sources')}) {k.get('model')}" for k in kernel_rows if k.get("agrees_with_default") is False]
    unverified += [f"torch ceiling {m}" for m, rec in torch_ceil.items() if rec and status_of(rec)[0] == "ok" and rec.get("verified") is False]
    if unverified:
        print(f"\nNOT VERIFIED: {', '.join(unverified)}")

    if not args.no_summary:
        summary = {
            "benchmark": "gpu-side-by-side",
            "device": device,
            "gpus": gpus,
            "date": date or datetime.date.today().isoformat(),
            "torch": torch_version,
            "ceilings": {
                "weightlift": wl_ceil,
                "torch": {
                    m: (num(rec.get("gbps")) if rec and status_of(rec)[0] == "ok" else None) for m, rec in torch_ceil.items()
                },
                "used": used,
            },
            "rows": rows,
            "same_process": same_process,
            "ipc": ipc,
            "weightlift_skipped": wl_skipped,
            "unverified": unverified,
            "problems": problems,
        }
        path = os.path.join(out, "summary.json")
        try:
            with open(path, "w") as f:
                json.dump(summary, f, indent=2)
                f.write("\n")
        except OSError as e:
            print(f"cannot write {path}: {e}", file=sys.stderr)
    return 3 if unverified else 0


def receiver_only(r) -> bool:
    """Committed on the receiver's digests alone: by design not verified, not a failure."""
    return r.get("verified") is False and r.get("committed") is True


def verified_cell(r) -> str:
    if receiver_only(r):
        return "no (receiver digests only)"
    return {True: "yes", False: "NO"}.get(r["verified"], MISSING)


def make_row(model, mode, label, kind, method, rec, status, reason, ceiling, wl_seconds) -> dict:
    rec = rec if isinstance(rec, dict) else {}
    sec = num(rec.get("median_seconds")) if status == "ok" else None
    nbytes = num(rec.get("bytes"))
    gbps = num(rec.get("gbps")) if status == "ok" else None
    if gbps is None and sec and nbytes is not None:
        gbps = nbytes / sec / 1e9
    return {
        "model": model,
        "mode": mode,
        "method": label,
        "kind": kind,
        "key": method,
        "status": status,
        "reason": reason or None,
        "seconds": sec,
        "best_seconds": num(rec.get("best_seconds")) if status == "ok" else None,
        "gbps": gbps,
        "ratio_to_ceiling": gbps / ceiling if gbps is not None and ceiling else None,
        "speedup": sec / wl_seconds if kind == "torch" and sec is not None and wl_seconds else None,
        "verified": rec.get("verified") if isinstance(rec.get("verified"), bool) else None,
        "committed": rec.get("committed") if isinstance(rec.get("committed"), bool) else None,
        "bytes": int(nbytes) if nbytes is not None else None,
        "tensors": rec.get("tensors"),
        "file": rec.get("_file"),
    }


if __name__ == "__main__":
    sys.exit(main())
