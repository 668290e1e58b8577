#!/usr/bin/env bash
# The main job: sets up a fresh machine, then runs a small local GRPO training run.
#   run-api (Atropos API) + a synthetic environment (python/demo_feeder.py) + grpo-node --role learner
# on a tiny random Llama, each as its own process with logs under runs/<time>/, torn down on
# exit (only the processes this script started). Watch `logp+` rise in the learner's step lines.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
STEPS="${STEPS:-40}"
run="runs/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run"
echo "demo: building grpo-node (release)" >&2
cargo build --release --quiet

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$GRPO_PYTHON" python/grpo_ref/make_tiny_model.py --arch llama --out "$run/model" \
  --hidden 128 --layers 4 --heads 4 --kv-heads 2 --intermediate 256 --vocab 512 > /dev/null
port=$("$GRPO_PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
api="http://127.0.0.1:$port"
"$GRPO_PYTHON" -m atroposlib.cli.run_api --host 127.0.0.1 --port "$port" > "$run/run-api.log" 2>&1 &
pids+=($!)
"$GRPO_PYTHON" python/demo_feeder.py --api "$api" --steps "$STEPS" > "$run/env.log" 2>&1 &
pids+=($!)
echo "demo: run directory $run; API $api" >&2
./target/release/grpo-node --role learner --model-name "$run/model" --atropos-url "$api" \
  --batch-size 4 --gradient-accumulation-steps 2 --seq-len 64 --lr 2e-3 --warmup-steps 2 \
  --training-steps "$STEPS" --checkpoint-interval 10 --save-path "$run/checkpoints" \
  --allow-missing-logprobs 2> >(tee "$run/learner.log" >&2)

"$GRPO_PYTHON" - "$run/checkpoints/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0], rows[-1]
print(f"\n{len(rows)} steps. Mean logprob of rewarded completions: {first['pos_logp_mean']:.3f} -> {last['pos_logp_mean']:.3f}; "
      f"unrewarded: {first['neg_logp_mean']:.3f} -> {last['neg_logp_mean']:.3f}")
PY
echo "demo: checkpoints in $run/checkpoints (HF format; final_model loads in transformers)" >&2
