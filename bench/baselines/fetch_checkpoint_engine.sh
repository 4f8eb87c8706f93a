#!/usr/bin/env bash
# Downloads checkpoint-engine 0.4.2 and the dependencies it imports that a machine with only
# torch and numpy lacks, as wheels for CPython 3.12 on x86-64 Linux, into
# bench/baselines/wheels/ (gitignored). Run it on a machine with PyPI access; carry the folder to
# the GPU machine, where bench/baselines/checkpoint_engine.py --wheels unpacks and imports them
# (no pip, no network there). bench/gpu.sh runs that baseline when the folder is present.
#
# Environment: PIP (default "python3 -m pip"), WHEELS (default bench/baselines/wheels),
# PYTHON_VERSION (3.12), PLATFORMS (manylinux tags, space-separated).
#
# Versions are pinned: what `pip install checkpoint-engine==0.4.2` resolved to on 2026-12-02,
# less torch, numpy and their dependencies (the GPU machine has those). Three are compiled
# (pydantic-core, pyzmq, safetensors: manylinux x86-64 builds), the rest pure Python.
# uvicorn and click are only used by checkpoint-engine's HTTP server (`python -m
# checkpoint_engine`), not by the baseline; they are fetched so the set matches its metadata.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WHEELS=${WHEELS:-$root/bench/baselines/wheels}
PIP=${PIP:-python3 -m pip}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PLATFORMS=${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}

packages=(
    checkpoint-engine==0.4.2
    # imported by checkpoint_engine (api.py, data_types.py, ps.py, worker.py, pin_memory.py)
    fastapi==0.165.0 httpx==0.29.0 pydantic==2.14.4 pyzmq==27.3.0 safetensors==0.8.0 loguru==0.7.3
    # what those import
    pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.2 anyio==4.16.0 idna==3.20
    httpcore==1.0.9 h11==0.16.0 certifi==2026.10.19.post1
    # checkpoint-engine's HTTP server only
    uvicorn==0.55.0 click==8.5.1
)

platform_args=()
for p in $PLATFORMS; do platform_args+=(--platform "$p"); done

mkdir -p "$WHEELS"
# --no-deps: exactly the list above (torch and numpy are the GPU machine's own).
$PIP download --no-deps --only-binary=:all: --dest "$WHEELS" \
    --python-version "$PYTHON_VERSION" --implementation cp --abi "cp${PYTHON_VERSION/./}" --abi abi3 --abi none \
    "${platform_args[@]}" "${packages[@]}"

count=$(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)
size=$(du -sh "$WHEELS" | cut -f1)
echo "$count wheels, $size in $WHEELS"
