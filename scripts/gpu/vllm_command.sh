# Sourced by the GPU scripts that run the carried vLLM 0.26.0 (installed into /tmp/vllm-site by
# ../shared/tools/vllm-gpu): a python wrapper that puts vLLM's site dir first, then the
# sidecar's plugin dir (GRPO_VLLM_PLUGIN_DIR, ipc/nccl/shared), with usage stats off; and
# GRPO_VLLM_COMMAND, the command the sidecar starts vLLM with.
cat > /tmp/vllm-python <<'SH'
#!/bin/sh
export PYTHONPATH=/tmp/vllm-site${GRPO_VLLM_PLUGIN_DIR:+:$GRPO_VLLM_PLUGIN_DIR}
exec env VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 python3 "$@"
SH
chmod +x /tmp/vllm-python
export GRPO_VLLM_COMMAND="/tmp/vllm-python -m vllm.entrypoints.openai.api_server"
