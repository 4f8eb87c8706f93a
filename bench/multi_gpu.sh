#!/bin/bash
# The NCCL runs of the multi-GPU issues in one call, table last. With 2 GPUs or more: the
# NCCL transport GPU0 -> GPU1 (`weightlift serve --device cuda:1`, `weightlift push --device
# cuda:0 --gpu-fill --transport nccl`) beside torch.distributed's per-tensor broadcast and its
# 1 GiB-bucket broadcast (bench/baselines/torch_baselines.py, cross) of the same tensors, in
# the same run, and again with NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 (NCCL over its network
# path, as between nodes). With 4 GPUs or more: fan-out, one trainer on GPU0 into 3 replicas
# at TP 1 (GPUs 1-3) and into 2 replicas at TP 2 (GPUs 0-1, 2-3), against one replica.
# Times: weightlift's are each version's wall time as the trainer sees it (begin to the last
# receiver's report), median of versions 2-4 (the first sets up communicators); torch's are the
# baselines' medians after a warm-up. Targets: weightlift >= 0.9 of torch's broadcast (GB/s),
# >= 1.5x faster than the 1 GiB-bucket baseline; fan-out <= 1.2x one replica.
# On a GPU machine, after `bash scripts/gpu-tests.sh build` (carry .gpu):
#   bash bench/multi_gpu.sh [OUT_DIR]       (MODELS="qwen3-8b qwen3-30b-a3b" by default)
cd "$(dirname "$0")/.."
WL=${WEIGHTLIFT_BIN:-$PWD/.gpu/weightlift}
OUT=${1:-/tmp/multi_gpu}
MODELS=${MODELS:-qwen3-8b qwen3-30b-a3b}
export NCCL_NVLS_ENABLE=0
mkdir -p "$OUT/plans" "$OUT/logs"
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$gpus" -lt 2 ]; then
  echo "skipped: the NCCL runs need 2 GPUs, this machine has $gpus"
  exit 0
fi
rows=$OUT/rows.jsonl
: > "$rows"

