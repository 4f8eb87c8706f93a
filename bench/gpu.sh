#!/usr/bin/env bash
# The whole side-by-side GPU benchmark in one run, one table at the end: weightlift's GPU data
# plane (`weightlift bench --device cuda`) next to the PyTorch baselines (bench/baselines/) and
# the copy ceilings, on the same machine, in the same run.
#
# On the GPU machine, from the repository root, with the CLI built beforehand on a machine with
# Rust (`bash scripts/gpu-tests.sh build`, then carry .gpu):
#   bash bench/gpu.sh
# Environment:
#   WEIGHTLIFT_BIN    the CLI (default .gpu/weightlift)
#   MODELS            synthetic models, comma-separated (default qwen3-8b,qwen3-30b-a3b)
#   OUT               results directory (default bench/results/gpu-run)
#   SKIP_BASELINES=1  weightlift only (baseline results already in $OUT/baselines are kept and
#                     tabulated)
#   REPEATS           timed updates per baseline, after one warm-up (default 3)
#   BASELINE_TIMEOUT  seconds any single wait inside a baseline may last (default 300)
#   PYTHON            the Python with torch (default python3)
#   CE_WHEELS         checkpoint-engine's wheels (default bench/baselines/wheels, fetched by
#                     bench/baselines/fetch_checkpoint_engine.sh); when the folder holds wheels,
#                     bench/baselines/checkpoint_engine.py runs too (unless SKIP_BASELINES=1)
# Writes $OUT/plans/<model>.json, $OUT/weightlift.json, $OUT/baselines/<method>-<mode>[-<model>].json,
# $OUT/checkpoint_engine.json (one JSON line per model; not in the table, whose ceilings are
# device copies: its ceiling is the pinned host-to-device copy it measures itself),
# $OUT/logs/*.log, $OUT/table.txt and $OUT/summary.json. The table is printed on stdout, one
# progress line per step on stderr. Exit status 1 if any step failed (a skipped baseline, e.g.
# one that does not fit in GPU memory, is not a failure); the other steps still run.
#
# Order: plans, torch ceilings, weightlift, then the baselines (the slow part: if a run is cut
# short, weightlift's result is already written), then the table. `python3 bench/gpu_table.py
# $OUT` redraws the table from whatever an interrupted run left.
set -euo pipefail

