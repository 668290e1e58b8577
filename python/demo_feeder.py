"""Synthetic environment for the local learner demo.

Registers with the Atropos API as an environment and keeps it supplied with scored groups of a
fixed toy preference task: eight fixed prompts, each with one rewarded completion (score 1)
among scrambled ones (score 0). No inference server is involved, so the groups carry
no rollout logprobs and the learner trains on-policy (--allow-missing-logprobs). The learner's
`logp+` column (mean logprob of rewarded completions) is what visibly rises.
"""
import argparse
import json
import random
import time
import urllib.error
import urllib.request


def call(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def make_group(rng, task, group_size):
    prompt, good = rng.choice(task)
    tokens, scores = [], []
    for k in range(group_size):
        rewarded = k % 2 == 0
        completion = good if rewarded else [rng.randrange(4, TASK_VOCAB) for _ in good]
        tokens.append(prompt + completion)
        scores.append(1.0 if rewarded else 0.0)
    masks = [[-100] * len(prompt) + seq[len(prompt):] for seq in tokens]
    return {"tokens": tokens, "masks": masks, "scores": scores}


TASK_VOCAB = 256


def make_task(seed, n_prompts=8, prompt_len=8, completion_len=8):
    rng = random.Random(seed)
    return [([rng.randrange(4, TASK_VOCAB) for _ in range(prompt_len)],
             [rng.randrange(4, TASK_VOCAB) for _ in range(completion_len)]) for _ in range(n_prompts)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--api", required=True, help="Atropos API base URL")
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, required=True, help="stop once the API reports this many batches")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    task = make_task(args.seed)
    # The API accepts environments only after the trainer registered and polled /batch once.
    while True:
        try:
            reg = call(args.api, "/register-env", {"max_token_length": 64, "desired_name": "demo",
                                                  "weight": 1.0, "group_size": args.group_size})
            if reg.get("status") == "success":
                break
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    env_id = reg["env_id"]
    batch_size = call(args.api, "/info")["batch_size"]
    per_batch = batch_size // args.group_size
    print(f"registered as env {env_id}; {per_batch} groups per batch", flush=True)
    while True:
        try:
            status = call(args.api, "/status")
        except (urllib.error.URLError, OSError):
            return  # the API is gone: the demo is over
        if status["current_step"] >= args.steps:
            return
        if status["queue_size"] < 2 * per_batch:
            groups = [dict(make_group(rng, task, args.group_size), env_id=env_id) for _ in range(per_batch)]
            call(args.api, "/scored_data_list", groups)
        time.sleep(0.05)


if __name__ == "__main__":
    main()
