"""Capture vLLM's own parameter names/shapes for tiny Llama, Qwen2 and Qwen3 models through
grpo-node's worker extension (`SharedWeights.grpo_shared_export`), as test fixtures.

The extension's source is the Rust const `PLUGIN_INIT` in src/engine/vllm_transfer.rs; it is
written out as <tmp>/grpo_vllm_plugin/__init__.py and vLLM is started (loopback only, usage
stats off) with `--worker-extension-cls grpo_vllm_plugin.SharedWeights`. For each arch this
writes tests/fixtures/vllm026/<arch>/config.json (the model's config.json) and export.json (the
extension's result with "pid" set to 0).

On CPU, vLLM 0.26 packs every unquantized linear layer's weight for oneDNN after loading and
replaces the parameter with an empty tensor (layers/utils.py dispatch_cpu_unquantized_gemm,
remove_weight=True from linear.py), so export.json shows qkv_proj/o_proj/gate_up_proj/down_proj
weights as shape [0]. A second run therefore writes export_unpacked.json through a dump-only
extension (grpo_dump_keep.SharedWeights: the same class, imported after patching that dispatch to
keep the weight), which shows the shapes and strides a CUDA vLLM keeps.

Run from the repository root, with the main venv (torch/transformers, for the tiny models):

    /opt/grpo/venv/bin/python python/tools/dump_vllm_params.py

Options: --vllm-python (default /opt/grpo/vllm-venv/bin/python), --out (default
tests/fixtures/vllm026), --arch (repeatable; default llama qwen2 qwen3).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RUST_FILE = os.path.join(ROOT, "src", "engine", "vllm_transfer.rs")
MAKER = os.path.join(ROOT, "python", "grpo_ref", "make_tiny_model.py")

# head_dim 64 (128 / 2) so vLLM's CPU attention takes it (as tests/vllm.rs's model); vocab 500
# is not a multiple of 64, so vLLM's vocab padding shows in the embedding/lm_head shapes.
# intermediate 192 keeps gate_up_proj (384) and down_proj (K 192) apart from qkv_proj (256)
# and o_proj (128x128).
COMMON = ["--hidden", "128", "--heads", "2", "--kv-heads", "1", "--intermediate", "192",
          "--vocab", "500"]
ARCHS = {
    "llama": COMMON,                 # untied
    "qwen2": COMMON + ["--tie"],     # qkv bias, tied embeddings
    "qwen3": COMMON,                 # q/k norm, untied
}


def plugin_source():
    with open(RUST_FILE) as f:
        text = f.read()
    m = re.search(r'const PLUGIN_INIT: &str = r#"(.*?)"#;', text, re.S)
    if not m:
        sys.exit(f"PLUGIN_INIT not found in {RUST_FILE}")
    return m.group(1)


# Dump-only worker extension: the worker imports it before it loads the model, so the patch is in
# place when linear.py's process_weights_after_loading imports dispatch_cpu_unquantized_gemm.
KEEP_WEIGHTS = """from vllm.model_executor.layers import utils as _utils

_dispatch = _utils.dispatch_cpu_unquantized_gemm


def _keep_weight(layer, remove_weight):
    return _dispatch(layer, remove_weight=False)


_utils.dispatch_cpu_unquantized_gemm = _keep_weight

from grpo_vllm_plugin import SharedWeights  # noqa: E402,F401
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def export(model_dir, plugin_root, vllm_python, log_path, extension, timeout=600):
    port = free_port()
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_SERVER_DEV_MODE="1",
               PYTHONPATH=plugin_root)
    cmd = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "4", "--seed", "0",
           "--worker-extension-cls", extension]
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log_path}")
                if time.time() > deadline:
                    raise RuntimeError(f"vLLM not healthy after {timeout}s; see {log_path}")
                try:
                    if http("GET", base + "/health", timeout=2)[0] == 200:
                        break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(1)
            try:
                _, raw = http("POST", base + "/collective_rpc",
                              {"method": "grpo_shared_export"}, timeout=120)
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"/collective_rpc: HTTP {e.code}: {e.read().decode()}")
            return json.loads(raw)["results"][0]
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", default="/opt/grpo/vllm-venv/bin/python")
    p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "vllm026"))
    p.add_argument("--arch", action="append", choices=sorted(ARCHS))
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="grpo_vllm_dump_")
    try:
        os.makedirs(os.path.join(tmp, "grpo_vllm_plugin"))
        with open(os.path.join(tmp, "grpo_vllm_plugin", "__init__.py"), "w") as f:
            f.write(plugin_source())
        os.makedirs(os.path.join(tmp, "grpo_dump_keep"))
        with open(os.path.join(tmp, "grpo_dump_keep", "__init__.py"), "w") as f:
            f.write(KEEP_WEIGHTS)
        for arch in args.arch or list(ARCHS):
            model = os.path.join(tmp, "models", arch)
            subprocess.run([sys.executable, MAKER, "--arch", arch, "--out", model, *ARCHS[arch]],
                           check=True)
            out = os.path.join(args.out, arch)
            os.makedirs(out, exist_ok=True)
            shutil.copyfile(os.path.join(model, "config.json"), os.path.join(out, "config.json"))
            for extension, fixture in [("grpo_vllm_plugin.SharedWeights", "export.json"),
                                       ("grpo_dump_keep.SharedWeights", "export_unpacked.json")]:
                log = os.path.join(tmp, f"vllm-{arch}-{fixture}.log")
                try:
                    result = export(os.path.abspath(model), tmp, args.vllm_python, log, extension)
                except Exception:
                    with open(log) as f:
                        sys.stderr.write(f.read()[-8000:])
                    raise
                result["pid"] = 0
                with open(os.path.join(out, fixture), "w") as f:
                    json.dump(result, f, indent=1)
                    f.write("\n")
                print(f"{arch}: {len(result['tensors'])} tensors -> {out}/{fixture}")
                for t in result["tensors"]:
                    print(f"  {t['name']} {t['dtype']} {t['shape']} {t['stride']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
