#!/bin/bash
# Sharded trainer ranks against one sender of the same bytes, colocated on one GPU over CUDA
# IPC (the sharded-trainers issue's target: at most 1.15x). Engines: `weightlift serve
# --device cuda:0` at TP 1 and TP 2 (two processes, one per rank). Trainers: one `push
# --device cuda:0 --gpu-fill`, then WORLD `push --rank r --world WORLD` processes at once,
# each holding its FSDP (dim-0) shard of every tensor on the GPU; 4 versions each, the first
# (mapping, planning) left out. Times are each version's wall time as rank 0 sees it
# (`seconds`: begin to the last receiver's report), median of the last 3. Models: qwen3-8b,
# and qwen3-30b-a3b when the GPU holds two copies of it (trainer and engine: 122 GB).
# SPREAD=1 spreads them over the machine's GPUs: trainer rank r and engine TP rank r on GPU
# r mod the GPU count (the one sender on GPU 0), the runs of the multi-GPU issues.
# On a GPU machine, after `bash scripts/gpu-tests.sh build` (carry .gpu):
#   bash bench/sharded_gpu.sh [OUT.json]
cd "$(dirname "$0")/.."
WL=${WEIGHTLIFT_BIN:-.gpu/weightlift}
WORLD=${WORLD:-4}
OUT=${1:-/tmp/sharded_gpu.json}
export NCCL_NVLS_ENABLE=0
gpus=$(nvidia-smi -L | wc -l)
gpu_of() { if [ "${SPREAD:-0}" = 1 ]; then echo $(($1 % gpus)); else echo 0; fi; }
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ -z "${MODELS:-}" ]; then
  MODELS=qwen3-8b
  [ "${mem:-0}" -ge 130000 ] && MODELS="qwen3-8b qwen3-30b-a3b"
fi
rows=/tmp/sharded_gpu_rows.jsonl
: > $rows
for M in $MODELS; do
  for TP in 1 2; do
    to=()
    for r in $(seq 0 $((TP - 1))); do
      rm -f /tmp/wl-eng-$r.sock
      $WL serve --synthetic $M --device cuda:$(gpu_of $r) --tp-size $TP --tp-rank $r --listen unix:/tmp/wl-eng-$r.sock \
        --timeout-s 120 > /tmp/wl-eng-$r.log 2>&1 &
      to+=(--to unix:/tmp/wl-eng-$r.sock)
    done
    for r in $(seq 0 $((TP - 1))); do
      for i in $(seq 120); do [ -S /tmp/wl-eng-$r.sock ] && break; sleep 1; done
    done
    $WL push --synthetic $M --device cuda:0 --gpu-fill --transport cuda-ipc "${to[@]}" --version 1 --steps 4 \
      --json > /tmp/wl-one.json 2> /tmp/wl-one.err || tail -3 /tmp/wl-one.err
    pids=()
    for r in $(seq 0 $((WORLD - 1))); do
      $WL push --synthetic $M --device cuda:$(gpu_of $r) --gpu-fill --transport cuda-ipc "${to[@]}" --version 11 --steps 4 \
        --rank $r --world $WORLD --json > /tmp/wl-rank-$r.json 2> /tmp/wl-rank-$r.err &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p || true; done
    tail -3 /tmp/wl-rank-0.err
    python3 - $M $TP $WORLD "${SPREAD:-0}" >> $rows <<'PY'
import json, statistics, sys
model, tp, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def steps(path):
    try:
        return json.load(open(path)).get("steps", [])
    except Exception as e:
        return []
def median_s(st):
    timed = [s["seconds"] for s in st[1:] if s.get("committed")]
    return statistics.median(timed) if timed else None
one, ranks = steps("/tmp/wl-one.json"), [steps(f"/tmp/wl-rank-{r}.json") for r in range(world)]
pull = lambda st: statistics.median(sum(r.get("unpack_seconds", 0) for r in s["ranks"]) for s in st[1:]) if len(st) > 1 else None
row = {"model": model, "tp": tp, "world": world, "spread": sys.argv[4] == "1",
       "one_sender_s": median_s(one), "sharded_s": median_s(ranks[0]),
       "one_sender_pull_s": pull(one), "sharded_rank0_pull_s": pull(ranks[0]),
       "bytes": one[0]["bytes"] if one else None,
       "committed": all(s.get("committed") for st in ranks for s in st) and len(ranks[0]) == 4,
       "verified": all(s.get("verified") for st in ranks for s in st),
       "opens_after_first": [sum(r.get("ipc_opens", 0) for r in s["ranks"]) for st in ranks for s in st[1:]]}
if row["one_sender_s"] and row["sharded_s"]:
    row["ratio"] = row["sharded_s"] / row["one_sender_s"]
print(json.dumps(row))
PY
    kill $(jobs -p) 2>/dev/null; wait 2>/dev/null
  done
done
python3 - $rows $OUT <<'PY'
import json, sys, datetime, subprocess
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump({"device": name, "date": datetime.date.today().isoformat(), "rows": rows}, open(sys.argv[2], "w"), indent=1)
print(f"\n{name}: {rows[0]['world'] if rows else ''} FSDP ranks against one sender, colocated over CUDA IPC")
print(f"{'model':<16}{'TP':>3}{'one sender s':>14}{'sharded s':>11}{'ratio':>7}{'verified':>10}  opens after first")
for r in rows:
    f = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    print(f"{r['model']:<16}{r['tp']:>3}{f(r['one_sender_s']):>14}{f(r['sharded_s']):>11}{f(r.get('ratio')):>7}{str(r['verified']):>10}  {set(r['opens_after_first'])}")
PY
