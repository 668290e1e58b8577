"""CPU check of gsm8k_env.py's held-out split and eval schedule (no model, no server).

    source scripts/setup.sh && $GRPO_PYTHON python/envs/check_gsm8k_env.py [GSM_DIR [TOKENIZER_DIR]]

GSM_DIR defaults to $GRPO_GSM8K, TOKENIZER_DIR to $GRPO_SMOLLM2 (only its tokenizer is read).
/generate is replaced by a stub, and the trainer and run-api by a small simulation driving the env's
own env_step_checks() the way atroposlib's env_manager does. Checks:
  * holdout=20: the last 20 problems (sorted file order) never train and are the only ones evaluated,
    greedily (n=1, temperature 0); holdout=0 keeps the old behaviour (train on all, evaluate the
    first eval_limit);
  * every prompt fits the GPU manifest's --seq-len 1024 with gen_max_tokens 256;
  * the eval log line parses with the regex scripts/gpu/shared_vllm.sh uses;
  * eval_every: an eval before the first batch is produced, one at each multiple, and a final one
    that ends while the trainer still waits for its last batch; no batch is produced during an eval.
Prints "check_gsm8k_env: OK" and exits 0, or raises.
"""
import asyncio
import logging
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import env_common as common  # noqa: E402
import gsm8k_env as g  # noqa: E402

# The regex shared_vllm.sh parses the env log with (keep the two in step).
EVAL_RE = re.compile(r"gsm8k eval at step (\d+): \{'eval/accuracy': ([0-9.]+)\} over (\d+) problems"
                     r"(?:.*?boxed (\d+))?(?:.*?kind (\w+))?(?:.*?step at end (\d+))?")


class Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def make_env(gsm, tok, **over):
    cfg, servers = g.GSM8KEnv.config_init()
    cfg.tokenizer_name = tok
    cfg.data_dir = gsm
    for k, v in over.items():
        setattr(cfg, k, v)
    env = g.GSM8KEnv(cfg, servers, slurm=False, testing=False)
    return env


async def check_split(gsm, tok, cap):
    env = make_env(gsm, tok, holdout=20, eval_limit=100, gen_max_tokens=256)
    await env.setup()
    ids = [p["id"] for p in env.problems]
    assert ids == sorted(ids) and len(ids) == 100, (len(ids), ids[:3])
    held = {p["id"] for p in env.eval_problems}
    train = {p["id"] for p in env.train_problems}
    assert held == set(ids[-20:]) and train == set(ids[:-20]) and not held & train
    seen = {(await env.get_next_item())["id"] for _ in range(400)}
    assert seen == train, (len(seen), seen & held)
    # A symlink to symbolic/ (the GPU manifest's {run}/gsm) still finds instruction.toml beside it.
    with tempfile.TemporaryDirectory() as d:
        link = os.path.join(d, "gsm")
        os.symlink(g.resolve_data_dir(gsm), link)
        real = g.resolve_data_dir(link)
        assert os.path.exists(os.path.join(os.path.dirname(real), "instruction.toml")), real

    # Prompt lengths against the manifest's --seq-len 1024 and gen_max_tokens 256.
    env.max_token_len = 1024
    lens = [env.prompt_length(env.messages(p)) for p in env.problems]
    fits = [env.fit_max_tokens(env.messages(p), 256) for p in env.problems]
    assert min(fits) == 256, f"some prompt leaves < 256 tokens under seq-len 1024: {min(fits)}"

    # evaluate(): only held-out problems, greedy, one sample each; answer 7 of them right.
    asked = []
    right = set(sorted(held)[:7])
    gold = {p["question"]: p for p in env.problems}

    async def fake_sample(_env, msgs, **kw):
        q = msgs[-1]["content"].split("\n\n", 1)[1]
        p = gold[q]
        asked.append((p["id"], kw["n"], kw["temperature"], kw["max_tokens"]))
        await asyncio.sleep(0)
        return ([f"so the answer is \\boxed{{{p['gold']}}}" if p["id"] in right else "I don't know"], ["stop"], [None])

    common.sample_group = fake_sample
    m = await env.evaluate(step=0, kind="start")
    assert {a[0] for a in asked} == held and len(asked) == 20, asked
    assert all(a[1] == 1 and a[2] == 0.0 and a[3] == 256 for a in asked), asked[:3]
    assert abs(m["eval/accuracy"] - 7 / 20) < 1e-12, m
    line = [x for x in cap.lines if x.startswith("gsm8k eval at step")][-1]
    mm = EVAL_RE.search(line)
    assert mm and mm.group(1) == "0" and float(mm.group(2)) == 0.35 and mm.group(3) == "20" \
        and mm.group(4) == "7" and mm.group(5) == "start" and mm.group(6) == "0", line

    # The training reward: exact match, plus format_bonus for a boxed number; never in evals.
    assert g.train_score("so \\boxed{12}", "12", 0.2) == 1.2
    assert g.train_score("so \\boxed{13}", "12", 0.2) == 0.2
    assert g.train_score("the answer is 12", "12", 0.2) == 1.0
    assert g.train_score("so \\boxed{x}", "12", 0.2) == 0.0
    assert g.train_score("so \\boxed{13}", "12") == 0.0
    assert g.train_score("\\boxed{1}</think> so 12", "12", 0.2) == 1.0

    # holdout=0: the old behaviour.
    env0 = make_env(gsm, tok, eval_limit=30)
    await env0.setup()
    assert len(env0.train_problems) == 100 and env0.eval_problems == env0.problems
    asked.clear()
    await env0.evaluate()
    assert [a[0] for a in asked] != [] and {a[0] for a in asked} == set(ids[:30]), len(asked)
    seen0 = {(await env0.get_next_item())["id"] for _ in range(500)}
    assert seen0 == set(ids)
    print(f"split: 80 train / 20 held out ({sorted(held)[0]} .. {sorted(held)[-1]}); prompt tokens "
          f"{min(lens)}..{max(lens)} (+256 completion < 1024); eval line: {line}")


