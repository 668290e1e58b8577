"""The strong PyTorch reference learner: "what an engineer would write" for the same GRPO step, on
the same batches (make_batches.py) and the same random-init Qwen2.5 shape as ref_learner.py.

Unlike the Atropos recipe (ref_learner.py) it does what a competent PyTorch user does:
* bf16 parameters, transformers' sdpa attention, non-reentrant gradient checkpointing;
* sequences sorted by length, micro-batches of --batch-size rows, each padded to its own longest
  row (a multiple of 64), never to the step's longest;
* the LM head and logprobs in fp32 on chunks of --chunk-tokens positions (the full logits never
  exist at once), only at scored positions;
* GRPO's standard clipped objective, per-sequence token means, mean over the step's sequences;
* clip_grad_norm_(1.0) and torch.optim.AdamW(fused=True); no empty_cache.

--packed: the same step with token-budget packing instead: sequences end to end in micro-batches
of --micro-batch-tokens, no padding, position ids restarting per sequence, and attention kept
within each sequence by a flex-attention block mask (transformers' attn_implementation=
"flex_attention"). If that path does not run here, the result says why ("error").

Prints one line `RESULT {json}` (keys as ref_learner.py: step_s, tokens_per_s, train_tokens,
padded_tokens, peak_mem_gib, model_flops_per_step, losses) and writes it to --out.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import SHAPES, model_flops  # noqa: E402
from ref_learner import build_model  # noqa: E402


def sequences(groups):
    """(input_ids, labels, ref_logprobs, advantage) per sequence, aligned as the trainer does."""
    out = []
    for g in groups:
        scores = torch.tensor(g["scores"], dtype=torch.float64)
        std = scores.std(unbiased=False).clamp_min(1e-8) if len(scores) > 1 else torch.tensor(1.0)
        adv = ((scores - scores.mean()) / std).tolist()
        for i, toks in enumerate(g["tokens"]):
            lp = g.get("inference_logprobs") or [[1.0] * len(toks)] * len(g["tokens"])
            out.append((toks[:-1], g["masks"][i][1:], lp[i][1:], adv[i]))
    return out


def rows(seqs, batch_size):
    seqs = sorted(seqs, key=lambda s: -len(s[0]))
    for a in range(0, len(seqs), batch_size):
        chunk = seqs[a:a + batch_size]
        T = -(-max(len(s[0]) for s in chunk) // 64) * 64
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        lab = torch.full((len(chunk), T), -100, dtype=torch.long)
        ref = torch.zeros(len(chunk), T)
        adv = torch.zeros(len(chunk), T)
        seg = torch.zeros(len(chunk), T, dtype=torch.long)
        for r, (i, l, p, a_) in enumerate(chunk):
            n = len(i)
            ids[r, :n], lab[r, :n], ref[r, :n], adv[r, :n] = torch.tensor(i), torch.tensor(l), torch.tensor(p), a_
            seg[r, :] = r
        yield ids, lab, ref, adv, seg, None, len(chunk)


def packs(seqs, budget):
    seqs = sorted(seqs, key=lambda s: -len(s[0]))
    bins = []
    for s in seqs:
        for b in bins:
            if b[0] + len(s[0]) <= budget:
                b[0] += len(s[0]); b[1].append(s); break
        else:
            bins.append([len(s[0]), [s]])
    for _, members in bins:
        cat = lambda k: torch.tensor([x for s in members for x in s[k]])  # noqa: E731
        ids, lab, ref = cat(0).view(1, -1), cat(1).view(1, -1), cat(2).view(1, -1).float()
        adv = torch.tensor([s[3] for s in members for _ in s[0]]).view(1, -1).float()
        seg = torch.tensor([k for k, s in enumerate(members) for _ in s[0]]).view(1, -1)
        pos = torch.tensor([p for s in members for p in range(len(s[0]))]).view(1, -1)
        yield ids, lab, ref, adv, seg, pos, len(members)


def loss_of(model, batch, n_seq_total, chunk, device, packed):
    ids, lab, ref, adv, seg, pos, n = (x.to(device) if torch.is_tensor(x) else x for x in batch)
    if packed:
        from torch.nn.attention.flex_attention import create_block_mask
        doc = seg[0]
        mask_mod = lambda b, h, q, k: (doc[q] == doc[k]) & (k <= q)  # noqa: E731
        T = ids.size(1)
        bm = create_block_mask(mask_mod, None, None, T, T, device=device)
        hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=bm).last_hidden_state
    else:
        hidden = model.model(input_ids=ids).last_hidden_state
    hidden, lab, ref, adv, seg = hidden.reshape(-1, hidden.size(-1)), lab.view(-1), ref.view(-1), adv.view(-1), seg.view(-1)
    keep = (lab != -100).nonzero().squeeze(-1)
    counts = torch.zeros(int(seg.max()) + 1, device=device).index_add_(0, seg[keep], torch.ones(len(keep), device=device))
    total = hidden.new_zeros((), dtype=torch.float32)
    for a in range(0, len(keep), chunk):
        k = keep[a:a + chunk]
        logits = model.lm_head(hidden[k]).float()
        logp = logits.gather(-1, lab[k].unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
        ratio = torch.exp(logp - ref[k])
        obj = torch.min(ratio * adv[k], ratio.clamp(0.8, 1.2) * adv[k])
        total = total - (obj / counts[seg[k]]).sum() / n_seq_total
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", required=True)
    p.add_argument("--shape", required=True, choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--packed", action="store_true")
    p.add_argument("--micro-batch-tokens", type=int, default=16384)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--out", default="strong.json")
    a = p.parse_args()
    device = "cuda"
    shape = SHAPES[a.shape]
    steps = json.load(open(a.batches))["steps"]
    result = {"impl": "strong-ref" + ("-packed" if a.packed else ""), "shape": a.shape}
    try:
        model = build_model(shape, device, 0)
        if a.packed:
            model.config._attn_implementation = "flex_attention"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        torch.cuda.reset_peak_memory_stats()
        times, losses, tokens, positions, flops = [], [], [], [], []
        for i, groups in enumerate(steps):
            seqs = sequences(groups)
            mbs = list(packs(seqs, a.micro_batch_tokens) if a.packed else rows(seqs, a.batch_size))
            torch.cuda.synchronize(); t0 = time.time()
            total = 0.0
            for mb in mbs:
                loss = loss_of(model, mb, len(seqs), a.chunk_tokens, device, a.packed)
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= a.warmup_steps:
                times.append(time.time() - t0)
                lens = [len(s[0]) for s in seqs]
                tokens.append(sum(lens))
                positions.append(sum(mb[0].numel() for mb in mbs))
                flops.append(model_flops(shape, lens))
            losses.append(total)
        step_s = sum(times) / len(times)
        result.update(step_s=step_s, train_tokens=sum(tokens) / len(tokens), padded_tokens=sum(positions) / len(positions),
                      tokens_per_s=sum(tokens) / sum(times), peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
                      model_flops_per_step=sum(flops) / len(flops), losses=losses, batch_size=a.batch_size)
    except Exception as e:  # the packed path may not run with this transformers: say so
        result["error"] = f"{type(e).__name__}: {e}"[:500]
    print("RESULT " + json.dumps(result), flush=True)
    json.dump(result, open(a.out, "w"))


if __name__ == "__main__":
    main()
