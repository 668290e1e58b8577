"""Plots reward (and loss) per step from a grpo-node metrics.jsonl into a PNG.

    python python/tools/plot_metrics.py RUN/checkpoints/metrics.jsonl RUN/reward.png
"""
import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("metrics")
    ap.add_argument("out")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.metrics) if line.strip()]
    if not rows:
        raise SystemExit("no steps in " + args.metrics)
    steps = [r["step"] for r in rows]
    reward = [r.get("reward_mean", float("nan")) for r in rows]
    window = max(1, len(rows) // 10)
    smooth = [sum(reward[max(0, i - window + 1):i + 1]) / len(reward[max(0, i - window + 1):i + 1]) for i in range(len(reward))]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(steps, reward, alpha=0.35, label="reward (batch mean)")
    ax1.plot(steps, smooth, linewidth=2, label=f"reward ({window}-step mean)")
    ax1.set_ylabel("reward")
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [r.get("loss", float("nan")) for r in rows], color="tab:red", label="loss")
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("loss")
    ax2.grid(alpha=0.3)
    fig.suptitle("grpo-node: reward vs step")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
