#!/usr/bin/env bash
# Sets up a fresh machine and runs every check: formatting, clippy, and the whole test suite
# (unit tests, parity against transformers/PyTorch, the learner against a real run-api).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets
