#!/usr/bin/env bash
# Runs on nvidia-h200 (device tool): the local GRPO loop with the learner (bf16) and a vLLM 0.26.0
# sidecar on the same GPU (cluster/local-gpu-vllm.toml; vLLM at --gpu-memory-utilization 0.3),
# weights over the gRPC stream and vLLM's reload_weights; or, for comparison, the same loop and
# model with the embedded engine. Reports steps/min, the sync share of wall time, sync time per
# version against a raw GPU->host->GPU copy of the same bytes, the canary, and reward.
#
# Gather first, here (once):
#   bash ../shared/tools/vllm-gpu/fetch.sh .vllm-whl                       # vLLM in 7 chunks
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node
#   mkdir -p .gpu && cp target-cuda/release/grpo-node .gpu/  (+ .gpu/wheels as in local_loop.sh)
# Then, back to back while the machine stays warm:
#   run("bash .vllm-whl/cK/assemble.sh .vllm-whl/cK", carry=[".vllm-whl/cK"])   for K = 0..5
#   run("bash scripts/gpu/vllm_loop.sh vllm --install", carry=[".vllm-whl/c6", ".gpu"])
#   run("bash scripts/gpu/vllm_loop.sh embedded", carry=[".gpu"])
#   run("bash scripts/gpu/vllm_loop.sh ipc", carry=[".gpu"])   # CUDA IPC instead of gRPC + reload
#   run("bash scripts/gpu/vllm_loop.sh lora", carry=[".gpu"])  # LoRA r=16: adapters hot-swapped
#   run("bash scripts/gpu/vllm_loop.sh lora-restart", carry=[".gpu"])  # vLLM restarted every 10 steps
# vLLM captures CUDA graphs (its default); EAGER=1 adds --enforce-eager.
set -uo pipefail
MODE=${1:-vllm}
if [ "${2:-}" = "--install" ]; then
  bash .vllm-whl/c6/assemble.sh .vllm-whl/c6 --install || exit 1