here=$PWD
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
abs() { case $1 in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$here/$1" ;; esac; }

if [ -n "${WEIGHTLIFT_BIN:-}" ]; then
    case $WEIGHTLIFT_BIN in
        */*) WL=$(abs "$WEIGHTLIFT_BIN") ;;
        *) WL=$(command -v "$WEIGHTLIFT_BIN" || echo "$WEIGHTLIFT_BIN") ;;
    esac
else
    WL=$root/.gpu/weightlift
fi
if [ -n "${OUT:-}" ]; then OUT=$(abs "$OUT"); else OUT=$root/bench/results/gpu-run; fi
MODELS=${MODELS:-qwen3-8b,qwen3-30b-a3b}
SKIP_BASELINES=${SKIP_BASELINES:-0}
REPEATS=${REPEATS:-3}
BASELINE_TIMEOUT=${BASELINE_TIMEOUT:-300}
PY=${PYTHON:-python3}
if [ -n "${CE_WHEELS:-}" ]; then CE_WHEELS=$(abs "$CE_WHEELS"); else CE_WHEELS=$root/bench/baselines/wheels; fi

# NVLink multicast must stay off on the shared machines (torch_baselines.py forces it too).
export NCCL_NVLS_ENABLE=0
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export NVSHMEM_DISABLE_NVLS=1

cd "$root"
IFS=, read -ra models <<<"$MODELS"
if [ "${#models[@]}" -eq 0 ]; then
    echo "MODELS is empty" >&2
    exit 2
fi
start=$SECONDS
failures=()

note() { printf '[%4ds] %s\n' $((SECONDS - start)) "$*" >&2; }

if [ ! -x "$WL" ]; then
    note "no weightlift CLI at $WL: build it with 'bash scripts/gpu-tests.sh build' and carry .gpu (or set WEIGHTLIFT_BIN)"
    exit 2
fi

mkdir -p "$OUT/plans" "$OUT/logs" "$OUT/baselines"
rm -f "$OUT/weightlift.json" "$OUT/summary.json" "$OUT/table.txt"
if [ "$SKIP_BASELINES" != 1 ]; then
    rm -f "$OUT"/baselines/*.json "$OUT/checkpoint_engine.json"
fi

# record FILE METHOD MODE MODEL KEY REASON: a baseline result that was not run by the script
# ({"method", "mode", "model", "skipped"|"error": reason}, as torch_baselines.py writes them).
record() {
    "$PY" - "$@" <<'PY'
import json, sys
path, method, mode, model, key, reason = sys.argv[1:7]
with open(path, "w") as f:
    json.dump({"method": method, "mode": mode, "model": model or None, key: reason}, f, indent=2)
    f.write("\n")
PY
}

# brief FILE: one short line about a baseline result.
brief() {
    "$PY" - "$1" <<'PY' 2>/dev/null || echo "no result"
import json, sys
r = json.load(open(sys.argv[1]))
if r.get("skipped"):
    print(f"skipped: {r['skipped']}")
elif r.get("error"):
    lines = str(r["error"]).strip().splitlines()
    print(f"FAILED: {lines[-1] if lines else 'error'}")
else:
    ok = "verified" if r.get("verified") else "NOT VERIFIED"
    print(f"median {r['median_seconds'] * 1e3:.2f} ms, {r['gbps']:.1f} GB/s, {ok}")
PY
}

# baseline METHOD MODE [MODEL]: one torch_baselines.py run; a failure is recorded, not fatal.
baseline() {
    local method=$1 mode=$2 model=${3:-}
    local name=$method-$mode${model:+-$model}
    local json=$OUT/baselines/$name.json log=$OUT/logs/$name.log t0=$SECONDS rc=0
    local args=(--method "$method" --mode "$mode" --repeats "$REPEATS" --timeout "$BASELINE_TIMEOUT" --json "$json")
    if [ -n "$model" ]; then
        args+=(--plan "$OUT/plans/$model.json" --model-name "$model")
    fi
    rm -f "$json"
    "$PY" bench/baselines/torch_baselines.py "${args[@]}" >"$log" 2>&1 || rc=$?
    if [ ! -s "$json" ]; then
        record "$json" "$method" "$mode" "$model" error "exit status $rc without a result; see logs/$name.log" || true
        [ "$rc" -ne 0 ] || rc=1
    fi
    if [ "$rc" -ne 0 ]; then
        failures+=("$name (exit $rc)")
    fi
    note "$name: $(brief "$json") ($((SECONDS - t0)) s)"
}

# skip_baseline METHOD MODE MODEL REASON
skip_baseline() {
    local name=$1-$2${3:+-$3}
    record "$OUT/baselines/$name.json" "$1" "$2" "$3" skipped "$4"
    note "$name: skipped: $4"
}

note "$("$WL" --version 2>/dev/null || echo 'weightlift ?') ($WL); models $MODELS; results in $OUT"
nvidia-smi --query-gpu=index,name,memory.total,memory.used --format=csv >"$OUT/logs/nvidia-smi.csv" 2>&1 || true

# 1. Plans: the models' tensor lists for the baselines.
declare -A planned=()
for model in "${models[@]}"; do
    t0=$SECONDS
    if "$WL" plan --synthetic "$model" --save "$OUT/plans/$model.json" >"$OUT/logs/plan-$model.log" 2>&1; then
        planned[$model]=1
        note "plan $model: $(grep -m1 -E '^ *source' "$OUT/logs/plan-$model.log" | tr -s ' ' | sed 's/^ //') ($((SECONDS - t0)) s)"
    else
        failures+=("plan $model")
        note "plan $model: FAILED: $(tail -n 1 "$OUT/logs/plan-$model.log")"
    fi
done

# 2. GPUs, and the torch ceilings.
gpus=0
if [ "$SKIP_BASELINES" != 1 ]; then
    t0=$SECONDS
    gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>"$OUT/logs/gpus.log") || gpus=""
    if ! [[ $gpus =~ ^[0-9]+$ ]]; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        gpus=${gpus:-0}
    fi
    note "gpus: $gpus ($((SECONDS - t0)) s)"
    baseline d2d colocated
    if [ "$gpus" -ge 2 ]; then
        baseline peer cross
    else
        skip_baseline peer cross "" "peer copy needs 2 GPUs, found $gpus"
    fi
    baseline hbm_read colocated
fi

# 3. weightlift: same-process update and CUDA IPC between processes, with its own ceilings.
t0=$SECONDS
rc=0
"$WL" bench --device cuda --gpu-models "$MODELS" --json >"$OUT/weightlift.json" 2>"$OUT/logs/weightlift.log" || rc=$?
if [ "$rc" -eq 0 ]; then
    note "weightlift bench --device cuda: done ($((SECONDS - t0)) s)"
else
    failures+=("weightlift bench (exit $rc)")
    note "weightlift bench --device cuda: FAILED (exit $rc): $(tail -n 1 "$OUT/logs/weightlift.log") ($((SECONDS - t0)) s)"
fi

# 4. Baselines per model.
if [ "$SKIP_BASELINES" != 1 ]; then
    for model in "${models[@]}"; do
        if [ -z "${planned[$model]:-}" ]; then
            for mm in ipc-colocated ipc-cross nccl-cross nccl_bucket-cross; do
                record "$OUT/baselines/$mm-$model.json" "${mm%-*}" "${mm##*-}" "$model" error \
                    "no plan: weightlift plan failed (see logs/plan-$model.log)"
            done
            note "baselines $model: not run (no plan)"
            continue
        fi
        baseline ipc colocated "$model"
        for method in ipc nccl nccl_bucket; do
            if [ "$gpus" -ge 2 ]; then
                baseline "$method" cross "$model"
            else
                skip_baseline "$method" cross "$model" "cross mode needs 2 GPUs, found $gpus"
            fi
        done
    done
    # checkpoint-engine's own update, host buckets -> this GPU (bench/baselines/README.md).
    if compgen -G "$CE_WHEELS/*.whl" >/dev/null; then
        t0=$SECONDS
        rc=0
        "$PY" bench/baselines/checkpoint_engine.py --wheels "$CE_WHEELS" --timeout "$BASELINE_TIMEOUT" \
            --json "$OUT/checkpoint_engine.json" >"$OUT/logs/checkpoint_engine.log" 2>&1 || rc=$?
        if [ "$rc" -ne 0 ]; then
            failures+=("checkpoint_engine (exit $rc)")
        fi
        summary=$("$PY" - "$OUT/checkpoint_engine.json" <<'PY' 2>/dev/null || echo "no result; see logs/checkpoint_engine.log"
import json, sys
out = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("skipped"):
        out.append(f"{r['model']}: skipped: {r['skipped']}")
    elif r.get("error"):
        lines = str(r["error"]).strip().splitlines()
        out.append(f"{r.get('model')}: FAILED: {lines[-1] if lines else 'error'}")
    else:
        ok = "verified" if r.get("verified") else "NOT VERIFIED"
        out.append(f"{r['model']}: median {r['median_seconds']:.3f} s, {r['gbps']:.1f} GB/s, "
                   f"{r['ratio']:.2f} of pinned H2D {r['pinned_h2d_gbps']:.1f} GB/s, {ok}")
print("; ".join(out) or "no result")
PY
)
        note "checkpoint_engine: $summary ($((SECONDS - t0)) s)"
    else
        note "checkpoint_engine: not run (no wheels in $CE_WHEELS: bench/baselines/fetch_checkpoint_engine.sh fetches them)"
    fi
else
    note "baselines: skipped (SKIP_BASELINES=1)"
fi

# 5. The table (stdout) and summary.json.
t0=$SECONDS
rc=0
"$PY" bench/gpu_table.py "$OUT" --models "$MODELS" | tee "$OUT/table.txt" || rc=$?
if [ "$rc" -eq 3 ]; then
    failures+=("table: a result is NOT VERIFIED")
elif [ "$rc" -ne 0 ]; then
    failures+=("table (exit $rc)")
fi
note "table: $OUT/table.txt, $OUT/summary.json ($((SECONDS - t0)) s)"

if [ "${#failures[@]}" -gt 0 ]; then
    note "FAILED: ${failures[*]}"
    exit 1
fi
note "all steps done"
