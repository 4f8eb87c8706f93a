"""GPU span of WeightsChecker.checksum per call (CUPTI), per-tensor torch memory vs one flat buffer."""
import json, os, sys, time, torch
import weightlift as wl
from torch.profiler import profile, ProfilerActivity
OUT = os.environ.get("OUT", "/tmp")
def spans(ck, calls=7):
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            torch.cuda.nvtx.range_push("x")
            ck.checksum(); torch.cuda.synchronize()
    path = f"{OUT}/t.json"; prof.export_chrome_trace(path)
    ev = sorted([e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"], key=lambda e: e["ts"])
    # calls are separated by host gaps: split where a kernel starts > 0.3 ms after the previous ended
    groups, cur, end = [], [], None
    for e in ev:
        if end is not None and e["ts"] - end > 300: groups.append(cur); cur = []
        cur.append(e); end = max(end or 0, e["ts"] + e["dur"])
    groups.append(cur)
    out = []
    for g in groups:
        s = g[0]["ts"]; f = max(x["ts"] + x["dur"] for x in g)
        busy = sum(x["dur"] for x in g if x["name"].startswith("copy_digest"))
        out.append((round((f - s) / 1e3, 3), round(busy / 1e3, 3), len(g)))
    return out
for M in sys.argv[1:]:
    man = wl.synthetic_manifest(M)
    total = sum(torch.Size(s).numel() * 2 for _, s, _ in man)
    for layout in ["per-tensor", "flat-256"]:
        if layout == "per-tensor":
            ts = {n: torch.empty(s, dtype=torch.bfloat16, device="cuda:0") for n, s, d in man}
        else:
            sizes = [torch.Size(s).numel() * 2 for _, s, _ in man]
            offs, at = [], 0
            for b in sizes: offs.append(at); at = (at + b + 255) // 256 * 256
            buf = torch.empty(at, dtype=torch.uint8, device="cuda:0")
            ts = {n: buf[o:o + b].view(torch.bfloat16).view(s) for (n, s, _), o, b in zip(man, offs, sizes)}
        for i, t in enumerate(ts.values()): t.view(torch.uint8).fill_(i % 251)
        ck = wl.WeightsChecker(ts)
        for _ in range(3): ck.checksum()
        torch.cuda.synchronize()
        walls = []
        for _ in range(7):
            t0 = time.perf_counter(); ck.checksum(); walls.append(time.perf_counter() - t0)
        sp = spans(ck)
        med = sorted(x[0] for x in sp)[len(sp) // 2]
        print(f"{M} {layout}: {total/1e9:.2f} GB wall median {sorted(walls)[3]*1e3:.2f} ms; GPU span median {med} ms = {total/med/1e6:.0f} GB/s; spans (span, digest-kernel busy, kernels) {sp}", flush=True)
        del ck, ts; buf = None; torch.cuda.empty_cache()