fi
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/vllm_loop_out}; mkdir -p "$OUT"
if [ ! -d /tmp/pylib/atroposlib ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels/*.whl > "$OUT/pip.log" 2>&1 \
    || { tail -5 "$OUT/pip.log"; exit 1; }
fi
export PYTHONPATH=/tmp/pylib GRPO_PYTHON=python3 WANDB_MODE=disabled
# The carried vLLM, usage stats off (the sidecar also sets both on every vLLM it starts).
source "$(dirname "$0")/vllm_command.sh"
STEPS=${STEPS:-200}
if [ "$MODE" = vllm ] || [ "$MODE" = vllm-keep ]; then
  MANIFEST=cluster/local-gpu-vllm.toml
  [ "$MODE" = vllm-keep ] && export GRPO_VLLM_PAUSE_MODE=keep
elif [ "$MODE" = ipc ]; then
  # The same loop with CUDA IPC: vLLM's workers copy each version out of the learner's memory.
  MANIFEST=cluster/.gpu-ipc.toml
  sed -e 's/"--sync-transport", "grpc"/"--sync-transport", "ipc"/' \
      -e 's|"--vllm-log", "{run}/logs/vllm.log",|"--vllm-log", "{run}/logs/vllm.log", "--vllm-weight-transfer", "ipc",|' \
      -e 's/name = "local-gpu-vllm"/name = "local-gpu-ipc"/' cluster/local-gpu-vllm.toml > "$MANIFEST"
  grep -q '"--vllm-weight-transfer", "ipc"' "$MANIFEST" && grep -q '"--sync-transport", "ipc"' "$MANIFEST" || { echo "ipc manifest edit failed"; exit 1; }
elif [ "$MODE" = lora ] || [ "$MODE" = lora-restart ]; then
  # LoRA r=16 on q/v (the Atropos defaults): only the adapter moves. lora: /v1/load_lora_adapter
  # under a new name each version; lora-restart: vLLM restarted with --lora-modules every 10 steps.
  MANIFEST=cluster/.gpu-$MODE.toml
  if [ "$MODE" = lora ]; then BRIDGE='"--weight-bridge-mode", "lora"'; else
    BRIDGE='"--weight-bridge-mode", "lora-restart", "--vllm-restart-interval", "10"'; fi
  sed -e 's|"--vllm-log", "{run}/logs/vllm.log",|"--vllm-log", "{run}/logs/vllm.log", "--vllm-lora-rank", "16", "--checkpoint-root", "{run}/checkpoints",|' \
      -e "s|\"--sync-transport\", \"grpc\"|$BRIDGE, \"--lora-r\", \"16\", \"--lora-alpha\", \"32\", \"--lr\", \"1e-2\"|" \
      -e 's|make_demo_model.py", "--out", "{run}/model"|make_demo_model.py", "--out", "{run}/model", "--init-std", "0.1"|' \
      -e "s/name = \"local-gpu-vllm\"/name = \"local-gpu-$MODE\"/" cluster/local-gpu-vllm.toml > "$MANIFEST"
  grep -q -- '--vllm-lora-rank' "$MANIFEST" && grep -q -- '--lora-r' "$MANIFEST" || { echo "lora manifest edit failed"; exit 1; }
  # The manifest's own --lr comes first; ours (later) wins only if the flag is repeatable: drop it.
  sed -i 's/"--lr", "1e-3", //' "$MANIFEST"
else
  # The embedded engine on the same model (one 64-wide head, as vLLM needs).
  MANIFEST=cluster/.gpu-embedded.toml
  sed -e 's/"--out", "{run}\/model"\]/"--out", "{run}\/model", "--heads", "1", "--kv-heads", "1"]/' \
      -e 's/name = "local-gpu"/name = "gpu-embedded"/' cluster/local-gpu.toml > "$MANIFEST"
fi
# A copy with the step count, so the checked-in manifest stays as it is.
sed -e "s/steps = 200/steps = $STEPS/" -e "s/\"--training-steps\", \"200\"/\"--training-steps\", \"$STEPS\"/" \
    -e '0,/^name = /s/^name = "\(.*\)"/name = "\1-'"$STEPS"'"/' "$MANIFEST" > "cluster/.gpu-$MODE-$STEPS.toml"
MANIFEST="cluster/.gpu-$MODE-$STEPS.toml"
if [ "${EAGER:-0}" = 1 ]; then
  # vLLM without CUDA graphs (--enforce-eager), as the Atropos trainer runs lora_only.
  sed -i -e 's/"--vllm-args", "--dtype /"--vllm-args", "--enforce-eager --dtype /' \
    -e '0,/^name = /s/^name = "\(.*\)"/name = "\1-eager"/' "$MANIFEST"
  grep -q -- '--enforce-eager' "$MANIFEST" || { echo "eager edit failed"; exit 1; }
fi
if [ "${BIG:-0}" = 2 ]; then
  # The 1.5B shape (Qwen2.5-1.5B's layout: hidden 1536, 28 layers, 12 heads of 128, 2 KV heads,
  # intermediate 8960; the demo's small vocabulary), staged on /tmp: what a LoRA swap costs there.
  MANIFEST_BIG=cluster/.gpu-big2-$MODE.toml
  sed -e 's/"--heads", "1", "--kv-heads", "1"\]/"--hidden", "1536", "--layers", "28", "--heads", "12", "--kv-heads", "2", "--intermediate", "8960"]/' \
      -e 's/"--init-std", "0.1", //' \
      -e 's|/dev/shm/grpo-{port:sidecar}|/tmp/grpo-{port:sidecar}|' -e '0,/^name = /s/^name = "\(.*\)"/name = "big2-\1"/' "$MANIFEST" > "$MANIFEST_BIG"
  grep -q '"--hidden", "1536"' "$MANIFEST_BIG" || { echo "big2 manifest edit failed"; exit 1; }
  MANIFEST=$MANIFEST_BIG
elif [ "${BIG:-0}" = 1 ]; then
  # A 0.36B model of the same layout (hidden 896, 24 layers, 14 heads of 64, 2 KV heads): what the
  # sync path costs when the bytes matter (1.4 GB per version in fp32), staged on /tmp.
  MANIFEST_BIG=cluster/.gpu-big-$MODE.toml
  sed -e 's/"--heads", "1", "--kv-heads", "1"\]/"--hidden", "896", "--layers", "24", "--heads", "14", "--kv-heads", "2", "--intermediate", "4864"]/' \
      -e 's/"--out", "{run}\/model"\]/"--out", "{run}\/model", "--hidden", "896", "--layers", "24", "--heads", "14", "--kv-heads", "2", "--intermediate", "4864"]/' \
      -e 's|/dev/shm/grpo-{port:sidecar}|/tmp/grpo-{port:sidecar}|' -e '0,/^name = /s/^name = "\(.*\)"/name = "big-\1"/' "$MANIFEST" > "$MANIFEST_BIG"
  MANIFEST=$MANIFEST_BIG
  df -h /dev/shm /tmp | tail -2
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s.%N)
if [ -n "${KILL_AT_STEPS:-}" ]; then
  # Kill drill: kill -9 vLLM's API server (not the sidecar) once the learner has logged each of
  # these step counts; the supervisor restarts it and the next version is installed again.
  (
    for at in $KILL_AT_STEPS; do
      until run=$(ls -td runs/*-"$STEPS"-* 2>/dev/null | head -1) && [ -n "$run" ] \
            && [ "$(cat "$run/checkpoints/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$at" ]; do sleep 0.2; done
      pid=$(sed 's/\x1b\[[0-9;]*m//g' "$run/logs/sidecar.log" | grep -o 'vLLM launched pid=[0-9]*' | tail -1 | cut -d= -f2)
      echo "kill -9 vLLM pid $pid at step $at ($(date +%T.%N))" >> "$OUT/kills_$MODE.log"
      kill -9 "$pid"
      until [ "$(sed 's/\x1b\[[0-9;]*m//g' "$run/logs/sidecar.log" | grep -c 'vLLM ready')" -ge 2 ]; do sleep 0.5; done
    done
  ) &
fi
timeout "${LIMIT_S:-450}" ./.gpu/grpo-node launch "$MANIFEST" > "$OUT/launch_$MODE.log" 2>&1
echo "launch exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
RUN=$(ls -td runs/"$(sed -n 's/^name = "\(.*\)"/\1/p' "$MANIFEST" | head -1)"-* 2>/dev/null | head -1)
cp "$RUN/checkpoints/metrics.jsonl" "$OUT/metrics_$MODE.jsonl" 2>/dev/null
for f in "$RUN"/logs/*.log; do tail -40 "$f" > "$OUT/tail_${MODE}_$(basename "$f")"; done
grep -h "vLLM serves the new version\|vLLM serves the new adapter\|restarted with the new adapter\|vLLM ready\|vLLM launched\|restarting\|CUDA IPC\|update rejected" "$RUN/logs/sidecar.log" 2>/dev/null \
  | sed 's/\x1b\[[0-9;]*m//g' > "$OUT/sidecar_sync_$MODE.log"
python3 - "$OUT/metrics_$MODE.jsonl" "$OUT/sidecar_sync_$MODE.log" "$MODE" <<'PY'
import json, re, statistics as st, sys, time
import torch
rows = [json.loads(l) for l in open(sys.argv[1])]
if not rows:
    sys.exit("no steps")
mode = sys.argv[3]
wall = sum(r["step_time_s"] for r in rows)
sync = [r["sync_time_s"] for r in rows if r.get("sync_time_s")]
tokens = sum(r["tokens"] for r in rows)
rew = [r["reward_mean"] for r in rows]
k = min(10, len(rew))
nbytes = max(r.get("sync_bytes") or 0 for r in rows)
# The raw copy of the same bytes: GPU -> host -> GPU, the least any host-staged path moves.
x = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
times = []
for _ in range(12):
    torch.cuda.synchronize(); t = time.perf_counter()
    y = x.cpu().cuda(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
raw = st.median(times[2:])
canary = [r["sync_canary_max_abs_diff"] for r in rows if r.get("sync_canary_max_abs_diff") is not None]
lines = open(sys.argv[2]).read().splitlines()
write_s = [float(m.group(1)) for l in lines for m in [re.search(r"write_s=([0-9.e-]+)", l)] if m]
def field(name):
    return [float(m.group(1)) for l in lines for m in [re.search(name + r"=([0-9.e-]+)", l)] if m]
total_s, pause_s, reload_s, resume_s, swap_s, update_s, stall_s = (field(n) for n in ["total_s", "pause_s", "reload_s", "resume_s", "swap_s", "update_s", "stall_s"])
print(f"| engine | steps | wall s | steps/min | trained tok/s | sync / wall | sync s per version (median) | raw copy s | sync / raw | reward first {k} -> last {k} |")
print("|---|---|---|---|---|---|---|---|---|---|")
med = st.median(sync) if sync else float("nan")
print(f"| {mode} | {len(rows)} | {wall:.1f} | {60*len(rows)/wall:.1f} | {tokens/wall:.0f} | {sum(sync)/wall:.1%} | {med:.4f} | {raw:.5f} | {med/raw:.0f}x | {sum(rew[:k])/k:.3f} -> {sum(rew[-k:])/k:.3f} |")
print(f"bytes per version {nbytes}; versions with a canary {len(canary)}", end="")
if canary:
    print(f", canary max |dlogp| median {st.median(canary):.2e}, max {max(canary):.2e}", end="")
if write_s or update_s:
    print(f"; sidecar medians: write {st.median(write_s) if write_s else 0:.4f} s", end="")
    for name, xs in [("pause", pause_s), ("reload", reload_s), ("ipc update", update_s), ("resume", resume_s), ("swap", swap_s), ("with canary", total_s), ("restart stall", stall_s)]:
        if xs:
            print(f", {name} {st.median(xs):.4f} s", end="")
print()
PY
grep -c "vLLM launched" "$RUN/logs/sidecar.log" 2>/dev/null | sed 's/^/vLLM launches: /'
true
