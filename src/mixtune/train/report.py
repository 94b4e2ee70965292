"""What a run leaves beside the model: metrics.json and a loss-curve PNG."""

from __future__ import annotations

import json
import os


def write_metrics(output_dir: str, log_history: list[dict], final: dict) -> str:
    path = os.path.join(output_dir, "metrics.json")
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    with open(path, "w") as f:
        json.dump({"final": final, "train_loss": train, "eval_loss": evals, "log_history": log_history}, f,
                  indent=1)
    return path


def plot_loss(output_dir: str, log_history: list[dict]) -> str | None:
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
