#!/usr/bin/env bash
# Runs on the GPU machine (device tool): CPU fp32 vs CUDA fp32 loss/grad parity of one step, and
# of the second step after one Adafactor update.
# Build first, here:  cargo build --release --features cuda --example device_parity
#                     mkdir -p .gpu && cp target/release/examples/device_parity .gpu/
# Then: run(command="bash scripts/gpu/device_parity.sh", carry=[".gpu"])
set -euo pipefail
source "$(dirname "$0")/env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
./.gpu/device_parity | tee "${OUT:-/tmp}/device_parity.txt"
