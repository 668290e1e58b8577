#!/usr/bin/env bash
# Runs on nvidia-h200-x2 (device tool): the NCCL weight-sync fault drill. A stand-in learner
# (`grpo-node bench publish`, the real WeightBroadcaster) on GPU 0 publishes a 1.6B-parameter
# fp32 model every step to a real sidecar (`--role inference-sidecar`) on GPU 1 over NCCL. The
# sidecar is killed with SIGKILL while versions are in flight (CYCLES times, at varying
# offsets), the learner keeps stepping with the sidecar stale, then the sidecar is restarted and
# must get a full resync on a new communicator.
# Build first, here:
#   cargo build --release --features cuda --bin grpo-node && mkdir -p .gpu && cp target/release/grpo-node .gpu/
# Then: run(command="bash scripts/gpu/drill_sync.sh", carry=[".gpu"], kind="nvidia-h200-x2")
set -uo pipefail
source "$(dirname "$0")/env.sh"
OUT=${OUT:-/tmp/drill_out}; mkdir -p "$OUT"
M=/tmp/drill-model
python3 python/tools/make_demo_model.py --out "$M" --hidden 2048 --layers 24 --heads 16 --kv-heads 16 \
  --intermediate 8192 --max-positions 128 > "$OUT/make_model.log" 2>&1 || { tail -5 "$OUT/make_model.log"; exit 1; }
du -sh "$M"
sidecar() {
  ./.gpu/grpo-node --role inference-sidecar --device cuda:1 --model-name "$M" \
    --listen 127.0.0.1:19001 --grpc-listen 127.0.0.1:19051 > "$OUT/sidecar_$1.log" 2>&1 &
  echo $!
}
healthy() { for _ in $(seq 1 300); do curl -sf http://127.0.0.1:19001/health > /dev/null && return 0; sleep 0.1; done; return 1; }
SC=$(sidecar 1); healthy || { echo "sidecar 1 never healthy"; tail -5 "$OUT/sidecar_1.log"; }
./.gpu/grpo-node bench publish --model-name "$M" --gpu 0 --sidecar http://127.0.0.1:19051 \
  --steps "${STEPS:-1500}" --step-ms "${STEP_MS:-20}" > "$OUT/drill.log" 2>&1 &
DRILL=$!
synced_count() { grep -c '"synced":1' "$OUT/drill.log"; }
# CYCLES times: wait until the sidecar follows again, let a few more versions go by, then kill
# it at a varying offset so that the kill lands in different phases of a publication.
for cycle in $(seq 1 "${CYCLES:-3}"); do
  base=$(synced_count)
  for _ in $(seq 1 1200); do [ "$(synced_count)" -ge $((base + 5)) ] && break; sleep 0.05; done
  sleep "0.0$((cycle * 3))"
  echo "cycle $cycle: kill -9 sidecar at drill step $(grep -c '^STEP' "$OUT/drill.log")"
  kill -9 "$SC"; sleep "${OUTAGE_S:-3}"
  echo "cycle $cycle: restart sidecar at drill step $(grep -c '^STEP' "$OUT/drill.log")"
  SC=$(sidecar "$((cycle + 1))"); healthy || echo "sidecar $((cycle + 1)) never healthy"
done
wait "$DRILL"; echo "drill exit $?"
kill "$SC" 2>/dev/null; wait 2>/dev/null
python3 - "$OUT/drill.log" <<'PY'
import json, sys
steps = [json.loads(l[5:]) for l in open(sys.argv[1]) if l.startswith("STEP ")]
print(f"steps made: {len(steps)} of the drill's, last step {steps[-1]['step'] if steps else None}")
prev = None
for s in steps:
    state = (s["synced"], s["stale"])
    if state != prev:
        print(f"step {s['step']:4d} t={s['t_s']:6.2f}s synced={s['synced']} stale={s['stale']} engine_version={s['engine_version']} sync_time_s={s['sync_time_s']:.4f}")
        prev = state
print("final:", steps[-1] if steps else None)
PY
grep -E "sync failed|full sync" "$OUT/drill.log" | sed 's/\x1b\[[0-9;]*m//g' | sed -E 's/.*(sync failed|full sync)/\1/' | cut -c1-230
for f in "$OUT"/sidecar_*.log; do echo "$(basename "$f"): $(grep -c 'weights updated' "$f") updates, $(grep -c 'joined the learner' "$f") joins"; done
