#!/usr/bin/env bash
# Every test weightlift has, as CI runs them: formatting, lints, then the Rust test suites
# (unit, property and CLI tests). GPU tests, once they exist, skip here with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."

rustup component add rustfmt clippy >/dev/null 2>&1 || true
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
