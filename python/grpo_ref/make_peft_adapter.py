"""Writes a PEFT LoRA adapter for a model with peft itself (`get_peft_model` + `save_pretrained`),
with random (non-zero) A and B so that it changes the logits; prints the adapter directory."""
import argparse

import torch
from peft import LoraConfig, get_peft_model

from common import load_model


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--alpha", type=float, default=8.0)
    p.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    p.add_argument("--layers", type=int, nargs="*")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                        target_modules=args.targets, bias="none",
                        layers_to_transform=args.layers or None)
    model = get_peft_model(load_model(args.model), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
