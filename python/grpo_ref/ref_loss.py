"""Reference GRPO loss and gradient norm over Atropos ScoredData groups.

Every sequence runs through the fp32 transformers model on its own (batch of 1, no padding);
one backward over the total loss; prints {"loss", "grad_norm", "tokens", "sequences"} as JSON.
With --adapter, the model is the base with that PEFT adapter (peft.PeftModel, LoRA parameters
trainable, the base frozen), and the grad norm is the adapter's.
"""
import argparse
import json

import torch

from common import load_model, with_adapter


def _get(d, key):
    """d[key] if d is a dict holding a non-None value there, else None."""
    return d.get(key) if isinstance(d, dict) else None


def group_advantages(group):
    """Per-sequence advantages (float64) and set_advantage_to_zero flags."""
    s = torch.tensor(group["scores"], dtype=torch.float64)
    a = (s - s.mean()) / s.std(correction=0).clamp(min=1e-8) if len(s) > 1 else s
    overrides = group.get("overrides") or []
    zero = [bool(overrides and _get(overrides[i], "set_advantage_to_zero")) for i in range(len(s))]
    return a, zero


def temperature(group, i):
    overrides = group.get("overrides") or []
    for src in (overrides[i] if overrides else None, group.get("generation_params"),
                group.get("group_overrides")):
        t = _get(src, "temperature")
        if t is not None:
            return float(t) if t > 0 else 1.0
    return 1.0


def sequence_loss(model, group, i, adv, zero, cfg):
    """(sum of per-token loss over scored positions, number of scored positions) for sequence i."""
    tokens = torch.tensor(group["tokens"][i], dtype=torch.long)
    labels = torch.tensor(group["masks"][i][1:], dtype=torch.long)
    ref = torch.tensor(group["inference_logprobs"][i][1:], dtype=torch.float32)
    scored = labels != -100
    if group.get("advantages"):
        a = torch.tensor(group["advantages"][i][1:], dtype=torch.float64)
    else:
        a = torch.full(labels.shape, float(adv[i]), dtype=torch.float64)
    if zero[i]:
        a = torch.zeros_like(a)

    logits = model(input_ids=tokens[:-1].unsqueeze(0)).logits[0].float()
    logp_all = torch.log_softmax(logits / temperature(group, i), dim=-1)
    logp = logp_all[scored].gather(-1, labels[scored].unsqueeze(-1)).squeeze(-1)
    ref, a = ref[scored], a[scored]

    ratio = torch.exp(logp - ref)
    r = ratio if cfg.get("is_cap") is None else ratio.clamp(max=cfg["is_cap"])
    eps_lo = cfg["clip_eps"]
    eps_hi = cfg["clip_eps_high"] if cfg.get("clip_eps_high") is not None else eps_lo
    c = r.clamp(1 - eps_lo, 1 + eps_hi)
    r, c = r.double(), c.double()
    if cfg["clip_mode"] == "standard":
        per_tok = -torch.minimum(r * a, c * a)
    elif cfg["clip_mode"] == "atropos":
        per_tok = -torch.where(a >= 0, torch.minimum(r * a, c * a), torch.maximum(r * a, c * a))
    else:
        raise ValueError(f"unknown clip_mode {cfg['clip_mode']!r}")
    if cfg["kl_coef"] > 0:
        d = (ref - logp).double()
        per_tok = per_tok + cfg["kl_coef"] * (torch.exp(d) - d - 1)
    return per_tok.sum(), int(scored.sum())


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--case", required=True, help='JSON file {"groups": [...], "config": {...}}')
    p.add_argument("--adapter", help="PEFT adapter directory (LoRA training)")
    args = p.parse_args()
    with open(args.case) as f:
        case = json.load(f)
    cfg = case["config"]

    model = with_adapter(load_model(args.model), args.adapter, trainable=True)
    model.train()
    sums, counts = [], []
    for group in case["groups"]:
        adv, zero = group_advantages(group)
        for i in range(len(group["tokens"])):
            s, n = sequence_loss(model, group, i, adv, zero, cfg)
            sums.append(s)
            counts.append(n)

    if cfg["loss_agg"] == "seq-mean-token-mean":
        loss = sum(s / max(n, 1e-8) for s, n in zip(sums, counts)) / len(sums)
    elif cfg["loss_agg"] == "token-mean":
        loss = sum(sums) / max(sum(counts), 1e-8)
    else:
        raise ValueError(f"unknown loss_agg {cfg['loss_agg']!r}")
    loss.backward()
    grad_sq = sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)
    print(json.dumps({"loss": loss.item(), "grad_norm": float(grad_sq) ** 0.5,
                      "tokens": sum(counts), "sequences": len(sums)}))


if __name__ == "__main__":
    main()
