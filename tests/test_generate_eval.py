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


# ---- several processes: the work is shared, the records and scores are one process's ----------------------

def _gen_eval_rank(rank: int, port: int, model_dir: str, val: str, folder: str, sharded: bool) -> None:
    """One of two gloo processes running the callback as the Trainer would on each rank; each rank is given its
    own output_dir so that what a replica writes would show."""
    import types

    import torch
    import torch.distributed as dist

    import mixtune.infer.generate_eval as G
    from mixtune.infer.engine import Engine

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    answered = []
    generate = Engine.generate

    def counting(self, rows, options, on_token=None):
        answered.append(len(rows))
        return generate(self, rows, options, on_token)

    Engine.generate = counting
    if sharded:  # as under ZeRO-3 / FSDP: every rank must take part in every forward
        G.parameters_sharded = lambda model: True
    callback, model = build_callback(model_dir, val, os.path.join(folder, f"out{rank}"))
    metrics = {"eval_loss": 1.0}
    args, state = types.SimpleNamespace(should_log=rank == 0), types.SimpleNamespace(global_step=3, epoch=1.0,
                                                                                      log_history=[])
    callback.on_evaluate(args, state, None, metrics=metrics, model=model)
    with open(os.path.join(folder, f"result{rank}.json"), "w") as f:
        json.dump({"metrics": metrics, "answered": answered}, f)
    dist.destroy_process_group()


def build_callback(model_dir: str, val: str, out: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mixtune.data.dataset import DatasetEntry
    from mixtune.infer.engine import GenerationOptions
    from mixtune.infer.generate_eval import GenerationEvalCallback
    from mixtune.models.registry import get_family

    entry = DatasetEntry.from_config({"name": "chatml_dataset", "data_files": val, "max_samples": 5}, ".", "eval")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    callback = GenerationEvalCallback([entry], get_family("qwen2_vl"), AutoProcessor.from_pretrained(model_dir),
                                      GenerationOptions(max_new_tokens=4), batch_size=2, output_dir=out)
    return callback, model


@pytest.mark.parametrize("sharded", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_ranks_share_generation_eval_and_get_one_process_records(tiny_model_dir, demo_data_dir, tmp_path,
                                                                     sharded):
    import socket
    import types

    import torch.multiprocessing as mp

    model_dir, val = tiny_model_dir("qwen2_vl"), os.path.join(demo_data_dir, "val.json")
    callback, model = build_callback(model_dir, val, str(tmp_path / "single"))
    single = {"eval_loss": 1.0}
    callback.on_evaluate(types.SimpleNamespace(should_log=True), types.SimpleNamespace(
        global_step=3, epoch=1.0, log_history=[]), None, metrics=single, model=model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gen_eval_rank, args=(port, model_dir, val, str(tmp_path), sharded), nprocs=2, join=True)
    results = [json.load(open(tmp_path / f"result{r}.json")) for r in (0, 1)]
    assert "eval_exact_match" in single
    assert results[0]["metrics"] == results[1]["metrics"] == single  # every rank decides best models alike
    step = os.path.join("generation_eval", "step-3", "predictions.jsonl")
    assert open(tmp_path / "out0" / step).read() == open(tmp_path / "single" / step).read()
    assert not os.path.exists(tmp_path / "out1" / "generation_eval")  # only the main process writes
    if sharded:  # lockstep: each rank answers every batch, as one process would
        assert results[0]["answered"] == results[1]["answered"] == [2, 2, 1]
    else:  # 3 batches of 2, 2, 1 prompts dealt out: rank 0 takes batches 0 and 2, rank 1 batch 1
        assert results[0]["answered"] == [2, 1] and results[1]["answered"] == [2]
