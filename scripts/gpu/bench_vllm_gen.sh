#!/usr/bin/env bash
# Runs on nvidia-h200 (device tool): vLLM 0.26.0's generation throughput in each weight-sync
# mode's configuration (full weights; lora = adapters hot-loaded; lora-restart = --lora-modules at
# launch), with CUDA graphs and with --enforce-eager, on SmolLM2-1.7B's shape (random bf16
# weights, SmolLM2's tokenizer), plus the greedy logprobs of the hot-swapped adapter against a
# fresh launch on it. python/bench/vllm_gen_tps.py does the work.
#
# vLLM installed first as in vllm_loop.sh (the 7 chunks of .vllm-whl); then, while warm:
#   run("bash scripts/gpu/bench_vllm_gen.sh A", carry=[".gpu/smollm2-tok"])   # full x2, lora eager
#   run("bash scripts/gpu/bench_vllm_gen.sh B", carry=[".gpu/smollm2-tok"])   # lora, lora-restart x2
# (C: lora with graphs and lora-restart eager only: the served-logprob checks.)
# Results: $OUT/gen_*.json and the table (bench_vllm_gen.sh report, once all exist).
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/vllm_gen_out}; mkdir -p "$OUT" /tmp/gen
export PYTHONPATH=/tmp/vllm-site
B=python/bench/vllm_gen_tps.py
M=/tmp/gen/smollm2-1.7b-shape
[ -f "$M/model.safetensors" ] || python3 $B make --out "$M" --tokenizer .gpu/smollm2-tok || exit 1
one() {  # config, eager flag
  local tag=$1${2:+-eager}
  timeout 280 python3 $B run --model "$M" --config "$1" ${2:+--eager} --json "/tmp/gen/gen_$tag.json" \
    || { echo "$tag failed"; tail -30 "/tmp/gen/gen_$tag.json.vllm.log"; }
  cp /tmp/gen/gen_"$tag".json* "$OUT/" 2>/dev/null
}
case "${1:-A}" in
  A) one full; one full eager; one lora eager ;;
  B) one lora; one lora-restart; one lora-restart eager ;;
  C) one lora; one lora-restart eager ;;  # the served-logprob checks again, without the graph compile of full
esac
ls /tmp/gen/gen_*.json | grep -v vllm.log | xargs python3 $B report | tee "$OUT/table.md"
