"""Preference and RL tuning through TRL (task: dpo, kto, grpo) on tiny Qwen2-VL checkpoints."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mixtune.config import build_config
from mixtune.errors import ConfigError

pytest.importorskip("trl")

COLOURS = {"red": (220, 30, 30), "blue": (40, 60, 220)}


def base_config(model_dir, train_file, out, **extra) -> dict:
    return {"model_name_or_path": model_dir, "dataset": {"train": [{"name": "preference", "data_files": train_file}]},
            "output_dir": str(out), "overwrite_output_dir": True, "per_device_train_batch_size": 2,
            "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
            "max_length": 256, "seed": 0, "task": "dpo", **extra}


@pytest.fixture(scope="module")
def colour_pairs(tmp_path_factory):
    """Four one-colour images; chosen: the colour word alone, rejected: a sentence."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pairs")
    records = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        Image.new("RGB", (56, 56), rgb).save(root / f"{i}.png")
        records.append({"messages": [{"role": "user", "content": "<image>What colour is it?"}],
                        "chosen": name, "rejected": f"The colour of it is {name}.", "images": [f"{i}.png"]})
    (root / "pairs.json").write_text(json.dumps(records))
    return root


def margins(out) -> list[float]:
    with open(out / "metrics.json") as f:
        return [h["rewards/margins"] for h in json.load(f)["log_history"] if "rewards/margins" in h]


def test_dpo_raises_the_margin_on_the_training_pairs(tiny_model_dir, colour_pairs, tmp_path):
    from mixtune.train.run import train

    out = tmp_path / "out"
    train(build_config(base_config(tiny_model_dir("qwen2_vl"), str(colour_pairs / "pairs.json"), out, max_steps=4)))
    m = margins(out)
    assert len(m) == 4
    assert m[0] == 0.0  # step 1: the policy is the reference
    assert min(m[1:]) > 0.1  # each later step prefers chosen over rejected by a margin
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s for s, _ in metrics["rewards"]["rewards/margins"]] == [1, 2, 3, 4]  # and plotted beside the loss
    assert (out / "loss_curve.png").exists() and (out / "model.safetensors").exists()


def test_dpo_with_lora_trains_only_the_adapters(tiny_model_dir, colour_pairs, tmp_path):
    from mixtune.train.run import build_trainer

    config = build_config(base_config(tiny_model_dir("qwen2_vl"), str(colour_pairs / "pairs.json"), tmp_path / "o",
                                      max_steps=2, lora=True))
    trainer = build_trainer(config)
    model = trainer.model
    assert list(model.peft_config) == ["default"]  # the reference is the disabled adapter, not a copy
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert max(h.get("rewards/margins", 0) for h in trainer.state.log_history) > 0


