"""What a run leaves beside the model: metrics.json and a loss-curve PNG (with a panel for generation-eval
metrics when `eval_with_do_generation` logged any)."""

from __future__ import annotations

import json
import os


def write_metrics(output_dir: str, log_history: list[dict], final: dict) -> str:
    path = os.path.join(output_dir, "metrics.json")
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    with open(path, "w") as f:
        json.dump({"final": final, "train_loss": train, "eval_loss": evals,
                   "generation_eval": generation_metrics(log_history), "rewards": reward_metrics(log_history),
                   "log_history": log_history}, f, indent=1)
    return path


def generation_metrics(log_history: list[dict]) -> dict[str, list]:
    """{"eval_exact_match": [(step, value), ...], ...}: the scores generation eval logged."""
    from mixtune.infer.metrics import METRICS

    out: dict[str, list] = {}
    for h in log_history:
        for key, value in h.items():
            if key.startswith("eval") and key.endswith(METRICS):
                out.setdefault(key, []).append((h["step"], value))
    return out


# What the TRL-backed tasks log (tasks/dpo.py, tasks/grpo.py): DPO's implicit reward margin and accuracy, GRPO's
# mean reward; each also with the eval_ prefix
REWARD_KEYS = ("rewards/margins", "rewards/accuracies", "reward")


def reward_metrics(log_history: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for h in log_history:
        for key in REWARD_KEYS:
            for name in (key, f"eval_{key}"):
                if name in h:
                    out.setdefault(name, []).append((h["step"], h[name]))
    return out


def plot_loss(output_dir: str, log_history: list[dict]) -> str | None:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = {**generation_metrics(log_history), **reward_metrics(log_history)}
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(12 if scores else 6, 4), squeeze=False)
    ax = axes[0][0]
    if scores:
        panel = axes[0][1]
        for key, points in scores.items():
            panel.plot(*zip(*points), "o-", label=key)
        panel.set_xlabel("optimizer step")
        panel.set_ylabel("generation eval / rewards")
        panel.legend()
        panel.grid(alpha=0.3)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    path = os.path.join(output_dir, "loss_curve.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
