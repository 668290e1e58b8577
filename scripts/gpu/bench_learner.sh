#!/usr/bin/env bash
# Runs on the GPU machine (device tool): benchmark 1 (learner throughput and memory against the
# Atropos example trainer's recipe in PyTorch, same batches, same GPU) and the device parity
# check (CPU fp32 vs CUDA fp32 / bf16).
# Build first, here:
#   cargo build --release --features cuda --bin grpo-node --example device_parity
#   mkdir -p .gpu && cp target/release/grpo-node target/release/examples/device_parity .gpu/
# Then: run(command="bash scripts/gpu/bench_learner.sh", carry=[".gpu"])
# Env: SHAPES (default "qwen2.5-0.5b qwen2.5-1.5b"), STEPS (default 4, the first is warm-up),
# BATCH_SIZE (rows per micro-batch, default 4).
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
SHAPES=${SHAPES:-"qwen2.5-0.5b qwen2.5-1.5b"}; STEPS=${STEPS:-4}; BATCH_SIZE=${BATCH_SIZE:-4}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

./.gpu/device_parity > "$OUT/device_parity.txt" 2>&1; echo "device_parity exit $?" >> "$OUT/device_parity.txt"

python3 python/bench/make_batches.py --out "$OUT/batches.json" --steps "$STEPS" --seed 1
python3 python/bench/flops.py --peak --device cuda > "$OUT/peak.txt" 2>&1
PEAK=$(python3 -c "import json,sys; l=[x for x in open('$OUT/peak.txt') if x.startswith('RESULT ')]; print(json.loads(l[-1][7:]).get('bf16_peak_tflops', 0))" 2>/dev/null || echo 0)
for shape in $SHAPES; do
  python3 python/bench/ref_learner.py --batches "$OUT/batches.json" --shape "$shape" \
    --batch-size "$BATCH_SIZE" --out "$OUT/ref_$shape.json" > "$OUT/ref_$shape.log" 2>&1
  grep '^RESULT' "$OUT/ref_$shape.log" >> "$OUT/ref.txt" || tail -5 "$OUT/ref_$shape.log"
  for packing in sorted padded; do
    ./.gpu/grpo-node bench learner --batches "$OUT/batches.json" --shape "$shape" --device cuda:0 \
      --batch-size "$BATCH_SIZE" --packing "$packing" > "$OUT/ours_${packing}_$shape.log" 2>&1
    grep '^RESULT' "$OUT/ours_${packing}_$shape.log" >> "$OUT/ours_$packing.txt" || tail -5 "$OUT/ours_${packing}_$shape.log"
  done
done
cat "$OUT/device_parity.txt"
cat "$OUT/peak.txt" | tail -2
python3 python/bench/report.py "$OUT/ref.txt" "$OUT/ours_sorted.txt" "$OUT/ours_padded.txt" --peak-tflops "$PEAK" | tee "$OUT/report.md"