async def check_schedule(gsm, tok, total=23, every=5, mbo=2, train_ticks=3):
    """A trainer that takes a queued batch every `train_ticks` ticks and an env that produces one
    per tick up to max_batches_offpolicy queued (never during an eval, as STOP_TRAIN does), so the
    queue is full when an eval starts and the trainer runs on through it; driving
    env.env_step_checks() as env_manager does."""
    env = make_env(gsm, tok, holdout=20, eval_every=every, max_batches_offpolicy=mbo, total_steps=total)
    await env.setup()
    assert env.config.steps_per_eval == 0
    env.max_token_len = 1024

    async def slow_sample(_env, msgs, **kw):
        await asyncio.sleep(0.004)  # an eval (20 problems, 16 at a time) spans several ticks
        return (["\\boxed{0}"], ["stop"], [None])

    common.sample_group = slow_sample
    evals = []  # (kind, step at start, trainer step at end)
    orig = env.evaluate

    async def wrapped(*a, step=None, kind="every", **kw):
        produced_at_start = produced
        r = await orig(*a, step=step, kind=kind, **kw)
        evals.append((kind, step, trainer, produced_at_start))
        return r

    env.evaluate = wrapped
    trainer, queue, produced, env_done = 0, 0, 0, False
    for tick in range(100000):
        if not env_done:
            env.status_dict = {"current_step": trainer, "queue_size": queue * 4}  # groups, 4 a batch
            await env.env_step_checks()
            running = env.eval_runner is not None and not env.eval_runner.done()
            env_done = trainer + queue > total  # env_manager's exit (queue counted in batches)
            if not env_done and not running and queue < mbo:
                queue += 1
                produced += 1
        if queue > 0 and trainer < total and tick % train_ticks == 0:
            queue -= 1
            trainer += 1
        if trainer >= total:
            break
        await asyncio.sleep(0.0005)
    kinds = [e[0] for e in evals]
    final_at = g.EvalSchedule.final_step(total, mbo)
    assert kinds[0] == "start" and evals[0][1] == 0 and evals[0][3] == 0, evals
    assert "final" in kinds, evals
    fin = evals[kinds.index("final")]
    assert fin[1] >= final_at and fin[2] < total, (fin, final_at)
    every_steps = [e[1] for e in evals if e[0] == "every"]
    assert every_steps and all(s % every == 0 for s in every_steps), every_steps
    assert trainer == total, trainer
    print(f"schedule (total {total}, eval_every {every}, max_batches_offpolicy {mbo}): "
          + ", ".join(f"{k}@{s}(trainer at {t} when done)" for k, s, t, _ in evals))


def main():
    gsm = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("GRPO_GSM8K", "")
    tok = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("GRPO_SMOLLM2", "")
    if not gsm or not tok:
        sys.exit("usage: check_gsm8k_env.py GSM_DIR TOKENIZER_DIR (or source scripts/setup.sh)")
    cap = Capture()
    common.log.addHandler(cap)
    common.log.setLevel(logging.INFO)
    common.log.propagate = False
    asyncio.run(check_split(gsm, tok, cap))
    asyncio.run(check_schedule(gsm, tok))
    asyncio.run(check_schedule(gsm, tok, total=200, every=25, mbo=3))
    print("check_gsm8k_env: OK")


if __name__ == "__main__":
    main()
