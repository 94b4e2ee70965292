"""The loss figure stays readable for a long run (log scale over a wide range, smoothed line, a tail panel at its
own scale) and draws every eval metric the run logged; metrics.json carries them."""

from __future__ import annotations

import json
import math
import random

from mixtune.train.report import eval_metrics, loss_figure, plot_loss, smoothed, write_metrics


def long_history(steps=400):
    rng = random.Random(0)
    history = [{"step": s, "loss": 10 * math.exp(-s / 40) + 0.1 + 0.02 * rng.random(), "epoch": s / 100}
               for s in range(1, steps + 1)]
    for s in range(100, steps + 1, 100):
        history.append({"step": s, "eval_loss": 0.2 + 1 / s, "eval_val_loss": 0.25 + 1 / s, "eval_top1": s / 500,
                        "eval_runtime": 1.5, "eval_samples_per_second": 30.0, "epoch": s / 100})
    return history


def lines(ax) -> dict:
    return {line.get_label(): line for line in ax.get_lines()}


def test_long_run_gets_log_scale_smoothing_and_a_tail_panel():
    fig = loss_figure(long_history())
    main, tail, scores = fig.axes
    assert main.get_yscale() == "log"  # the loss spans 10 -> 0.1
    assert {"train loss (raw)", "train loss (smoothed)", "eval loss", "eval_val_loss"} <= set(lines(main))
    steps = lines(tail)["train loss (raw)"].get_xdata()
    assert min(steps) >= 300 and max(steps) == 400  # the last quarter of the steps
    assert tail.get_yscale() == "linear" and tail.get_ylim()[1] < 0.5  # at the tail's own scale, not 0..10
    assert set(lines(scores)) == {"eval_top1"}  # timing figures are not metrics
    assert list(lines(scores)["eval_top1"].get_ydata()) == [0.2, 0.4, 0.6, 0.8]


def test_short_run_keeps_one_linear_panel():
    fig = loss_figure([{"step": s, "loss": 2.0 - 0.1 * s} for s in range(1, 6)])
    (ax,) = fig.axes
    assert ax.get_yscale() == "linear" and set(lines(ax)) == {"train loss"}
    assert loss_figure([{"step": 1, "epoch": 1.0}]) is None


def test_metrics_json_and_png_carry_the_eval_metrics(tmp_path):
    history = long_history()
    write_metrics(str(tmp_path), history, {"train_runtime": 1.0})
    saved = json.load(open(tmp_path / "metrics.json"))
    assert set(saved["eval_metrics"]) == {"eval_val_loss", "eval_top1"}
    assert saved["eval_metrics"]["eval_top1"] == [[100, 0.2], [200, 0.4], [300, 0.6], [400, 0.8]]
    assert eval_metrics(history) == {k: [tuple(p) for p in v] for k, v in saved["eval_metrics"].items()}
    path = plot_loss(str(tmp_path), history)
    assert path and (tmp_path / "loss_curve.png").stat().st_size > 10_000


def test_smoothing_keeps_a_constant_and_follows_a_step():
    import pytest

    assert smoothed([3.0] * 200) == pytest.approx([3.0] * 200, rel=1e-12)
    out = smoothed([1.0] * 100 + [0.0] * 100)
    assert out[99] == pytest.approx(1.0) and out[100] < 0.95 and out[-1] < 0.01