# Serves `model` on the given GPUs (one process per TP rank); prints --to arguments. Called in
# $(...), so the servers are not this shell's jobs: stop_servers finds them by their sockets.
serve() {
  local model=$1 tag=$2; shift 2
  local devices=("$@") tp=${#@} to=()
  for r in $(seq 0 $((tp - 1))); do
    local sock=/tmp/wl-mg-$tag-$r.sock
    rm -f "$sock"
    "$WL" serve --synthetic "$model" --device "cuda:${devices[$r]}" --tp-size "$tp" --tp-rank "$r" \
      --listen "unix:$sock" --timeout-s 120 > "$OUT/logs/serve-$tag-$r.log" 2>&1 &
    to+=(--to "unix:$sock")
  done
  for r in $(seq 0 $((tp - 1))); do
    for _ in $(seq 120); do [ -S /tmp/wl-mg-$tag-$r.sock ] && break; sleep 1; done
  done
  echo "${to[@]}"
}

# One push of 4 versions over NCCL from cuda:0; a JSON row with its median.
push_row() {
  local model=$1 label=$2; shift 2
  "$WL" push --synthetic "$model" --device cuda:0 --gpu-fill --transport nccl "$@" --steps 4 --json \
    > "$OUT/logs/push-$label.json" 2> "$OUT/logs/push-$label.err" || tail -3 "$OUT/logs/push-$label.err"
  python3 - "$model" "$label" "$OUT/logs/push-$label.json" >> "$rows" <<'PY'
import json, statistics, sys
model, label, path = sys.argv[1:4]
try:
    steps = json.load(open(path)).get("steps", [])
except Exception:
    steps = []
timed = [s["seconds"] for s in steps[1:] if s.get("committed")]
row = {"model": model, "row": label, "runner": "weightlift", "seconds": statistics.median(timed) if timed else None,
       "bytes": steps[0].get("bytes") if steps else None,
       "verified": bool(steps) and all(s.get("verified") for s in steps),
       "nccl_ranks": sorted({r.get("nccl_ranks") for s in steps for r in s.get("ranks", [])} - {None})}
print(json.dumps(row))
PY
}

torch_row() {
  local model=$1 method=$2 label=$3
  python3 bench/baselines/torch_baselines.py --method "$method" --mode cross --plan "$OUT/plans/$model.json" \
    --json "$OUT/logs/torch-$label.json" --quiet > "$OUT/logs/torch-$label.log" 2>&1
  python3 - "$model" "$label" "$OUT/logs/torch-$label.json" >> "$rows" <<'PY'
import json, sys
model, label, path = sys.argv[1:4]
try:
    r = json.load(open(path))
except Exception as e:
    r = {"error": str(e)}
print(json.dumps({"model": model, "row": label, "runner": "torch", "seconds": r.get("median_seconds"),
                  "bytes": r.get("bytes"), "verified": r.get("verified"),
                  "note": r.get("skipped") or (r.get("error") or "")[-200:]}))
PY
}

stop_servers() { pkill -f "unix:/tmp/wl-mg-" 2>/dev/null; sleep 1; }

for M in $MODELS; do
  "$WL" plan --synthetic "$M" --save "$OUT/plans/$M.json" > "$OUT/logs/plan-$M.log" 2>&1
  for net in nvlink socket; do
    if [ $net = socket ]; then export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1; fi
    torch_row "$M" nccl "$M-torch-broadcast-$net"
    torch_row "$M" nccl_bucket "$M-torch-1gib-$net"
    to=$(serve "$M" one-$net 1)
    push_row "$M" "$M-weightlift-$net" $to
    stop_servers
    unset NCCL_P2P_DISABLE NCCL_SHM_DISABLE
  done
  if [ "$gpus" -ge 4 ]; then
    to=$(serve "$M" fan1 1)
    push_row "$M" "$M-fan-out-1x-tp1" $to
    stop_servers
    to="$(serve "$M" fan-a 1) $(serve "$M" fan-b 2) $(serve "$M" fan-c 3)"
    push_row "$M" "$M-fan-out-3x-tp1" $to
    stop_servers
    to=$(serve "$M" fan-tp2 0 1)
    push_row "$M" "$M-fan-out-1x-tp2" $to
    stop_servers
    to="$(serve "$M" fan-tp2a 0 1) $(serve "$M" fan-tp2b 2 3)"
    push_row "$M" "$M-fan-out-2x-tp2" $to
    stop_servers
  fi
done

python3 - "$rows" "$OUT/multi_gpu.json" <<'PY'
import json, sys, datetime, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.split("\n")[0]
by = {r["row"]: r for r in rows}
def secs(label):
    r = by.get(label)
    return r["seconds"] if r and isinstance(r.get("seconds"), (int, float)) else None
for r in rows:
    m = r["model"]
    if r["runner"] == "weightlift" and "-weightlift-" in r["row"]:
        net = r["row"].rsplit("-", 1)[1]
        b, k = secs(f"{m}-torch-broadcast-{net}"), secs(f"{m}-torch-1gib-{net}")
        if r["seconds"] and b:
            r["of_torch_broadcast"] = b / r["seconds"]
        if r["seconds"] and k:
            r["speedup_over_1gib"] = k / r["seconds"]
    for tp in ("tp1", "tp2"):
        one = secs(f"{m}-fan-out-1x-{tp}")
        if r["row"].startswith(f"{m}-fan-out-") and r["row"].endswith(tp) and "-1x-" not in r["row"] and one and r["seconds"]:
            r["of_one_replica"] = r["seconds"] / one
json.dump({"device": name, "date": datetime.date.today().isoformat(), "rows": rows}, open(sys.argv[2], "w"), indent=1)
print(f"\n{name}: NCCL between processes (targets: >= 0.9 of torch broadcast, >= 1.5x the 1 GiB baseline, fan-out <= 1.2x)")
print(f"{'row':<40}{'seconds':>10}{'GB/s':>8}{'verified':>10}  ratio")
for r in rows:
    s = r.get("seconds")
    gbps = r["bytes"] / s / 1e9 if s and r.get("bytes") else None
    ratio = ", ".join(f"{k} {r[k]:.2f}" for k in ("of_torch_broadcast", "speedup_over_1gib", "of_one_replica") if k in r)
    f = lambda v, p: f"{v:.{p}f}" if isinstance(v, float) else "-"
    print(f"{r['row']:<40}{f(s, 4):>10}{f(gbps, 0):>8}{str(r.get('verified')):>10}  {ratio or r.get('note', '')}")
PY
