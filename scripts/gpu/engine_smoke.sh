#!/usr/bin/env bash
# Runs on the GPU machine: the inference sidecar on cuda:0 serves /generate from a tiny model; the
# greedy continuation and its logprobs must equal the CPU engine's (expected.json, made here).
# Prepare here:
#   cargo build --release --features cuda --bin grpo-node && cp target/release/grpo-node .gpu/grpo-node
#   cp -r <tiny model dir> .gpu/model && (run the same request on a CPU sidecar) > .gpu/expected.json
set -euo pipefail
S=/opt/torch/.venv/lib/python3.12/site-packages
PY=/opt/torch/.venv/bin/python
export LD_LIBRARY_PATH="$S/torch/lib"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
./.gpu/grpo-node --role inference-sidecar --device cuda:0 --model-name .gpu/model \
  --listen 127.0.0.1:19001 --grpc-listen 127.0.0.1:19051 > "${OUT:-/tmp}/sidecar.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:19001/health > /dev/null && break; sleep 0.1; done
curl -sf -X POST http://127.0.0.1:19001/generate -H 'content-type: application/json' \
  -d "$(cat .gpu/request.json)" > "${OUT:-/tmp}/got.json"
"$PY" - .gpu/expected.json "${OUT:-/tmp}/got.json" <<'PY'
import json, sys
exp, got = (json.load(open(p)) for p in sys.argv[1:3])
same = exp["token_ids"] == got["token_ids"]
lp = lambda r: [list(pos[0].values())[0] for out in r["logprobs"] for pos in out]
diff = max(abs(a - b) for a, b in zip(lp(exp), lp(got)))
print(f"| check | result |\n|---|---|\n| greedy ids cpu == cuda | {same} |\n| max logprob diff | {diff:.2e} |")
print("PASS" if same and diff < 1e-4 else "FAIL")
sys.exit(0 if same and diff < 1e-4 else 1)
PY
grep -m1 "sidecar ready" "${OUT:-/tmp}/sidecar.log" | sed 's/\x1b\[[0-9;]*m//g'
