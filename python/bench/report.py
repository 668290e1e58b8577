"""Markdown comparison of the learner benchmark results: reference (ref_learner.py, the Atropos
example trainer's recipe) vs ours (grpo-node), optionally vs ours without sequence packing.

    python report.py ref.json ours.json [ours_padded.json] [--peak-tflops X]

Each file holds one result (the JSON written by --out), a JSON list of them, or text with one
result per line (optionally prefixed `RESULT `). Rows are matched by "shape". Keys read: shape,
batch_size, step_s, train_tokens, padded_tokens, tokens_per_s, peak_mem_gib, model_flops_per_step;
a missing one prints "n/a". MFU = model_flops_per_step / step_s / (peak TFLOP/s * 1e12).
Packing gain = ours tokens/s / ours_padded tokens/s.
"""
import argparse
import json


def load(path):
    with open(path) as f:
        text = f.read()
    try:
        obj = json.loads(text)
        items = obj if isinstance(obj, list) else [obj]
    except json.JSONDecodeError:
        items = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("RESULT "):
                line = line[len("RESULT "):]
            if line.startswith("{"):
                items.append(json.loads(line))
    return {r.get("shape", "?"): r for r in items if isinstance(r, dict)}


def num(r, key):
    v = (r or {}).get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def tps(r):
    v = num(r, "tokens_per_s")
    if v is None and num(r, "train_tokens") and num(r, "step_s"):
        v = num(r, "train_tokens") / num(r, "step_s")
    return v


def mfu(r, peak):
    f, s = num(r, "model_flops_per_step"), num(r, "step_s")
    return f / s / (peak * 1e12) if f is not None and s and peak else None


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref")
    p.add_argument("ours")
    p.add_argument("ours_padded", nargs="?")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak (flops.py --peak)")
    a = p.parse_args()
    ref, ours = load(a.ref), load(a.ours)
    padded = load(a.ours_padded) if a.ours_padded else {}
    shapes = list(ref) + [s for s in ours if s not in ref]

    cols = ["shape", "batch", "ref tok/s", "ours tok/s", "ours/ref", "ref step s", "ours step s",
            "ref mem GiB", "ours mem GiB", "mem ours/ref", "ref MFU", "ours MFU"]
    if a.ours_padded:
        cols += ["ours padded tok/s", "packing gain"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for s in shapes:
        r, o, q = ref.get(s), ours.get(s), padded.get(s)
        rt, ot = tps(r), tps(o)
        rm, om = num(r, "peak_mem_gib"), num(o, "peak_mem_gib")
        bs = (r or o or {}).get("batch_size", "n/a")
        row = [s, str(bs), fmt(rt, ",.0f"), fmt(ot, ",.0f"), fmt(ratio(ot, rt), ".2f") + ("x" if ot and rt else ""),
               fmt(num(r, "step_s"), ".3f"), fmt(num(o, "step_s"), ".3f"),
               fmt(rm, ".2f"), fmt(om, ".2f"), fmt(ratio(om, rm), ".2f"),
               fmt(mfu(r, a.peak_tflops), ".1%"), fmt(mfu(o, a.peak_tflops), ".1%")]
        if a.ours_padded:
            qt = tps(q)
            g = ratio(ot, qt)
            row += [fmt(qt, ",.0f"), fmt(g, ".2f") + ("x" if g else "")]
        print("| " + " | ".join(row) + " |")
    if a.peak_tflops:
        print(f"\nMFU against a bf16 peak of {a.peak_tflops:g} TFLOP/s; model FLOPs as in flops.py "
              "(6*P*tokens + causal attention, no recomputation).")
    else:
        print("\nMFU n/a: pass --peak-tflops (python flops.py --peak measures it).")


if __name__ == "__main__":
    main()
