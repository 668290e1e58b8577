#!/usr/bin/env bash
# Runs on nvidia-h200-x2 (device tool): benchmark 2, NCCL weight broadcast GPU 0 -> GPU 1 for
# Qwen2.5-1.5B- and 7B-shaped bf16 weights, against torch.distributed.broadcast of one flat
# buffer of the same bytes between the same GPUs; then the dead-peer fault (rank 1 exits after
# joining: rank 0 must get a deadline error and abort the communicator, not hang).
# Build first, here:
#   cargo build --release --features cuda --bin grpo-node && mkdir -p .gpu && cp target/release/grpo-node .gpu/
# Then: run(command="bash scripts/gpu/bench_sync.sh", carry=[".gpu"], kind="nvidia-h200-x2")
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1 || true
# The same bytes as the two shapes in bf16: 1,543,714,304 and 7,615,616,512 parameters.
python3 python/bench/ref_broadcast.py --gib 2.875426 14.185 --iters 5 --out "$OUT/ref_broadcast.json" \
  > "$OUT/ref_broadcast.log" 2>&1; grep '^RESULT' "$OUT/ref_broadcast.log" || tail -5 "$OUT/ref_broadcast.log"
# BUCKETS: --sync-bucket-mb values to measure (default: the learner's default, 512).
for shape in qwen2.5-1.5b qwen2.5-7b; do
  for mb in ${BUCKETS:-512}; do
    rm -f /tmp/nccl_id; tag="${shape}_$mb"
    timeout 300 ./.gpu/grpo-node bench sync --rank 1 --gpu 1 --id-file /tmp/nccl_id --shape "$shape" --sync-bucket-mb "$mb" > "$OUT/sync_r1_$tag.log" 2>&1 &
    timeout 300 ./.gpu/grpo-node bench sync --rank 0 --gpu 0 --id-file /tmp/nccl_id --shape "$shape" --sync-bucket-mb "$mb" > "$OUT/sync_r0_$tag.log" 2>&1
    wait
    grep -h '^RESULT' "$OUT/sync_r0_$tag.log" || tail -5 "$OUT/sync_r0_$tag.log" "$OUT/sync_r1_$tag.log"
  done
done
rm -f /tmp/nccl_id
timeout 120 ./.gpu/grpo-node bench sync --rank 1 --gpu 1 --id-file /tmp/nccl_id --shape qwen2.5-1.5b --fault peer-exits > "$OUT/fault_r1.log" 2>&1 &
timeout 120 ./.gpu/grpo-node bench sync --rank 0 --gpu 0 --id-file /tmp/nccl_id --shape qwen2.5-1.5b --fault peer-exits > "$OUT/fault_r0.log" 2>&1
echo "fault rank0 exit $?"; wait
grep -h '^RESULT' "$OUT/fault_r0.log" || tail -5 "$OUT/fault_r0.log"
