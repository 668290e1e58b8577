#!/usr/bin/env bash
# Runs on nvidia-h100-x1 (device tool): benchmark 3, the local GRPO loop on one GPU with the
# embedded engine (cluster/local-gpu.toml): steps per minute and the share of time spent in
# weight sync. The device image lacks what run-api and the environment import, so they come
# as wheels for Python 3.12 (no network there).
# Build and gather first, here:
#   cargo build --release --features cuda --bin grpo-node && mkdir -p .gpu && cp target/release/grpo-node .gpu/
#   mkdir -p .gpu/wheels && pip download --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .gpu/wheels fastapi==0.165.0 uvicorn==0.54.0 openai==3.54.0 tenacity==9.2.1 wandb==0.31.0 \
#     pydantic-cli==10.0.0 jsonlines==4.0.0
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels atroposlib==0.4.0
# Then: run(command="bash scripts/gpu/local_loop.sh", carry=[".gpu"])
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/loop_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels/*.whl > "$OUT/pip.log" 2>&1 \
  || { tail -5 "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/pylib GRPO_PYTHON=python3 WANDB_MODE=disabled
python3 -c "import atroposlib.envs.base, fastapi, uvicorn, openai, wandb; print('python imports ok')" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
start=$(date +%s.%N)
MANIFEST=${MANIFEST:-cluster/local-gpu.toml}
timeout "${LIMIT_S:-480}" ./.gpu/grpo-node launch "$MANIFEST" > "$OUT/launch.log" 2>&1
echo "launch exit $? after $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
RUN=$(ls -td runs/"$(basename "$MANIFEST" .toml)"-* 2>/dev/null | head -1)
cp "$RUN/checkpoints/metrics.jsonl" "$OUT/" 2>/dev/null; cp "$RUN/reward.png" "$OUT/" 2>/dev/null
for f in "$RUN"/logs/*.log; do tail -3 "$f" > "$OUT/tail_$(basename "$f")"; done
python3 - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
if not rows:
    sys.exit("no steps")
wall = sum(r["step_time_s"] for r in rows)
sync = sum(r.get("sync_time_s") or 0.0 for r in rows)
compute = sum(r["compute_time_s"] for r in rows)
wait = sum(r["wait_time_s"] for r in rows)
rew = [r["reward_mean"] for r in rows]
k = min(10, len(rew))
print(f"| steps | wall s | steps/min | learner compute share | waiting for batches share | sync time / wall (sync overlaps training) | reward first {k} -> last {k} |")
print("|---|---|---|---|---|---|---|")
print(f"| {len(rows)} | {wall:.1f} | {60*len(rows)/wall:.1f} | {compute/wall:.1%} | {wait/wall:.1%} | {sync/wall:.1%} | {sum(rew[:k])/k:.3f} -> {sum(rew[-k:])/k:.3f} |")
PY
echo "sidecar updates: $(grep -c 'weights updated' "$RUN/logs/sidecar.log" 2>/dev/null), over NCCL: $(grep 'weights updated' "$RUN/logs/sidecar.log" 2>/dev/null | grep -c 'nccl')"
grep -hE "NCCL|nccl" "$RUN"/logs/learner.log "$RUN"/logs/sidecar.log 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | grep -v "weights updated" | cut -c1-220 | head -5
true
