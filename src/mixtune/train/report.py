"""What a run leaves beside the model: metrics.json and a loss-curve PNG.

The figure is made to stay readable for long runs: the loss axis turns logarithmic when the loss spans more than
a factor of LOG_SPAN, a noisy curve of many points gets a smoothed line over the raw one, and from
TAIL_POINTS logged points on a second panel shows the last TAIL_FRACTION of the steps at their own scale (where
a long run's progress is otherwise a flat line at the bottom). Eval losses (overall and per entry) are drawn on
the loss panels; every other eval metric (generation scores, retrieval recall, top-1, ...) and the rewards of the
TRL-backed tasks share a panel of their own.
"""

from __future__ import annotations

import json
import os

LOG_SPAN = 10.0  # max/min loss ratio above which the loss axis is logarithmic
TAIL_POINTS = 50  # logged train losses from which the tail panel and the smoothed line are drawn
TAIL_FRACTION = 0.25
# Trainer figures that are not metrics of the model
NOT_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_loss")


def write_metrics(output_dir: str, log_history: list[dict], final: dict) -> str:
    path = os.path.join(output_dir, "metrics.json")
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    with open(path, "w") as f:
        json.dump({"final": final, "train_loss": train, "eval_loss": evals,
                   "generation_eval": generation_metrics(log_history), "eval_metrics": eval_metrics(log_history),
                   "rewards": reward_metrics(log_history),
                   "log_history": log_history}, f, indent=1)
    return path


def generation_metrics(log_history: list[dict]) -> dict[str, list]:
    """{"eval_exact_match": [(step, value), ...], ...}: the scores generation eval logged."""
    from mixtune.infer.metrics import METRICS

    return {k: v for k, v in eval_metrics(log_history).items() if k.endswith(METRICS)}


def eval_metrics(log_history: list[dict]) -> dict[str, list]:
    """Every numeric eval_* series but the overall loss and the timing figures: per-entry losses, generation
    scores, retrieval recall, top-1, ..."""
    out: dict[str, list] = {}
    for h in log_history:
        for key, value in h.items():
            if key.startswith("eval_") and key not in NOT_METRICS and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                out.setdefault(key, []).append((h["step"], value))
    return out


# What the TRL-backed tasks log while training (tasks/dpo.py, tasks/grpo.py): DPO's implicit reward margin and
# accuracy, GRPO's mean reward. Their eval_ forms are eval metrics like any other.
REWARD_KEYS = ("rewards/margins", "rewards/accuracies", "reward")


def reward_metrics(log_history: list[dict]) -> dict[str, list]:
    out: dict[str, list] = {}
    for h in log_history:
        for key in REWARD_KEYS:
            if key in h:
                out.setdefault(key, []).append((h["step"], h[key]))
    return out


def smoothed(values: list[float]) -> list[float]:
    """An exponential moving average over about 5% of the points, debiased at the start (as TensorBoard does)."""
    alpha = min(1.0, 2.0 / (max(len(values) // 20, 1) + 1))
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def wants_log_scale(values: list[float]) -> bool:
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def draw_losses(ax, train: list, evals: list, entry_losses: dict, log_scale: bool) -> None:
    if train:
        steps, values = zip(*train)
        long = len(train) >= TAIL_POINTS
        ax.plot(steps, values, color="C0", alpha=0.35 if long else 1.0, label="train loss" if not long else
                "train loss (raw)")
        if long:
            ax.plot(steps, smoothed(list(values)), color="C0", label="train loss (smoothed)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="C1", label="eval loss")
    for i, (key, points) in enumerate(entry_losses.items()):
        ax.plot(*zip(*points), "s--", color=f"C{i + 2}", markersize=3, label=key)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both" if log_scale else "major")


def loss_figure(log_history: list[dict]):
    """The matplotlib Figure of a run's losses and eval metrics; None when nothing was logged."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = eval_metrics(log_history)
    entry_losses = {k: v for k, v in metrics.items() if k.endswith("_loss")}
    scores = {**{k: v for k, v in metrics.items() if k not in entry_losses}, **reward_metrics(log_history)}
    all_losses = [v for _, v in train + evals] + [v for pts in entry_losses.values() for _, v in pts]
    tail = len(train) >= TAIL_POINTS
    panels = 1 + tail + bool(scores)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    main = axes.pop(0)
    draw_losses(main, train, evals, entry_losses, wants_log_scale(all_losses))
    main.set_title("loss")
    if tail:
        start = train[-1][0] - TAIL_FRACTION * (train[-1][0] - train[0][0])
        keep = lambda points: [p for p in points if p[0] >= start]  # noqa: E731
        ax = axes.pop(0)
        draw_losses(ax, keep(train), keep(evals), {k: keep(v) for k, v in entry_losses.items() if keep(v)}, False)
        ax.set_title(f"the last {int(TAIL_FRACTION * 100)}% of the steps")
    if scores:
        ax = axes.pop(0)
        for key, points in scores.items():
            ax.plot(*zip(*points), "o-", markersize=3, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("eval metric / reward")
        ax.set_title("eval metrics and rewards")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_loss(output_dir: str, log_history: list[dict]) -> str | None:
    fig = loss_figure(log_history)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, "loss_curve.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
