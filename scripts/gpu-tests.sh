#!/usr/bin/env bash
# GPU tests and the GPU benchmark, in two halves because GPU machines have no Rust toolchain:
#   bash scripts/gpu-tests.sh build   # here: release test binaries, the CLI and the Python
#                                     # wheel into .gpu/
#   bash .gpu/run.sh                  # on the GPU machine (carry .gpu), from the repository
#                                     # root's .gpu: every Rust GPU test, the Python tests (torch,
#                                     # CUDA, the Hugging Face proof), then `weightlift bench
#                                     # --device cuda` (BENCH=0 skips it; GPU_MODELS and
#                                     # GPU_ROWS pick its models and row groups); a summary
#                                     # table last
# On a machine without a GPU the same tests are listed by `cargo test` as ignored, with why.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "build" ]; then
    echo "usage: bash scripts/gpu-tests.sh build   (then run .gpu/run.sh on the GPU machine)" >&2
    exit 2
fi
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release -p weightlift
cp target/release/weightlift .gpu/
cp scripts/torch_cast_reference.py .gpu/
# The Python package as one abi3 wheel (imports on the GPU machine's Python 3.12).
python3 -m pip install -q "maturin>=1.16,<2" >/dev/null 2>&1 || true
python3 -m maturin build --release --strip -q -m bindings/python/Cargo.toml -o .gpu/wheels
# The test binaries that hold GPU tests: the crates' unit tests and the IPC integration tests.
cargo test --release --no-run --message-format=json -p weightlift-cuda -p weightlift --lib --test gpu_ipc 2>/dev/null \
    | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] in (["lib"], ["test"]):
        name = m["target"]["name"]
        shutil.copy(m["executable"], f".gpu/tests/{name}")
        print(f"built .gpu/tests/{name}")
'
cat > .gpu/run.sh <<'RUN'
#!/usr/bin/env bash
# Runs every GPU test (the ignored ones) and the GPU benchmark; summary last.
cd "$(dirname "$0")"
export NCCL_NVLS_ENABLE=0
# NCCL: the libnccl.so.2 of torch's nvidia-nccl wheel, unless one is named already.
export WEIGHTLIFT_NCCL=${WEIGHTLIFT_NCCL:-$(python3 -c 'import os, nvidia.nccl as n; print(os.path.join(n.__path__[0], "lib", "libnccl.so.2"))' 2>/dev/null)}
# Integration tests start the CLI from here, not from the build machine's target/.
export WEIGHTLIFT_BIN="$PWD/weightlift"
# torch's f32 -> bf16 cast, for the cast kernel's test to match bit for bit.
export WEIGHTLIFT_TORCH_CAST_DIR=$(mktemp -d)
python3 torch_cast_reference.py "$WEIGHTLIFT_TORCH_CAST_DIR" || echo "no torch reference: the torch cast test will fail"
status=0
summary=""
# The Python package: the wheel into a private folder (nothing to fetch: --no-deps; torch,
# numpy, pytest and transformers come with the machine).
rm -rf /tmp/weightlift-site
python3 -m pip install -q --no-index --no-deps --target /tmp/weightlift-site wheels/*.whl
if PYTHONPATH=/tmp/weightlift-site python3 -m pytest -q -p no:cacheprovider -rs ../bindings/python/tests > python-tests.log 2>&1; then
    result="ok"
else
    result="FAILED"; status=1
fi
cat python-tests.log
summary="$summary$(printf '%-22s %-7s %s' python "$result" "$(tail -n 1 python-tests.log)")\n"
for t in tests/*; do
    if out=$("$t" --ignored --test-threads=1 2>&1); then result="ok"; else result="FAILED"; status=1; fi
    echo "$out"
    line=$(echo "$out" | grep -E "^test result" | tail -1)
    summary="$summary$(printf '%-22s %-7s %s' "$(basename "$t")" "$result" "$line")\n"
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ "${BENCH:-1}" = 1 ]; then
    ./weightlift bench --device cuda ${GPU_MODELS:+--gpu-models $GPU_MODELS} ${GPU_ROWS:+--gpu-rows $GPU_ROWS} || status=1
fi
echo
echo "GPU tests:"
printf "$summary"
exit $status
RUN
chmod +x .gpu/run.sh
# Debug info would push the folder past what a device call carries (64 MiB).
strip .gpu/weightlift .gpu/tests/*
echo "ready: carry .gpu and run bash .gpu/run.sh on the GPU machine"
