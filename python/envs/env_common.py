"""Shared plumbing for grpo-node's Atropos environments (atroposlib 0.4.0, server_type "vllm").

Each env in this directory is a BaseEnv subclass that samples a whole group with one
`/generate` call (n = group_size) through ManagedServer and turns the tracked sequence nodes into a
ScoredDataGroup with tokens, masks, scores, inference_logprobs and generation_params. What lives
here works around atroposlib traps so that no env repeats them:

* server_configs() returns a *list* of APIServerConfig: a bare APIServerConfig or ServerBaseline
  makes atroposlib silently target localhost:9004-9007 and ignore --openai.base_url.
* fill_server_tokenizer() points each server's tokenizer at the env's tokenizer when it would
  otherwise fall back to openai.model_name (a hub id that cannot load offline).
* setup_logging() attaches a handler; atroposlib's loggers have none, so INFO is invisible.
* GrpoEnv checks the batch geometry the trainer registered (batch_size must be a multiple of
  group_size, or run-api never forms a batch) and caps max_tokens so that no sequence reaches the
  trainer's max_token_len (BaseEnv silently drops a whole group if one sequence does).
"""
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from atroposlib.envs.base import BaseEnv, ScoredDataGroup
from atroposlib.envs.server_handling.server_baseline import APIServerConfig

DEFAULT_API_URL = "http://localhost:8000"
DEFAULT_INFERENCE_URL = "http://localhost:9001/v1"

log = logging.getLogger("grpo_envs")


def setup_logging():
    """Send logs to stderr: ours at $GRPO_ENV_LOG (default INFO), atroposlib's at $ATROPOS_LOG
    (default WARNING; its INFO level logs the status dict ten times a second)."""
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, var, default in (("grpo_envs", "GRPO_ENV_LOG", "INFO"),
                               ("atroposlib", "ATROPOS_LOG", "WARNING")):
        level = os.environ.get(var, default).upper()
        handler = logging.StreamHandler(sys.stderr)
        handler.setLevel(level)  # atroposlib.envs.base sets its own logger to DEBUG at import
        handler.setFormatter(fmt)
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False


def server_configs(model_name: str = "default", base_url: str = DEFAULT_INFERENCE_URL,
                   tokenizer_name: str = "none", timeout: int = 1200,
                   max_requests: int = 64) -> List[APIServerConfig]:
    """The one-element server list every env here returns from config_init (see module doc)."""
    return [APIServerConfig(
        model_name=model_name,
        base_url=base_url,
        api_key="x",  # must be non-empty even for vllm; sent as "Authorization: Bearer x"
        server_type="vllm",
        tokenizer_name=tokenizer_name,
        timeout=timeout,
        num_max_requests_at_once=max_requests,
        num_requests_for_eval=max_requests,
        health_check=True,
    )]


def fill_server_tokenizer(server_cfgs, env_tokenizer: str):
    """Make every server config load `env_tokenizer` unless the user named one for it.

    VLLMServer loads its own tokenizer from `tokenizer_name`, or from `model_name` when that is
    "none"; model_name is never sent to /generate, so it is usually a served name, not a path.
    """
    cfgs = server_cfgs if isinstance(server_cfgs, list) else [server_cfgs]
    for cfg in cfgs:
        if isinstance(cfg, APIServerConfig) and cfg.tokenizer_name in ("none", "", None) \
                and not os.path.isdir(cfg.model_name or ""):
            cfg.tokenizer_name = env_tokenizer
    return server_cfgs


def check_local_dir(path: str, what: str):
    """Fail fast (offline runs cannot fetch from the hub) if `path` is not a local directory."""
    if not path or not os.path.isdir(path):
        raise SystemExit(f"{what} must be a local model/tokenizer directory, got {path!r} "
                         f"(pass --env.tokenizer_name DIR)")


def generation_kwargs(n: int, max_tokens: int, temperature: float, top_p: float = 1.0,
                      extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Sampling kwargs for ManagedServer.chat_completion; BaseEnv adds none of its own, so the
    inference server only sees what is listed here (plus "logprobs": 0 and the prompt ids)."""
    kw: Dict[str, Any] = {"n": n, "max_tokens": max_tokens, "temperature": temperature}
    if top_p < 1.0:
        kw["top_p"] = top_p
    if extra:
        kw.update(extra)
    return kw


async def sample_group(env, messages: List[Dict[str, str]], **gen_kwargs):
    """One /generate call with n samples. Returns (texts, finish_reasons, nodes)."""
    async with env.server.managed_server(tokenizer=env.tokenizer) as managed:
        completion = await managed.chat_completion(messages=messages, **gen_kwargs)
        nodes = managed.get_state()["nodes"]
    texts = [c.message.content or "" for c in completion.choices]
    finish = [c.finish_reason for c in completion.choices]
    if len(nodes) != len(texts):
        raise RuntimeError(f"ManagedServer tracked {len(nodes)} nodes for {len(texts)} choices")
    return texts, finish, nodes


def build_group(nodes: Sequence[Any], scores: Sequence[float], gen_params: Dict[str, Any],
                messages: Optional[List[List[Dict[str, str]]]] = None) -> ScoredDataGroup:
    """ScoredDataGroup from ManagedServer nodes: prompt positions masked with -100 and given
    inference logprob 1.0, completion positions carry the token id and the engine's logprob."""
    group = ScoredDataGroup()
    group["tokens"] = [list(n.tokens) for n in nodes]
    group["masks"] = [list(n.masked_tokens) for n in nodes]
    group["inference_logprobs"] = [list(n.logprobs) for n in nodes]
    group["scores"] = [float(s) for s in scores]
    group["generation_params"] = {k: v for k, v in gen_params.items()
                                  if k in ("temperature", "top_p", "max_tokens")}
    if messages is not None:
        group["messages"] = messages
    # Leave group_overrides unset: handle_send_to_api does group.get("group_overrides", {}).get(...),
    # which raises on an explicit None. BaseEnv setdefaults the remaining optional keys to None.
    return group


class GrpoEnv(BaseEnv):
    """BaseEnv plus the checks above. Subclasses still implement config_init, setup,
    get_next_item, collect_trajectories and evaluate."""

    def __init__(self, config, server_configs, slurm=False, testing=False):
        check_local_dir(config.tokenizer_name, "--env.tokenizer_name")
        fill_server_tokenizer(server_configs, config.tokenizer_name)
        super().__init__(config, server_configs, slurm, testing)

    async def get_server_info(self):
        await super().get_server_info()
        bs, gs = self.config.batch_size, self.config.group_size
        if bs > 0 and bs % gs != 0:
            raise SystemExit(f"trainer batch_size {bs} is not a multiple of group_size {gs}: "
                             "run-api would never form a batch")
        log.info("%s: trainer batch_size=%d (%d groups of %d), max_token_len=%d",
                 self.name, bs, bs // gs if gs else 0, gs, self.max_token_len)

    def prompt_length(self, messages) -> int:
        """Token count of the prompt exactly as ManagedServer builds it."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        bos = self.tokenizer.bos_token_id
        if len(ids) >= 2 and bos is not None and ids[0] == bos == ids[1]:
            ids = ids[1:]
        return len(ids)

    def fit_max_tokens(self, messages, max_tokens: int) -> int:
        """max_tokens, lowered so prompt + completion stays below the trainer's max_token_len."""
        if self.max_token_len <= 0:
            return max_tokens
        room = self.max_token_len - 1 - self.prompt_length(messages)
        if room < 1:
            return 0
        return min(max_tokens, room)
