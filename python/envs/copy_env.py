"""Copy task: the model must repeat a short string of symbols, then stop.

Built for the tiny demo model (python/tools/make_demo_model.py), which a random-init policy can
learn by RL alone on CPU in minutes. The user message is a random string over `symbols`
(length `min_len`..`max_len`); the reply should be the same string followed by </s>.

Reward (exact and deterministic, in [0, 1]; dense so GRPO has signal from the first step):
    (1 - stop_bonus) * #{i : reply[i] == target[i]} / max(len(target), len(reply))
  + stop_bonus       * [the reply stopped (finish_reason "stop") and len(reply) == len(target)]
`reply` is the completion minus its final </s> (details below). Dividing by the longer of the two lengths gives
partial credit per correct position and makes every extra symbol cost something, so the policy
learns to stop (a reply cut off by max_tokens is always longer than the target). A policy that
emits uniform symbols and never stops scores (1 - stop_bonus) * L / (L + extra_tokens) / len(symbols)
(0.12 for the defaults), the random-init demo model about 0.06; a perfect one scores 1.0.

`reply` is decoded from the completion's token ids with special tokens KEPT (only a final
</s> is removed when the engine reports finish_reason "stop"). ManagedServer's own text uses
skip_special_tokens=True, under which a policy can pad its reply with invisible <s>/<pad> tokens and
still be scored as a perfect copy -- a reward hack a tiny policy found within 200 steps.

    python python/envs/copy_env.py serve --env.tokenizer_name MODEL_DIR \\
        --env.rollout_server_url http://127.0.0.1:8000 \\
        --openai.base_url http://127.0.0.1:9001/v1 --openai.server_type vllm
"""
import random
import time
from typing import List, Optional, Tuple

from pydantic import Field

from atroposlib.envs.base import BaseEnvConfig, ScoredDataGroup

import env_common as common


class CopyEnvConfig(BaseEnvConfig):
    symbols: str = Field(default="abcd", description="alphabet; each character must be one token")
    min_len: int = Field(default=3, description="shortest target string")
    max_len: int = Field(default=3, description="longest target string")
    extra_tokens: int = Field(default=2, description="max_tokens = max_len + extra_tokens (room for </s> and overrun)")
    stop_bonus: float = Field(default=0.2, description="share of the reward for stopping at the right length")
    temperature: float = Field(default=1.0, description="sampling temperature sent to /generate")
    top_p: float = Field(default=1.0, description="sent to /generate only when < 1")
    seed: int = Field(default=0, description="seed of the prompt stream")
    eval_size: int = Field(default=32, description="greedy (temperature 0) prompts per evaluation; 0 skips it")


def score_copy(target: str, reply: str, stopped: bool, stop_bonus: float) -> float:
    """The reward described in the module docstring."""
    matches = sum(1 for a, b in zip(target, reply) if a == b)
    exact_stop = stopped and len(reply) == len(target)
    return (1.0 - stop_bonus) * matches / max(len(target), len(reply)) + (stop_bonus if exact_stop else 0.0)


