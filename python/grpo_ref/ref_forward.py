"""Reference forward pass: fp32 eager transformers logits [B, T, V] for given token ids."""
import argparse

from safetensors.torch import save_file

from common import forward_logits, load_ids, load_model, with_adapter


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--ids", required=True, help='JSON file {"input_ids": [[...], ...]}')
    p.add_argument("--out", required=True, help="output .safetensors with key 'logits'")
    p.add_argument("--adapter", help="PEFT adapter directory applied with peft.PeftModel")
    args = p.parse_args()
    logits = forward_logits(with_adapter(load_model(args.model), args.adapter), load_ids(args.ids))
    save_file({"logits": logits}, args.out)


if __name__ == "__main__":
    main()
