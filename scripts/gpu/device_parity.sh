#!/usr/bin/env bash
# Runs on the GPU machine (device tool): CPU fp32 vs CUDA fp32 loss/grad parity of one step.
# Build first, here:  cargo build --release --features cuda --example device_parity
#                     mkdir -p .gpu && cp target/release/examples/device_parity .gpu/
# Then: run(command="bash scripts/gpu/device_parity.sh", carry=[".gpu"])
set -euo pipefail
S=/opt/torch/.venv/lib/python3.12/site-packages
mkdir -p /tmp/nccl && ln -sf "$S/nvidia/nccl/lib/libnccl.so.2" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH="$S/torch/lib:/tmp/nccl"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
./.gpu/device_parity | tee "${OUT:-/tmp}/device_parity.txt"
