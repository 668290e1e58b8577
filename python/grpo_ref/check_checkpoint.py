"""Check that a checkpoint dir loads cleanly in transformers and reproduces given logits.

Prints {"max_abs_diff": f, "ok": bool}; exits 1 on missing/unexpected keys or a mismatch
(torch.allclose semantics).
"""
import argparse
import json
import sys

import torch
from safetensors.torch import load_file

from common import forward_logits, load_ids, load_model


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="HF model directory to validate")
    p.add_argument("--ids", required=True, help='JSON file {"input_ids": [[...], ...]}')
    p.add_argument("--logits", required=True, help="safetensors file with our 'logits' [B, T, V]")
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-4)
    args = p.parse_args()

    model, info = load_model(args.model, output_loading_info=True)
    bad = {k: info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
    if bad:
        print(f"checkpoint did not load cleanly: {bad}", file=sys.stderr)
        sys.exit(1)

    ref = forward_logits(model, load_ids(args.ids))
    ours = load_file(args.logits)["logits"].float()
    if ours.shape != ref.shape:
        print(f"shape mismatch: ours {tuple(ours.shape)} vs transformers {tuple(ref.shape)}",
              file=sys.stderr)
        print(json.dumps({"max_abs_diff": None, "ok": False}))
        sys.exit(1)
    max_abs = (ours - ref).abs().max().item()
    ok = torch.allclose(ours, ref, atol=args.atol, rtol=args.rtol)
    print(json.dumps({"max_abs_diff": max_abs, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