class CopyEnv(common.GrpoEnv):
    name = "copy"
    env_config_cls = CopyEnvConfig

    def __init__(self, config: CopyEnvConfig, server_configs, slurm=False, testing=False):
        super().__init__(config, server_configs, slurm, testing)
        self.rng = random.Random(config.seed)
        self.recent_scores: List[float] = []

    @classmethod
    def config_init(cls) -> Tuple[CopyEnvConfig, list]:
        env_config = CopyEnvConfig(
            tokenizer_name="",            # required: --env.tokenizer_name MODEL_DIR
            group_size=16,
            max_token_length=64,          # what the env registers; generation length is max_tokens
            batch_size=-1,                # taken from the trainer's /register via GET /info
            total_steps=-1,               # follow the trainer's num_steps
            steps_per_eval=20,
            max_batches_offpolicy=1,      # rollouts at most one optimizer step old
            use_wandb=False,
            ensure_scores_are_not_same=False,  # keep all-equal groups: unbiased reward curve, and
                                               # a converged policy does not starve the trainer
            include_messages=False,
            wandb_name="copy",
            rollout_server_url=common.DEFAULT_API_URL,
        )
        return env_config, common.server_configs()

    async def setup(self):
        cfg = self.config
        if not (1 <= cfg.min_len <= cfg.max_len):
            raise SystemExit("need 1 <= min_len <= max_len")
        # Every symbol must be exactly one token, or positions stop lining up with characters.
        for ch in cfg.symbols:
            ids = self.tokenizer.encode(ch, add_special_tokens=False)
            if len(ids) != 1 or ids[0] == self.tokenizer.unk_token_id:
                raise SystemExit(f"symbol {ch!r} is not a single known token in {cfg.tokenizer_name}")
        eval_rng = random.Random(cfg.seed + 1_000_003)
        self.eval_items = [self._random_target(eval_rng) for _ in range(cfg.eval_size)]
        self.sent = 0

    def _random_target(self, rng: random.Random) -> str:
        n = rng.randint(self.config.min_len, self.config.max_len)
        return "".join(rng.choice(self.config.symbols) for _ in range(n))

    def _gen_kwargs(self, messages, n: int, temperature: float):
        max_tokens = self.fit_max_tokens(messages, self.config.max_len + self.config.extra_tokens)
        return common.generation_kwargs(n, max_tokens, temperature, self.config.top_p)

    def reply_text(self, node, finish_reason: str) -> str:
        """The completion as text, special tokens kept except the final stop token."""
        ids = [t for t in node.masked_tokens if t != -100]
        if finish_reason == "stop" and ids and ids[-1] in self.tokenizer.all_special_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    async def get_next_item(self) -> str:
        return self._random_target(self.rng)

    async def collect_trajectories(self, item: str) -> Tuple[Optional[ScoredDataGroup], list]:
        messages = [{"role": "user", "content": item}]
        kw = self._gen_kwargs(messages, self.config.group_size, self.config.temperature)
        if kw["max_tokens"] < len(item) + 1:
            common.log.warning("copy: trainer max_token_len %d leaves no room for %r", self.max_token_len, item)
            return None, []
        _, finish, nodes = await common.sample_group(self, messages, **kw)
        texts = [self.reply_text(n, f) for n, f in zip(nodes, finish)]
        scores = [score_copy(item, t, f == "stop", self.config.stop_bonus)
                  for t, f in zip(texts, finish)]
        self.recent_scores.extend(scores)
        self.sent += 1
        if self.sent % 10 == 0:
            mean = sum(self.recent_scores) / len(self.recent_scores)
            common.log.info("copy: %d groups, mean score of the last %d samples %.3f (e.g. %r -> %r)",
                            self.sent, len(self.recent_scores), mean, item, texts[0])
            self.recent_scores = []
        return common.build_group(nodes, scores, kw), []

    async def evaluate(self, *args, **kwargs):
        """Greedy copy accuracy on a fixed prompt set (logged; sent to wandb when enabled)."""
        if not self.eval_items:
            return
        start = time.time()
        scores, exact = [], 0
        for target in self.eval_items:
            messages = [{"role": "user", "content": target}]
            kw = self._gen_kwargs(messages, 1, 0.0)
            _, finish, nodes = await common.sample_group(self, messages, **kw)
            texts = [self.reply_text(nodes[0], finish[0])]
            s = score_copy(target, texts[0], finish[0] == "stop", self.config.stop_bonus)
            scores.append(s)
            exact += int(texts[0] == target and finish[0] == "stop")
        metrics = {"eval/mean_score": sum(scores) / len(scores), "eval/exact": exact / len(scores)}
        common.log.info("copy eval at step %s: %s (%.1fs)", self.curr_step, metrics, time.time() - start)
        if self.config.use_wandb:
            await self.wandb_log(metrics)


if __name__ == "__main__":
    common.setup_logging()
    CopyEnv.cli()
