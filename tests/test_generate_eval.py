"""`eval_with_do_generation`: each evaluation also answers the eval set by generation; the scores are logged
(metrics.json, the figure), equal those of that evaluation's own predictions, and pick the best checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from mixtune.config import load_config
from mixtune.infer.metrics import score
from mixtune.train.run import train

from conftest import write_config


def gen_eval_config(tmp_path, model, data, **overrides):
    val = os.path.join(data, "val.json")
    return write_config(tmp_path, model, os.path.join(data, "train.json"),
                        dataset={"train": [{"name": "chatml_dataset", "data_files": os.path.join(data, "train.json")}],
                                 "eval": [{"name": "chatml_dataset", "data_files": val, "max_samples": 6}]},
                        eval_with_do_generation=True, generation_max_new_tokens=4, **overrides)


def test_generation_metrics_logged_and_used_for_best_model(tiny_model_dir, demo_data_dir, tmp_path):
    cfg = gen_eval_config(tmp_path, tiny_model_dir("qwen2_vl"), demo_data_dir, max_steps=4, eval_strategy="steps",
                          eval_steps=2, save_strategy="steps", save_steps=2, metric_for_best_model="rouge_l",
                          load_best_model_at_end=True, per_device_eval_batch_size=4)
    config = load_config(cfg)
    final = train(config)
    out = config.training.output_dir
    with open(os.path.join(out, "metrics.json")) as f:
        logged = json.load(f)
    curves = logged["generation_eval"]
    assert set(curves) == {"eval_exact_match", "eval_vqa_accuracy", "eval_bleu4", "eval_rouge_l", "eval_cider"}
    assert [step for step, _ in curves["eval_rouge_l"]][:2] == [2, 4]
    for step, value in curves["eval_exact_match"][:2]:  # each logged score is that evaluation's predictions'
        with open(os.path.join(out, "generation_eval", f"step-{step}", "predictions.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert len(rows) == 6
        assert value == pytest.approx(score([r["prediction"] for r in rows], [r["references"] for r in rows])[
            "exact_match"])
    assert "eval_rouge_l" in final and "eval_cider" in final
    state = json.load(open(os.path.join(out, "trainer_state.json")))
    values = [v for _, v in curves["eval_rouge_l"][:2]]
    assert state["best_metric"] == pytest.approx(max(values))
    best_step = [2, 4][values.index(max(values))]
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")


def test_generation_eval_needs_an_eval_set(tiny_model_dir, demo_data_dir, tmp_path):
    from mixtune.errors import ConfigError

    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), os.path.join(demo_data_dir, "train.json"),
                       eval_with_do_generation=True)
    with pytest.raises(ConfigError, match="eval_with_do_generation"):
        load_config(cfg)


@pytest.mark.slow
def test_generation_metric_rises_on_demo_data(tmp_path):
    """Demo-sized: exact match by generation climbs from 0 (before training) to most answers right."""
    from mixtune.models.registry import get_family
    from mixtune.tools.demo import DEMO_TRAINING
    from mixtune.tools.demo_data import make_demo_data

    model = get_family("qwen2_vl").build_tiny(str(tmp_path / "tiny"))
    data = str(tmp_path / "data")
    make_demo_data(data)
    overrides = {k: v for k, v in DEMO_TRAINING.items() if k not in ("max_length", "seed")}
    cfg = gen_eval_config(tmp_path, model, data, **{**overrides, "max_steps": -1, "disable_tqdm": True,
                                                    "num_train_epochs": 3, "eval_on_start": True})
    config = load_config(cfg)
    config.mix.dataset["eval"][0]["max_samples"] = 60
    train(config)
    with open(os.path.join(config.training.output_dir, "metrics.json")) as f:
        curve = [v for _, v in json.load(f)["generation_eval"]["eval_exact_match"]]
    assert len(curve) >= 4  # before training, then after each epoch
    assert curve[0] < 0.1 and curve[-1] >= 0.7 and curve[-1] == max(curve)
