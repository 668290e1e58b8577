#!/usr/bin/env bash
# Runs on the GPU machine (device tool): the learner with token-budget packing
# (--micro-batch-tokens: no padding, flash attention's varlen kernel) against the same learner
# with sorted padded rows, and against the Atropos example trainer's recipe
# (python/bench/ref_learner.py), on the same batches (make_batches.py --steps 4 --seed 1), in one
# run; the strong PyTorch reference (python/bench/strong_ref_learner.py, padded and packed) beside
# it. A long-prompt batch shape (prompt 2048, 8 completions of 256) measures --shared-prompt on
# against off. The varlen kernel is checked against the block-mask path
# (GRPO_PACKED_ATTENTION=mask): per-step losses of the same batches, unshared and shared.
# Build first, here:
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node
#   mkdir -p .gpu && cp target-cuda/release/grpo-node .gpu/
# Then: run(command="bash scripts/gpu/bench_packing.sh", carry=[".gpu/grpo-node"])
# Env: SHAPES (default "qwen2.5-0.5b qwen2.5-1.5b qwen2.5-7b"), BUDGETS (default "8192 16384"),
# REF_SHAPES (default "qwen2.5-0.5b qwen2.5-1.5b"), PARTS (default "refs ours long check": which
# sections run; one call of 10 minutes holds about two of them; "head" compares the head's
# hand-computed logprob gradient with GRPO_HEAD=autograd; "keep" runs --checkpoint-keep-layers
# for each of KEEP, default "0 8 all").
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
SHAPES=${SHAPES:-"qwen2.5-0.5b qwen2.5-1.5b qwen2.5-7b"}; BUDGETS=${BUDGETS:-"8192 16384"}
REF_SHAPES=${REF_SHAPES:-"qwen2.5-0.5b qwen2.5-1.5b"}; PARTS=${PARTS:-"refs ours long check"}
part() { [[ " $PARTS " == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 python/bench/make_batches.py --out "$OUT/batches.json" --steps 4 --seed 1
python3 python/bench/flops.py --peak --device cuda > "$OUT/peak.txt" 2>&1
PEAK=$(python3 -c "import json; l=[x for x in open('$OUT/peak.txt') if x.startswith('RESULT ')]; print(json.loads(l[-1][7:]).get('bf16_peak_tflops', 0))" 2>/dev/null || echo 0)
echo "bf16 peak TFLOP/s: $PEAK" | tee "$OUT/summary.txt"
python3 python/bench/make_batches.py --out "$OUT/long.json" --steps 3 --seed 1 --groups 4 --group-size 8 \
  --seq-len 2304 --prompt-min 2048 --prompt-max 2048 --completion-min 256 --completion-max 256
ours() {  # ours NAME BATCHES ARGS...
  local name=$1 batches=$2; shift 2
  ./.gpu/grpo-node bench learner --batches "$batches" --device cuda:0 "$@" > "$OUT/$name.log" 2>&1
  grep '^RESULT' "$OUT/$name.log" | sed "s/^RESULT /RESULT {\"run\": \"$name\", \"r\": /; s/$/}/" >> "$OUT/results.txt" \
    || { echo "$name failed:"; tail -5 "$OUT/$name.log"; }
}
strong() {  # strong NAME ARGS...
  local name=$1; shift
  python3 python/bench/strong_ref_learner.py --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  grep '^RESULT' "$OUT/$name.log" | sed "s/^RESULT /RESULT {\"run\": \"$name\", \"r\": /; s/$/}/" >> "$OUT/results.txt" \
    || { echo "$name failed:"; tail -5 "$OUT/$name.log"; }
}
part refs && for shape in $REF_SHAPES; do
  strong "strong-ref-$shape" --batches "$OUT/batches.json" --shape "$shape" --batch-size 4
  strong "strong-ref-packed16384-$shape" --batches "$OUT/batches.json" --shape "$shape" --packed --micro-batch-tokens 16384
  python3 python/bench/ref_learner.py --batches "$OUT/batches.json" --shape "$shape" --batch-size 4 \
    --out "$OUT/ref_$shape.json" > "$OUT/ref_$shape.log" 2>&1
  grep '^RESULT' "$OUT/ref_$shape.log" | sed "s/^RESULT /RESULT {\"run\": \"atropos-ref-$shape\", \"r\": /; s/$/}/" >> "$OUT/results.txt" \
    || tail -5 "$OUT/ref_$shape.log"
done
B="$OUT/batches.json"; L="$OUT/long.json"
part ours && for shape in $SHAPES; do
  ours "sorted-$shape" "$B" --shape "$shape" --batch-size 4
  for b in $BUDGETS; do ours "tokens$b-$shape" "$B" --shape "$shape" --micro-batch-tokens "$b"; done
done
part long && ours "long-sorted-qwen2.5-1.5b" "$L" --shape qwen2.5-1.5b --batch-size 4
part long && for sp in off on; do
  ours "long-tokens16384-shared-$sp-qwen2.5-1.5b" "$L" --shape qwen2.5-1.5b --micro-batch-tokens 16384 --shared-prompt "$sp"
done
# The varlen kernel against the mask path, same packed batches (small budgets: the mask is T x T).
part check && for path in varlen mask; do
  GRPO_PACKED_ATTENTION=$path ours "check-$path-tokens2048-0.5b" "$B" --shape qwen2.5-0.5b --micro-batch-tokens 2048
  GRPO_PACKED_ATTENTION=$path ours "check-$path-long-shared-0.5b" "$L" --shape qwen2.5-0.5b --micro-batch-tokens 2304 --shared-prompt on
done
# The head's logprob gradient by hand (the default) against autograd's fp32 chain, same batches.
part head && for shape in $SHAPES; do
  GRPO_HEAD=autograd ours "head-autograd-tokens16384-$shape" "$B" --shape "$shape" --micro-batch-tokens 16384
  ours "head-manual-tokens16384-$shape" "$B" --shape "$shape" --micro-batch-tokens 16384
  ours "head-manual-chunk4096-tokens16384-$shape" "$B" --shape "$shape" --micro-batch-tokens 16384 --logprob-chunk-tokens 4096
done
# Partial checkpointing: the last N layers keep their activations (KEEP, default "0 8 all").
part keep && for shape in $SHAPES; do
  for k in ${KEEP:-0 8 all}; do
    [[ $k == all ]] && k=1000
    ours "keep$k-tokens16384-$shape" "$B" --shape "$shape" --micro-batch-tokens 16384 --checkpoint-keep-layers "$k"
  done
done
python3 - "$OUT/results.txt" "$PEAK" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
rows = [json.loads(l[7:]) for l in open(sys.argv[1]) if l.startswith("RESULT ")]
peak = float(sys.argv[2] or 0)
print(f"| run | tokens/s | step s | positions/real | MFU | peak GiB | losses |")
print("|---|---|---|---|---|---|---|")
for x in rows:
    r = x["r"]
    tps, step = r.get("tokens_per_s", 0), r.get("step_s", 0)
    mfu = r.get("model_flops_per_step", 0) / step / (peak * 1e12) if step and peak else 0
    pad = (r.get("padded_tokens") or 0) / max(r.get("train_tokens") or 1, 1)
    losses = ", ".join(f"{v:.5f}" for v in r.get("losses", []))
    print(f"| {x['run']} | {tps:,.0f} | {step:.3f} | {pad:.2f} | {mfu:.1%} | {r.get('peak_mem_gib') or 0:.1f} | {losses} |")
PY
