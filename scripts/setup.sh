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
export LIBTORCH="$("$GRPO_PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONDONTWRITEBYTECODE=1
unset _grpo_root _grpo_venv _grpo_stamp
