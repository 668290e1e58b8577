#!/usr/bin/env bash
# Runs on the GPU machine (device tool): issue 11's learner benchmark. Learner tokens/s and peak
# memory at the 1.5B and 7B shapes, on the same batches in one run, for
#   - LoRA r=16 on all seven linear modules (ours, AdamW on the adapter),
#   - full fine-tuning with AdamW, 8-bit AdamW and Adafactor (ours),
# against the PyTorch + peft LoRA step (python/bench/ref_learner.py --lora-r 16: the Atropos
# trainer's recipe with PEFT on the bf16 model).
# Build and gather first, here:
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node
#   mkdir -p .gpu && cp target-cuda/release/grpo-node .gpu/
#   pip download --only-binary=:all: --python-version 3.12 --no-deps -d .gpu/wheels-lora \
#     peft==0.21.2 accelerate==1.15.0 psutil==7.1.0
# (the GPU machine's transformers is newer than CI's: peft 0.17 does not import there).
# Then: run(command="bash scripts/gpu/bench_lora.sh", carry=[".gpu"])
# Env: SHAPES (default "qwen2.5-1.5b qwen2.5-7b"), STEPS (default 3, the first is warm-up).
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
SHAPES=${SHAPES:-"qwen2.5-1.5b qwen2.5-7b"}; STEPS=${STEPS:-3}
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels-lora/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=/tmp/pylib
python3 python/bench/make_batches.py --out "$OUT/batches.json" --steps "$STEPS" --seed 1
: > "$OUT/lora.txt"
for shape in $SHAPES; do
  python3 python/bench/ref_learner.py --batches "$OUT/batches.json" --shape "$shape" --batch-size 4 \
    --lora-r 16 --out "$OUT/ref_lora_$shape.json" > "$OUT/ref_lora_$shape.log" 2>&1
  (grep '^RESULT' "$OUT/ref_lora_$shape.log" | sed "s/^RESULT /RESULT peft-lora16 /") >> "$OUT/lora.txt" || tail -5 "$OUT/ref_lora_$shape.log"
  for mode in "lora16 --lora-r 16" "lora16-nodrop --lora-r 16 --lora-dropout 0" "adamw --optimizer adamw" "adamw_8bit --optimizer adamw_8bit" "adafactor --optimizer adafactor"; do
    set -- $mode; name=$1; shift
    ./.gpu/grpo-node bench learner --batches "$OUT/batches.json" --shape "$shape" --device cuda:0 \
      --batch-size 4 "$@" > "$OUT/ours_${name}_$shape.log" 2>&1
    (grep '^RESULT' "$OUT/ours_${name}_$shape.log" | sed "s/^RESULT /RESULT $name /") >> "$OUT/lora.txt" || tail -5 "$OUT/ours_${name}_$shape.log"
  done
done
python3 - "$OUT/lora.txt" <<'PY' | tee "$OUT/lora_report.md"
import json, sys
rows = []
for line in open(sys.argv[1]):
    _, name, body = line.split(" ", 2)
    rows.append((name, json.loads(body)))
print("| shape | learner | trainable params | tokens/s | vs peft LoRA | peak GiB | peak vs peft |")
print("|---|---|---|---|---|---|---|")
for shape in dict.fromkeys(r["shape"] for _, r in rows):
    ref = next((r for n, r in rows if n == "peft-lora16" and r["shape"] == shape), None)
    for name, r in rows:
        if r["shape"] != shape:
            continue
        tps, peak = r["tokens_per_s"], r.get("peak_mem_gib") or 0
        rt = f"{tps / ref['tokens_per_s']:.2f}x" if ref else "-"
        rp = f"{peak / ref['peak_mem_gib']:.2f}x" if ref and ref.get("peak_mem_gib") else "-"
        print(f"| {shape} | {name} | {r.get('trainable_params', '?'):,} | {tps:,.0f} | {rt} | {peak:.1f} | {rp} |")
PY
