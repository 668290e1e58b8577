#!/usr/bin/env bash
# Runs on nvidia-h200-x2 (device tool): the NCCL fault drill with the real learner role. The
# Atropos API (run-api), the copy-task environment, the learner (`--role learner`, cuda:0,
# `--sync-transport nccl`) and two sidecars on cuda:1: sidecar A serves the environment's
# generation, sidecar B only follows the weights. B is started with the fault injector
# GRPO_FAULT_KILL_IN_RECEIVE=N (see src/sync/nccl_sync.rs): it SIGKILLs itself in its N-th NCCL
# receive, after the first bucket landed, so the learner's broadcast is cut mid-transfer. The
# script restarts B after OUTAGE_S seconds, CYCLES times. The learner must keep stepping, mark B
# stale and give it a full resync once it is back. The learner sends straight from its live
# weights, holding its next optimizer update until the sends end: a send to the killed B is
# abandoned once B fails its gRPC health checks (about a second), so A and training go on. When
# B is back the learner makes a new communicator (or, if that join misses its deadline, serves
# B over the gRPC stream) (README, "Kill mid-broadcast").
# Build and gather first, here (the wheels as in local_loop.sh):
#   cargo build --release --features cuda --bin grpo-node && mkdir -p .gpu && cp target/release/grpo-node .gpu/
# Then: run(command="bash scripts/gpu/drill_learner.sh", carry=[".gpu"], kind="nvidia-h200-x2")
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/drill_learner_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels/*.whl > "$OUT/pip.log" 2>&1 \
  || { tail -5 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/pylib WANDB_MODE=disabled
RUN=/tmp/drill_learner_run; rm -rf "$RUN"; mkdir -p "$RUN"
# 8.4M parameters: 17 MB of bf16 weights, 17 one-MiB buckets per publication.
python3 python/tools/make_demo_model.py --out "$RUN/model" --hidden 256 --layers 8 --heads 4 --kv-heads 4 \
  --intermediate 1024 > "$OUT/make_model.log" 2>&1 || { tail -5 "$OUT/make_model.log"; exit 1; }
STEPS=${STEPS:-400}; KILL_AT=${KILL_AT:-25}; CYCLES=${CYCLES:-2}; OUTAGE_S=${OUTAGE_S:-4}
python3 -m atroposlib.cli.run_api --host 127.0.0.1 --port 18000 > "$OUT/api.log" 2>&1 &
API=$!
sidecar() { # name engine-port grpc-port [fault]
  GRPO_FAULT_KILL_IN_RECEIVE=${4:-} ./.gpu/grpo-node --role inference-sidecar --engine embedded \
    --model-name "$RUN/model" --device cuda:1 --listen "127.0.0.1:$2" --grpc-listen "127.0.0.1:$3" \
    >> "$OUT/sidecar_$1.log" 2>&1 &
  echo $!
}
healthy() { for _ in $(seq 1 600); do curl -sf "http://127.0.0.1:$1/health" > /dev/null && return 0; sleep 0.1; done; return 1; }
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18000/ > /dev/null && break; sleep 0.1; done
A=$(sidecar a 19001 19051); B=$(sidecar b 19002 19052 "$KILL_AT")
healthy 19001 && healthy 19002 || { echo "sidecars never healthy"; tail -3 "$OUT"/sidecar_*.log; }
NCCL_DEBUG=${NCCL_DEBUG:-WARN} RUST_LOG=info,grpo_node::comm=debug ./.gpu/grpo-node --role learner --model-name "$RUN/model" --atropos-url http://127.0.0.1:18000 \
  --sidecar http://127.0.0.1:19051,http://127.0.0.1:19052 --batch-size 32 --gradient-accumulation-steps 4 \
  --seq-len 64 --lr 1e-3 --warmup-steps 2 --training-steps "$STEPS" --checkpoint-interval 100 \
  --save-path "$RUN/checkpoints" --device cuda:0 --sync-transport nccl --sync-bucket-mb 1 > "$OUT/learner.log" 2>&1 &
LEARNER=$!
# What a cut send leaves behind: 3 s after the first one, the learner's threads (state,
# kernel wait channel, current syscall, CPU ticks over one second: a thread spinning in NCCL
# burns ticks, one blocked in a lock or the driver does not) and GPU 0's utilization.
threads() { for t in /proc/"$LEARNER"/task/*; do
  echo "$(basename "$t") $(cut -d' ' -f3,14,15 "$t/stat" 2>/dev/null) wchan=$(cat "$t/wchan" 2>/dev/null) syscall=$(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
done; }
( while kill -0 "$LEARNER" 2>/dev/null && ! grep -q "died during the NCCL transfer" "$OUT/learner.log"; do sleep 0.2; done
  sleep 3; { echo "# tid state utime stime"; threads; sleep 1; echo "# one second later"; threads
  nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader; } > "$OUT/after_abandon.txt" 2>&1 ) &
for _ in $(seq 1 600); do grep -q "registered with the Atropos API" "$OUT/learner.log" && break; sleep 0.1; done
python3 python/envs/copy_env.py serve --env.tokenizer_name "$RUN/model" --env.rollout_server_url http://127.0.0.1:18000 \
  --openai.base_url http://127.0.0.1:19001/v1 --openai.server_type vllm > "$OUT/env.log" 2>&1 &
ENV=$!
steps() { wc -l < "$RUN/checkpoints/metrics.jsonl" 2>/dev/null || echo 0; }
for cycle in $(seq 1 "$CYCLES"); do
  while kill -0 "$B" 2>/dev/null && kill -0 "$LEARNER" 2>/dev/null; do sleep 0.05; done
  echo "cycle $cycle: sidecar B died at learner step $(steps) ($(grep -c GRPO_FAULT "$OUT/sidecar_b.log") fault kills logged)"
  sleep "$OUTAGE_S"
  if [ "$cycle" -lt "$CYCLES" ]; then B=$(sidecar b 19002 19052 "$KILL_AT"); else B=$(sidecar b 19002 19052); fi
  echo "cycle $cycle: sidecar B restarted at learner step $(steps)"
done
# The learner must also exit once done, even with send threads abandoned inside NCCL.
while kill -0 "$LEARNER" 2>/dev/null && ! grep -q "final_model" "$OUT/learner.log"; do sleep 0.2; done
sleep 2; echo "GPU utilization after training ended (GPU 0 is the learner's; a kernel still spinning on a dead peer keeps it busy):"
nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader
for _ in $(seq 1 300); do kill -0 "$LEARNER" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$LEARNER" 2>/dev/null; then
  echo "learner still running 30 s after its final checkpoint: its threads follow; killing it"
  { command -v gdb > /dev/null && gdb -p "$LEARNER" -batch -ex "thread apply all bt" 2>&1 \
      || for t in /proc/"$LEARNER"/task/*; do echo "$t $(cat "$t/comm") $(cat "$t/wchan" 2>/dev/null)"; done; } \
    > "$OUT/learner_stacks.txt" 2>&1
  grep -E "^Thread|nccl|cu[A-Z]" "$OUT/learner_stacks.txt" | head -40
  kill -9 "$LEARNER"
fi
wait "$LEARNER"; echo "learner exit $? ($(grep -c 'exiting without exit handlers' "$OUT/learner.log") exits past stuck NCCL threads logged)"
kill "$ENV" "$A" "$B" "$API" 2>/dev/null; wait 2>/dev/null
cp "$RUN/checkpoints/metrics.jsonl" "$OUT/" 2>/dev/null
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"learner steps: {len(rows)}, last step {rows[-1]['step'] if rows else None}")
prev = None
for r in rows:
    state = (r.get("sidecars_synced"), r.get("sidecars_stale"))
    if state != prev:
        print(f"step {r['step']:4d}: synced={state[0]} stale={state[1]} engine_version={r.get('engine_version')} step_time_s={r['step_time_s']:.3f}")
        prev = state
holds = [r.get("sync_hold_s", 0.0) for r in rows]
if holds:
    print(f"optimizer held for syncs: median {sorted(holds)[len(holds)//2]*1e3:.2f} ms, max {max(holds):.3f} s; steps held > 0.5 s: {[r['step'] for r in rows if r.get('sync_hold_s', 0) > 0.5]}")
k = min(10, len(rows))
print(f"reward first {k} -> last {k}: {sum(r['reward_mean'] for r in rows[:k])/k:.3f} -> {sum(r['reward_mean'] for r in rows[-k:])/k:.3f}")
PY
sed 's/\x1b\[[0-9;]*m//g' "$OUT/learner.log" | grep -E "sync failed|full sync|no NCCL with|died during|abandon|communicator made" | sed -E 's/^.*(WARN|INFO) //' | cut -c1-260
for s in a b; do echo "sidecar $s: $(grep -c 'weights updated' "$OUT/sidecar_$s.log") updates, $(grep -c 'joined the learner' "$OUT/sidecar_$s.log") NCCL joins, $(grep -c 'GRPO_FAULT' "$OUT/sidecar_$s.log") fault kills"; done
if [ -f "$OUT/after_abandon.txt" ]; then
  python3 - "$OUT/after_abandon.txt" <<'PY'
import sys
blocks, cur = [], {}
for line in open(sys.argv[1]):
    if line.startswith("# "):
        if cur: blocks.append(cur)
        cur = {}
    elif line[:1].isdigit() and " " in line and "wchan=" in line:
        tid, state, ut, st, *rest = line.split()
        cur[tid] = (state, int(ut) + int(st), " ".join(rest))
    elif line.strip():
        print("after the first abandoned send, GPU:", line.strip())
if cur: blocks.append(cur)
if len(blocks) == 2:
    a, b = blocks
    busy = [(t, b[t][1] - a[t][1], b[t][0], b[t][2]) for t in b if t in a and b[t][1] > a[t][1]]
    print(f"learner threads 3 s after the first abandoned send: {len(b)}; burning CPU: {len(busy)}")
    for t, d, state, rest in sorted(busy, key=lambda x: -x[1])[:8]:
        print(f"  tid {t}: {d} ticks/s, state {state}, {rest}")
PY
fi
