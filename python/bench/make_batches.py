"""Synthetic Atropos batches for the learner benchmarks (deterministic given --seed).

Writes {"seq_len", "vocab", "groups", "group_size", "seed", "steps": [[group, ...], ...]}; one step is
one Atropos /batch (one optimizer step of the example trainer). Each group is a ScoredData dict with
"tokens", "masks", "scores", "inference_logprobs", group-size sequences each:
* a prompt of uniform length in [prompt_min, prompt_max], shared by the whole group (same tokens);
* a completion of log-uniform length in [completion_min, completion_max], clipped so that
  prompt + completion <= seq_len;
* tokens uniform in [0, vocab); masks -100 on the prompt, the token id on the completion;
* inference_logprobs 1.0 on the prompt, -U(0.05, 3.0) on the completion;
* scores 0/1 at random, with at least one 0 and one 1 per group (so advantages are non-zero).
"""
import argparse
import json
import math

import numpy as np


def make_group(rng, a):
    p_len = int(rng.integers(a.prompt_min, a.prompt_max + 1))
    prompt = rng.integers(0, a.vocab, size=p_len)
    tokens, masks, logprobs = [], [], []
    for _ in range(a.group_size):
        c_len = int(round(math.exp(rng.uniform(math.log(a.completion_min), math.log(a.completion_max)))))
        c_len = max(1, min(c_len, a.seq_len - p_len))
        completion = rng.integers(0, a.vocab, size=c_len)
        lp = -rng.uniform(0.05, 3.0, size=c_len)
        tokens.append(prompt.tolist() + completion.tolist())
        masks.append([-100] * p_len + completion.tolist())
        logprobs.append([1.0] * p_len + [round(float(x), 5) for x in lp])
    scores = rng.integers(0, 2, size=a.group_size)
    if scores.min() == scores.max():
        scores[int(rng.integers(0, a.group_size))] = 1 - scores[0]
    return {"tokens": tokens, "masks": masks, "scores": [float(s) for s in scores],
            "inference_logprobs": logprobs}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--groups", type=int, default=8, help="groups per step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048, help="max total tokens per sequence")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-min", type=int, default=64)
    p.add_argument("--prompt-max", type=int, default=256)
    p.add_argument("--completion-min", type=int, default=170)
    p.add_argument("--completion-max", type=int, default=1700)
    a = p.parse_args()
    if a.group_size < 2:
        p.error("--group-size must be >= 2 (each group needs a 0 and a 1 score)")
    if not (1 <= a.prompt_min <= a.prompt_max < a.seq_len and 1 <= a.completion_min <= a.completion_max):
        p.error("need 1 <= prompt-min <= prompt-max < seq-len and 1 <= completion-min <= completion-max")

    rng = np.random.default_rng(a.seed)
    steps = [[make_group(rng, a) for _ in range(a.groups)] for _ in range(a.steps)]
    with open(a.out, "w") as f:
        json.dump({"seq_len": a.seq_len, "vocab": a.vocab, "groups": a.groups,
                   "group_size": a.group_size, "seed": a.seed, "steps": steps}, f, separators=(",", ":"))
    n = [len(t) for step in steps for g in step for t in g["tokens"]]
    print(f"wrote {a.out}: {a.steps} steps x {a.groups} groups x {a.group_size} seqs, "
          f"len min/mean/max {min(n)}/{sum(n) / len(n):.0f}/{max(n)}")


if __name__ == "__main__":
    main()
