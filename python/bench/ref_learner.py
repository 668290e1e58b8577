"""PyTorch reference learner: the Atropos example trainer's recipe (atroposlib 0.4.0,
example_trainer/{data,training,model}.py; /work/shared/reference/atropos-contract.md §3.3-3.5),
timed on synthetic batches from make_batches.py with a random-init Qwen2.5 shape.

Per step (= one Atropos /batch):
* preprocessing as `pad_data_to_good_offset`: every row padded to T = ceil((L-1)/64)*64 where L is the
  longest sequence of the whole step, pad id 0, labels = masks shifted by one with -100 padding, ref
  logprobs = inference_logprobs shifted by one with 1.0 padding, advantages = per-group
  (s - mean) / max(population std, 1e-8) in float64, temperatures 1.0 unless overridden, rows in group
  order, micro-batches of --batch-size rows;
* per micro-batch `compute_grpo_loss`: bf16 logits / t, logp = -cross_entropy(ignore_index=-100),
  ratio = exp(logp - ref) in bf16, clip eps 0.2 with the Atropos sign convention
  (-min(rA, clip(r)A) for A >= 0, -max(rA, clip(r)A) for A < 0), token mean per row, mean over rows,
  divided by gradient_accumulation_steps (= the number of micro-batches here), including the trainer's
  no-grad diagnostics (they cost time and memory there too); loss.backward();
* clip_grad_norm_(1.0), AdamW step (torch defaults), zero_grad(), torch.cuda.empty_cache().
No LR warmup (the trainer's default --warmup-steps 0): --warmup-steps here only drops steps from timing.

Model: transformers Qwen2 from config (random init, seeded), sdpa attention, bf16 parameters (no fp32
master copy, as the trainer), use_cache False, input-require-grads + non-reentrant gradient
checkpointing, train mode.

Timing: step_s is the mean over the timed steps of the wall time of the training step proper
(H2D copies, micro-batches, clip, optimizer, empty_cache) between torch.cuda.synchronize() calls, as
the trainer's own step_time; the numpy preprocessing is timed apart (prep_s), as in the trainer it
happens in get_data. peak_mem_gib is torch.cuda.max_memory_allocated() over all steps, warmup
included: the peak counter is reset once after model + optimizer creation and before the first step,
so it includes AdamW's lazily allocated state (created in the first optimizer.step()).

Prints one line `RESULT {json}` and writes the same JSON to --out.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import SHAPES, matmul_params, model_flops, tiny_shape  # noqa: E402

PAD_MULTIPLE = 64


# ---------------------------------------------------------------- preprocessing (§3.3)
def _temperature(group, i):
    """overrides[i] > generation_params > group_overrides > 1.0"""
    ov, gp, go = group.get("overrides"), group.get("generation_params"), group.get("group_overrides")
    if ov and i < len(ov) and isinstance(ov[i], dict) and "temperature" in ov[i]:
        return float(ov[i]["temperature"])
    if gp and "temperature" in gp:
        return float(gp["temperature"])
    if go and "temperature" in go:
        return float(go["temperature"])
    return 1.0


def pad_batch(groups, batch_size):
    """-> (micro-batches [(tokens, labels, advantages, temperatures, ref_logprobs)], T)."""
    longest = max(len(t) for g in groups for t in g["tokens"])
    T = math.ceil((longest - 1) / PAD_MULTIPLE) * PAD_MULTIPLE  # model input length
    setup = T + 1
    ids, labels, advs, temps, refs = [], [], [], [], []
    has_logprobs = False
    for g in groups:
        s = np.array(g["scores"])
        if len(s) > 1:
            s = s - s.mean()
            s = s / max(s.std(), 1e-8)  # population std (ddof=0)
        for i, ov in enumerate(g.get("overrides") or []):
            if ov.get("set_advantage_to_zero", False):
                s[i] = 0
        lps = g.get("inference_logprobs")
        for i, tok in enumerate(g["tokens"]):
            pad = max(0, setup - len(tok))
            labels.append(np.concatenate([np.array(g["masks"][i]), np.full(pad, -100, dtype=np.int32)])[1:])
            ids.append(np.concatenate([np.array(tok), np.zeros(pad, dtype=np.int32)])[:-1])
            advs.append(s[i])
            ref = np.full(setup, 1.0, dtype=np.float32)
            if lps is not None and i < len(lps):
                raw = np.array(lps[i], dtype=np.float32)
                n = min(len(raw), setup)
                ref[:n] = raw[:n]
                has_logprobs = True
            refs.append(ref[1:])
            temps.append(_temperature(g, i))
    if not has_logprobs:
        raise ValueError("GRPO requires inference_logprobs")
    mbs = []
    for a in range(0, len(ids), batch_size):
        b = a + batch_size
        mbs.append((torch.tensor(np.stack(ids[a:b])),
                    torch.tensor(np.stack(labels[a:b])),
                    torch.tensor(np.stack(advs[a:b])).view(-1, 1),
                    torch.tensor(np.array(temps[a:b], dtype=np.float32)).view(-1, 1, 1),
                    torch.tensor(np.stack(refs[a:b]))))
    return mbs, T


# ---------------------------------------------------------------- loss (§3.4)
_gap_warned = [False]


def grpo_loss(model, tokens, labels, advantages, temperatures, ga_steps, inference_logprobs, clip_eps=0.2):
    logits = model(tokens).logits  # [B,T,V], bf16
    t = temperatures.to(logits.device, logits.dtype)
    t = torch.where(t <= 0, torch.ones_like(t), t)
    scaled = logits / t
    logp = -F.cross_entropy(scaled.view(-1, scaled.size(-1)), labels.view(-1),
                            reduction="none", ignore_index=-100).view(labels.shape)
    mask = (labels != -100).float()
    mask_sum = mask.sum(dim=-1).clamp_min(1e-8)
    adv = advantages.expand_as(logp).to(logp.device)
    ref = inference_logprobs.to(logp.device, logp.dtype)  # bf16

    with torch.no_grad():  # the trainer's alignment diagnostics
        ref_at_gen = (ref * mask).sum() / mask.sum()
        train_at_gen = (logp * mask).sum() / mask.sum()
        diff = logp[mask.bool()].detach() - ref[mask.bool()].detach()
        diag = (diff.mean().item(), diff.abs().mean().item(), diff.abs().max().item())
        if ref_at_gen > 0.5:
            print(f"    [WARNING] ref_logprobs avg {ref_at_gen:.3f} (should be negative!)")
        elif abs(ref_at_gen - train_at_gen) > 2.0 and not _gap_warned[0]:
            _gap_warned[0] = True  # the trainer prints this every micro-batch; once is enough here
            print(f"    [DEBUG] Logprob gap: ref={ref_at_gen:.3f}, train={train_at_gen:.3f} (printed once)")

    ratio = torch.exp(logp - ref)
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    surr1, surr2 = ratio * adv, clipped * adv
    per_tok = -torch.where(adv >= 0, torch.min(surr1, surr2), torch.max(surr1, surr2))
    policy_loss = ((per_tok * mask).sum(dim=-1) / mask_sum).mean()
    loss = policy_loss / ga_steps

    with torch.no_grad():  # the trainer's metrics
        clip_frac = ((((ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)).float() * mask).sum() / mask.sum()).item()
        mean_ratio = ((ratio * mask).sum() / mask.sum()).item()
        raw_logp = -F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1),
                                    reduction="none", ignore_index=-100).view(labels.shape)
        _training_logprobs = raw_logp[mask.bool()].detach()
        pos, neg = (advantages > 0).float(), (advantages <= 0).float()
        avg_logp = (logp * mask.to(logp.dtype)).sum(dim=-1) / mask_sum
        metrics = {"pos_logp": (logp * pos).mean().item(), "neg_logp": (logp * neg).mean().item(),
                   "interpretable_loss": (avg_logp * advantages.squeeze()).mean().item(),
                   "mean_ratio": mean_ratio, "clipped_fraction": clip_frac, "logprob_diff": diag}
    return loss, metrics


# ---------------------------------------------------------------- step (§3.5)
def train_step(model, optimizer, mbs, device, clip_eps=0.2):
    ga_steps = len(mbs)
    total = 0.0
    for tokens, labels, adv, temps, ref in mbs:
        loss, _ = grpo_loss(model, tokens.to(device), labels.to(device), adv.to(device), temps,
                            ga_steps, ref, clip_eps)
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return total, float(grad_norm)


# ---------------------------------------------------------------- model
def build_model(shape, device, seed):
    from transformers import AutoModelForCausalLM, Qwen2Config
    kw = {k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                "rms_norm_eps", "tie_word_embeddings")}
    kw.update(hidden_act="silu", use_sliding_window=False, attention_dropout=0.0, use_cache=False)
    fields = set(getattr(Qwen2Config, "__dataclass_fields__", {}))
    try:
        import inspect
        fields |= set(inspect.signature(Qwen2Config.__init__).parameters)
    except (TypeError, ValueError):
        pass
    if "rope_parameters" in fields:  # transformers 5.x
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": shape["rope_theta"]}
    else:  # transformers 4.x
        kw["rope_theta"] = shape["rope_theta"]
    cfg = Qwen2Config(**kw)
    rp = getattr(cfg, "rope_parameters", None)
    theta = rp.get("rope_theta") if isinstance(rp, dict) else getattr(cfg, "rope_theta", None)
    assert theta == shape["rope_theta"], f"rope_theta not applied: {theta}"

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as from_pretrained(torch_dtype=bf16) builds it
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model.to(device)
    for p in model.parameters():  # bf16 params; buffers (RoPE inv_freq) keep their dtype
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
    model.config.use_cache = False
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", required=True, help="JSON from make_batches.py")
    p.add_argument("--shape", required=True, choices=sorted(SHAPES) + ["tiny"])
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch rows")
    p.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of the timing")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="result.json")
    p.add_argument("--lora-r", type=int, default=0,
                   help="PEFT LoRA of this rank on all seven linear modules (alpha 2r, dropout 0.05), "
                        "as the Atropos trainer's lora modes build it; 0 trains the full weights")
    a = p.parse_args()

    with open(a.batches) as f:
        data = json.load(f)
    steps = data["steps"]
    if len(steps) <= a.warmup_steps:
        p.error(f"{len(steps)} steps in the file, need more than --warmup-steps {a.warmup_steps}")
    shape = tiny_shape(data["vocab"]) if a.shape == "tiny" else SHAPES[a.shape]
    assert data["vocab"] <= shape["vocab_size"], "token ids exceed the model vocab"
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if cuda and device.index is not None:
        torch.cuda.set_device(device)

    model = build_model(shape, device, a.seed)
    if a.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.05, bias="none",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr)
    n_params = sum(q.numel() for q in model.parameters())

    if cuda:
        torch.cuda.synchronize()
        setup_mem = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()  # once: the peak includes AdamW state made in step 0
    rec = {k: [] for k in ("step_s", "prep_s", "loss", "grad_norm", "T", "train_tokens",
                           "padded_tokens", "flops")}
    for i, groups in enumerate(steps):
        t0 = time.perf_counter()
        mbs, T = pad_batch(groups, a.batch_size)
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        loss, gnorm = train_step(model, optimizer, mbs, device)
        if cuda:
            torch.cuda.synchronize()
        t3 = time.perf_counter()
        lens = [len(t) - 1 for g in groups for t in g["tokens"]]
        for k, v in (("step_s", t3 - t2), ("prep_s", t1 - t0), ("loss", loss), ("grad_norm", gnorm),
                     ("T", T), ("train_tokens", sum(lens)), ("padded_tokens", len(lens) * T),
                     ("flops", model_flops(shape, lens))):
            rec[k].append(v)
        print(f"step {i}: {t3 - t2:.3f}s T={T} rows={len(lens)} micro-batches={len(mbs)} "
              f"loss={loss:.6g} grad_norm={gnorm:.4g}" + (" (warmup)" if i < a.warmup_steps else ""),
              flush=True)

    w = a.warmup_steps
    mean = lambda k: sum(rec[k][w:]) / len(rec[k][w:])  # noqa: E731
    step_s = mean("step_s")
    result = {
        "shape": a.shape, "params": n_params, "lora_r": a.lora_r,
        "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad), "matmul_params": matmul_params(shape),
        "batch_size": a.batch_size, "micro_batches": len(mbs), "lr": a.lr,
        "steps_total": len(steps), "steps_timed": len(steps) - w, "warmup_steps": w,
        "step_s": step_s, "prep_s": mean("prep_s"),
        "train_tokens": mean("train_tokens"), "padded_tokens": mean("padded_tokens"),
        "tokens_per_s": mean("train_tokens") / step_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "setup_mem_gib": setup_mem if cuda else None,
        "model_flops_per_step": mean("flops"),
        "losses": rec["loss"], "grad_norms": rec["grad_norm"], "step_times_s": rec["step_s"],
        "padded_len": rec["T"],
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "recipe": "atropos-example-trainer",
    }
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
