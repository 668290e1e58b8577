"""Shared helpers for the grpo_ref scripts: fp32 eager model loading and token-id files."""
import json

import torch
from transformers import AutoModelForCausalLM


def load_model(path, output_loading_info=False):
    """Load an HF causal LM from a local dir in float32 with eager attention."""
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager",
        output_loading_info=output_loading_info,
    )


def with_adapter(model, adapter, trainable=False):
    """The model with a PEFT adapter directory applied (its LoRA parameters trainable if asked)."""
    if not adapter:
        return model
    from peft import PeftModel
    return PeftModel.from_pretrained(model, adapter, is_trainable=trainable)


def load_ids(path):
    """Read {"input_ids": [[...], ...]} (rectangular) into a LongTensor [B, T]."""
    with open(path) as f:
        return torch.tensor(json.load(f)["input_ids"], dtype=torch.long)


@torch.no_grad()
def forward_logits(model, ids):
    """fp32 logits [B, T, V] for ids in eval mode."""
    model.eval()
    return model(input_ids=ids).logits.float().contiguous()