def test_preference_shapes_read_alike(tmp_path):
    from mixtune.data.badsamples import BadSamples
    from mixtune.data.dataset import DatasetEntry
    from mixtune.data.formats.preference import read_preference

    (tmp_path / "a.png").write_bytes(b"")
    records = [
        {"conversations": [{"from": "human", "value": "<image>Q?"}], "chosen": {"from": "gpt", "value": "yes"},
         "rejected": {"from": "gpt", "value": "no"}, "images": ["a.png"]},  # LLaMA-Factory
        {"messages": [{"role": "user", "content": "<image>Q?"}, {"role": "assistant", "content": "yes"}],
         "rejected_response": "no", "images": ["a.png"]},  # ms-swift
        {"prompt": [{"role": "user", "content": "<image>Q?"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": "no", "images": ["a.png"]},  # messages
    ]
    (tmp_path / "p.json").write_text(json.dumps(records))
    pairs = read_preference(DatasetEntry(name="preference", data_files=str(tmp_path / "p.json")), BadSamples())
    assert [(p.prompt.turns[-1].text, p.chosen, p.rejected, len(p.prompt.images)) for p in pairs] == \
        [("<image>Q?", "yes", "no", 1)] * 3


@pytest.mark.parametrize("record, field, reason", [
    ({"messages": [{"role": "user", "content": "Q"}], "rejected": "no"}, "chosen", "missing the chosen"),
    ({"messages": [{"role": "user", "content": "Q"}], "chosen": "yes"}, "rejected", "missing the rejected"),
    ({"messages": [{"role": "user", "content": "Q"}], "chosen": "yes", "rejected": " yes"}, "rejected", "identical"),
    ({"messages": [{"role": "user", "content": "<image><image>Q"}], "chosen": "a", "rejected": "b",
      "images": ["x.png"]}, "image", "2 '<image>' placeholder"),
])
def test_bad_pairs_name_file_index_and_field_or_are_counted(tmp_path, record, field, reason):
    from badrecords import assert_named_or_counted
    from mixtune.data.dataset import DatasetEntry
    from mixtune.data.formats.preference import read_preference

    (tmp_path / "x.png").write_bytes(b"")
    good = {"messages": [{"role": "user", "content": "Q"}], "chosen": "yes", "rejected": "no"}
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in (good, record, good)))
    entry = DatasetEntry(name="preference", data_files=str(tmp_path / "p.jsonl"))
    assert_named_or_counted(read_preference, entry, field, reason)


def test_config_refuses_what_trl_cannot_do_for_vlms(tiny_model_dir, colour_pairs, tmp_path):
    from mixtune.train.run import build_trainer

    def build(**extra):
        return build_trainer(build_config(base_config(tiny_model_dir("qwen2_vl"), str(colour_pairs / "pairs.json"),
                                                      tmp_path / "o", max_steps=1, **extra)))
    with pytest.raises(ConfigError, match="only in its experimental CPOTrainer") as e:
        build(trl={"loss_type": "simpo"})
    assert e.value.key == "trl.loss_type"
    with pytest.raises(ConfigError, match="not an option of TRL's DPOConfig") as e:
        build(trl={"betta": 0.1})
    assert e.value.key == "trl.betta"
    with pytest.raises(ConfigError, match="TrainingArguments key"):
        build(trl={"learning_rate": 0.1})
    trainer = build(trl={"loss_type": "ipo", "beta": 0.25})
    assert (trainer.loss_types, trainer.beta, trainer.args.learning_rate) == (["ipo"], 0.25, 1e-3)


def test_only_chat_checkpoints_take_preference_tasks(tiny_model_dir, colour_pairs, tmp_path):
    from mixtune.models.registry import get_family
    from mixtune.tasks import task_name

    assert get_family("qwen2_vl").task_choices == ("chat", "dpo", "kto", "grpo")
    assert get_family("clip").task_choices == ("contrastive",)
    config = build_config(base_config(tiny_model_dir("clip"), str(colour_pairs / "pairs.json"), tmp_path / "o"))
    with pytest.raises(ConfigError, match="trains for 'contrastive', not 'dpo'"):
        task_name(config.mix, get_family("clip"))


def test_rewards():
    from mixtune.tasks.rewards import reward_functions

    exact, fmt, boxed, regex = reward_functions(["exact_match", "format", "boxed_accuracy", r"format:\d+"])
    done = [[{"role": "assistant", "content": "Red."}], [{"role": "assistant", "content": "blue"}]]
    assert exact(None, done, answer=["red", "red"]) == [1.0, 0.0]
    assert fmt(None, ["<think>x</think> <answer>4</answer>", "4"]) == [1.0, 0.0]
    boxes = [r"so \boxed{\frac{1}{2}}", r"\boxed{3} then \boxed{4}", "4"]
    assert boxed(None, boxes, answer=[r"\frac{1}{2}", "4", "4"]) == [1.0, 1.0, 0.0]
    assert regex(None, ["42", "4a"]) == [1.0, 0.0]
    (mine,) = reward_functions(["mixtune.tasks.rewards:exact_match"])
    assert mine is exact
    for bad, match in ((["nope"], "unknown reward"), (["os:nothing_here"], "cannot import"), ([], "at least one")):
        with pytest.raises(ConfigError, match=match):
            reward_functions(bad)


def test_grpo_with_exact_match_raises_the_mean_reward(tiny_model_dir, tmp_path):
    """A tiny model SFT-trained on noisy labels answers 'red' or 'blue' about equally; GRPO rewarded for 'red'
    (the checkable answer) moves its sampled answers toward it."""
    from PIL import Image

    from mixtune.train.run import train

    Image.new("RGB", (56, 56), COLOURS["red"]).save(tmp_path / "red.png")
    rng = random.Random(0)

    def records(answers):
        return [{"messages": [{"role": "user", "content": "<image>What colour is it?"},
                              {"role": "assistant", "content": a}], "images": ["red.png"]} for a in answers]
    (tmp_path / "sft.json").write_text(json.dumps(records([rng.choice(list(COLOURS)) for _ in range(16)])))
    (tmp_path / "grpo.json").write_text(json.dumps(records(["red"] * 8)))
    common = {"per_device_train_batch_size": 8, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
              "max_length": 256, "seed": 0, "overwrite_output_dir": True}
    sft = tmp_path / "sft"
    train(build_config({**common, "model_name_or_path": tiny_model_dir("qwen2_vl"), "max_steps": 30,
                        "learning_rate": 3e-3, "output_dir": str(sft),
                        "dataset": {"train": [{"name": "chatml", "data_files": str(tmp_path / "sft.json")}]}}))
    out = tmp_path / "grpo"
    train(build_config({**common, "model_name_or_path": str(sft), "task": "grpo", "reward_funcs": ["exact_match"],
                        "max_steps": 24, "learning_rate": 3e-3, "output_dir": str(out),
                        "trl": {"num_generations": 8, "max_completion_length": 4},
                        "dataset": {"train": [{"name": "chatml", "data_files": str(tmp_path / "grpo.json")}]}}))
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    rewards = [h["reward"] for h in history if "reward" in h]
    assert len(rewards) == 24
    first, last = sum(rewards[:6]) / 6, sum(rewards[-6:]) / 6
    assert 0.3 < first < 0.8  # the SFT model guesses
    assert last >= first + 0.15


def test_without_trl_the_task_stops_with_the_pip_command(monkeypatch):
    import sys

    from mixtune.tasks.trl_bridge import import_trl

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl -> ImportError, as when it is not installed
    with pytest.raises(ConfigError, match=r"pip install 'mixtune\[rl\]'") as e:
        import_trl()
    assert e.value.key == "task"


@pytest.mark.parametrize("family, task, key, extra", [
    ("qwen2_vl", None, "trl", {"trl": {"beta": 0.1}}),  # chat (the family's own task)
    ("qwen2_vl", None, "reward_funcs", {"reward_funcs": ["exact_match"]}),
    ("qwen2_vl", "dpo", "reward_funcs", {"reward_funcs": ["exact_match"]}),
    ("clip", None, "trl", {"trl": {"beta": 0.1}}),  # contrastive
])
def test_task_only_keys_are_refused_under_other_tasks(tiny_model_dir, tmp_path, family, task, key, extra):
    from mixtune.models.registry import get_family
    from mixtune.tasks import TASK_KEYS, task_name

    (tmp_path / "p.json").write_text("[]")
    data = str(tmp_path / "p.json")
    config = build_config({**base_config(tiny_model_dir(family), data, tmp_path / "o", task=task), **extra})
    fam = get_family(family)
    with pytest.raises(ConfigError) as e:
        task_name(config.mix, fam)
    name = task or fam.task
    assert e.value.key == key and str(e.value).count("\n") == 0
    assert f"only by task {', '.join(TASK_KEYS[key])}" in str(e.value) and f"task is '{name}'" in str(e.value)
    ok = {"trl": "dpo", "reward_funcs": "grpo"}[key]  # the task that reads the key accepts it
    if ok in fam.task_choices:
        config = build_config({**base_config(tiny_model_dir(family), data, tmp_path / "o", task=ok), **extra})
        assert task_name(config.mix, fam) == ok
