#!/bin/bash
# Legacy IPC against VMM sources, alternating, into one engine: is the legacy pull slower
# whatever the order? One `weightlift serve --device cuda:0`, then `weightlift push --device
# cuda:0` six times (vmm, legacy, vmm, legacy, legacy, vmm; 4 updates each), printing the
# receiver's pull and the trainer's step time of every update. On a GPU machine, after
# `bash scripts/gpu-tests.sh build` (carry .gpu):   bash bench/alternate_sources.sh
# M picks the synthetic model (default qwen3-30b-a3b). Results: bench/results/ipc-overheads-h200-2026-11-30.md.
cd "$(dirname "$0")/.."
WL=.gpu/weightlift
M=${M:-qwen3-30b-a3b}
rm -f /tmp/e.sock
$WL serve --synthetic $M --device cuda:0 --listen unix:/tmp/e.sock > /tmp/serve.log 2>&1 &
for i in $(seq 60); do [ -S /tmp/e.sock ] && break; sleep 1; done
v=1
for mode in vmm legacy vmm legacy legacy vmm; do
  flag=""; [ $mode = vmm ] && flag="--vmm"
  $WL push --synthetic $M --device cuda:0 --to unix:/tmp/e.sock --version $v --steps 4 --gpu-fill $flag --json > /tmp/p.json 2>/tmp/p.err
  python3 - $mode /tmp/p.json <<'PY'
import json, sys
d = json.load(open(sys.argv[2]))
steps = d.get("steps", [])
def rep(s):
    return s["ranks"][0]
pulls = [round(rep(s).get("unpack_seconds", 0) * 1e3, 2) for s in steps]
secs = [round(s.get("seconds", 0) * 1e3, 2) for s in steps]
print(sys.argv[1], "pull ms", pulls, "step ms", secs, "opens", [rep(s).get("ipc_opens") for s in steps])
PY
  v=$((v+10))
done
kill %1
tail -2 /tmp/p.err
