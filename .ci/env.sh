# Shared environment for the README commands and CI: where the toolchain caches live.
# Sourced, not executed.
export GRPO_CACHE="${GRPO_CACHE:-/opt/grpo}"
export GRPO_VENV="$GRPO_CACHE/venv"
export GRPO_PYTHON="$GRPO_VENV/bin/python"
export LIBTORCH="$GRPO_VENV/lib/python3.11/site-packages/torch"
export LD_LIBRARY_PATH="$LIBTORCH/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
