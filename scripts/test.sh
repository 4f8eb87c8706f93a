#!/usr/bin/env bash
# Every test weightlift has, as CI runs them: formatting, lints, the Rust test suites (unit,
# property, CLI and multi-process tests), then the Python package, installed the way the
# README says (`pip install ./bindings/python`) into a fresh virtual environment, and its
# pytest suite (numpy; torch and GPU tests skip here with the reason).
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked

venv=target/python-tests
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q numpy pytest
"$venv/bin/python" -m pip install -q ./bindings/python
(cd bindings/python/tests && "../../../$venv/bin/python" -m pytest -q -rs -p no:cacheprovider .)
