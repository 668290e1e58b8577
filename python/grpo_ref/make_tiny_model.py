"""Build a tiny random-init Llama/Qwen2/Qwen3 causal LM plus a WordLevel tokenizer, saved HF-style.

Weights use initializer_range 0.2 so logits are far from uniform; biases and RMSNorm weights are
perturbed away from their 0/1 init so a loader that ignores them is caught.
"""
import argparse
import json
import os

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, 10000.0),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, 1e6),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, 1e6),
}
ROPE_SCALING = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
}


def build_config(args):
    config_cls, _, rope_theta = ARCHS[args.arch]
    kw = dict(
        vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        intermediate_size=args.intermediate, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=rope_theta, rope_scaling=ROPE_SCALING[args.rope_scaling],
        tie_word_embeddings=args.tie, initializer_range=0.2,
        eos_token_id=1,
    )
    # Qwen3Config defaults head_dim to 128 rather than hidden/heads, so always pin it there.
    if args.head_dim or args.arch == "qwen3":
        kw["head_dim"] = args.head_dim or args.hidden // args.heads
    if args.arch == "qwen3":
        kw["attention_bias"] = False
    return config_cls(**kw)


def save_tokenizer(out, vocab):
    tok = Tokenizer(models.WordLevel({f"<tok{i}>": i for i in range(vocab)}, unk_token="<tok0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "eos_token": "<tok1>", "pad_token": "<tok0>"}, f, indent=2)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", choices=sorted(ARCHS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", action="store_true")
    p.add_argument("--rope-scaling", choices=list(ROPE_SCALING), default="none")
    p.add_argument("--shard", action="store_true")
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=None)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = ARCHS[args.arch][1](build_config(args)).float()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)
            elif name.endswith("norm.weight"):
                param.add_(torch.randn_like(param), alpha=0.1)

    os.makedirs(args.out, exist_ok=True)
    shard_size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) // 4
    model.save_pretrained(args.out, safe_serialization=True,
                          max_shard_size=shard_size if args.shard else "10GB")
    if args.shard:
        assert os.path.exists(os.path.join(args.out, "model.safetensors.index.json")), "sharding failed"
    save_tokenizer(args.out, args.vocab)
    print(f"transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
