#!/usr/bin/env bash
# Every test weightlift has, as CI runs them: formatting, lints, the Rust test suites (unit,
# property, CLI and multi-process tests), then the Python package, installed the way the
# README says (`pip install ./bindings/python`) into a fresh virtual environment, and its
# pytest suite (numpy, and torch and transformers on the CPU: the torch tests and the Hugging Face
# logits proof run; GPU tests skip here with the reason); last, schemathesis
# against the HTTP API of a `weightlift serve --http`.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

venv=target/python-tests
rm -rf "$venv"
python3 -m venv "$venv"
# torch (with its CUDA libraries, unused here) and transformers: ~2 minutes on a fresh machine.
"$venv/bin/python" -m pip install -q numpy pytest "torch==2.15.0" "transformers==5.24.0"
"$venv/bin/python" -m pip install -q ./bindings/python
(cd bindings/python/tests && "../../../$venv/bin/python" -m pytest -q -rs -p no:cacheprovider .)

# The engine agent's HTTP API against its own OpenAPI document: no server error, no status,
# content type or body outside the document. A receiver without a memory pool answers the
# memory endpoints 501 by design: those two are checked for conformance only.
"$venv/bin/python" -m pip install -q "schemathesis==4.32.5"
work=$(mktemp -d)
target/debug/weightlift serve --synthetic qwen3-tiny --listen "unix:$work/engine.sock" --http 127.0.0.1:0 \
    > "$work/serve.out" 2> "$work/serve.err" &
serve_pid=$!
trap 'kill "$serve_pid" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do
    url=$(sed -n 's/^http on //p' "$work/serve.out")
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { cat "$work/serve.err"; echo "weightlift serve --http did not start" >&2; exit 1; }
conformance=status_code_conformance,content_type_conformance,response_schema_conformance
memory=(--include-path /release_memory_occupation --include-path /resume_memory_occupation)
"$venv/bin/schemathesis" run "$url/openapi.json" --checks "not_a_server_error,$conformance" \
    --exclude-path /release_memory_occupation --exclude-path /resume_memory_occupation --max-examples 100
"$venv/bin/schemathesis" run "$url/openapi.json" --checks "$conformance" "${memory[@]}" --max-examples 30
