"""Every known config value is checked when the config is read: one line naming the key, before any model
loads. The configs here name a model that does not exist, so a check that ran only after loading would
fail on the model instead of the key."""

import json
import os

import pytest

from mixtune.cli import main
from mixtune.config import load_config
from mixtune.config_checks import check_report_to
from mixtune.errors import ConfigError

MISSING_MODEL = "/nonexistent/model-that-would-fail-to-load"


@pytest.fixture
def config(tmp_path):
    """`config(**overrides)` -> path of a config file whose only fault is what the overrides add."""
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "val.jsonl").write_text("")
    (tmp_path / "shards").mkdir()
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    (tmp_path / "a_file").write_text("")

    def write(**overrides):
        raw = {"model_name_or_path": MISSING_MODEL, "output_dir": str(tmp_path / "out"),
               "dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.jsonl"}]},
               "max_steps": 2, **overrides}
        path = tmp_path / "c.json"
        path.write_text(json.dumps(raw))
        return str(path)
    return write


def with_eval(**kw):
    return {"dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.jsonl"}],
                        "eval": [{"name": "chatml_dataset", "data_files": "val.jsonl"}]}, **kw}


def train_entry(**kw):
    return {"dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.jsonl", **kw}]}}


BAD = [  # (overrides, the key the error must name, words it must contain)
    ({"max_steps": -1, "num_train_epochs": 0}, "num_train_epochs", "must be > 0"),
    ({"max_steps": -1, "num_train_epochs": -1}, "num_train_epochs", "must be > 0"),
    ({"max_steps": 0}, "max_steps", "must be > 0"),
    ({"max_steps": -5}, "max_steps", "must be > 0"),
    ({"do_train": False}, "do_train", "always trains"),
    ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", ">= 1"),
    ({"per_device_eval_batch_size": 0}, "per_device_eval_batch_size", ">= 1"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps", ">= 1"),
    ({"eval_accumulation_steps": 0}, "eval_accumulation_steps", ">= 1"),
    ({"learning_rate": -1e-4}, "learning_rate", ">= 0"),
    ({"warmup_ratio": 2.0}, "warmup_ratio", "[0, 1)"),
    ({"warmup_ratio": 1.0}, "warmup_ratio", "[0, 1)"),
    ({"warmup_ratio": -0.1}, "warmup_ratio", "[0, 1)"),
    ({"warmup_steps": -1}, "warmup_steps", "whole number"),
    ({"warmup_steps": 2.5}, "warmup_steps", "whole number"),
    ({"lora": True, "lora_alpha": -16}, "lora_alpha", "> 0"),
    ({"lora": True, "lora_rank": 0}, "lora_rank", ">= 1"),
    ({"save_strategy": "steps", "save_steps": -1}, "save_steps", "> 0 when save_strategy is 'steps'"),
    ({"save_strategy": "steps", "save_steps": 0}, "save_steps", "> 0"),
    (with_eval(eval_strategy="steps", eval_steps=0), "eval_steps", "> 0"),
    ({"logging_steps": -1}, "logging_steps", "> 0"),
    ({"save_total_limit": 0}, "save_total_limit", ">= 1"),
    ({"weight_decay": -0.1}, "weight_decay", ">= 0"),
    ({"max_grad_norm": -1.0}, "max_grad_norm", ">= 0"),
    ({"adam_beta2": 1.5}, "adam_beta2", "[0, 1)"),
    ({"adam_epsilon": -1e-8}, "adam_epsilon", ">= 0"),
    ({"label_smoothing_factor": 1.5}, "label_smoothing_factor", "[0, 1)"),
    ({"dataloader_num_workers": -1}, "dataloader_num_workers", ">= 0"),
    ({"dataloader_persistent_workers": True, "dataloader_num_workers": 0}, "dataloader_persistent_workers",
     "dataloader_num_workers > 0"),
    ({"seed": -1}, "seed", "2**32"),
    ({"lr_scheduler_kwargs": "min_lr=0"}, "lr_scheduler_kwargs", "expected a mapping"),
    ({"optim": "adamw_tortch"}, "optim", "expected one of"),
    ({"max_length": 0}, "max_length", "positive"),
    ({"output_dir": ""}, "output_dir", "must name a folder"),
    ({"output_dir": "{tmp}/a_file"}, "output_dir", "is a file, not a folder"),
    ({"output_dir": "{tmp}/a_file/run"}, "output_dir", "a_file is a file"),
    ({"data_cache_dir": "{tmp}/a_file/cache"}, "data_cache_dir", "a_file is a file"),
    ({"report_to": "wandbb"}, "report_to", "did you mean 'wandb'"),
    ({"report_to": ["none", "nonsense"]}, "report_to", "unknown integration 'nonsense'"),
    ({"eval_strategy": "epoch"}, "eval_strategy", "dataset.eval is empty"),
    ({"evaluation_strategy": "steps"}, "eval_strategy", "dataset.eval is empty"),
    (with_eval(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
               metric_for_best_model="accuracy"), "metric_for_best_model", "'eval_loss'"),
    ({"dataset": {"train": []}}, "dataset.train", "has no entries"),
    ({"dataset": {"train": {"name": "sharegpt"}}}, "dataset.train", "must be a list"),
    (train_entry(data_files="nope.jsonl"), "dataset.train[0].data_files", "data file not found: .*nope.jsonl"),
    (train_entry(data_files="part-*.jsonl"), "dataset.train[0].data_files", "no file matches the glob"),
    (train_entry(data_files="shards"), "dataset.train[0].data_files", "shards is a folder; 'chatml_dataset' reads"),
    (train_entry(data_files=[]), "dataset.train[0].data_files", "non-empty list"),
    (train_entry(data_files=["train.jsonl", 3]), "dataset.train[0].data_files", "non-empty list"),
    (train_entry(name="chatml_datset"), "dataset.train[0].name", "did you mean 'chatml_dataset'"),
    (train_entry(ratioo=0.5), "dataset.train[0]", "unknown key 'ratioo'; did you mean 'ratio'"),
    (train_entry(ratio=-1), "dataset.train[0].ratio", "positive number"),
    (train_entry(max_sample_bytes=0), "dataset.train[0].max_sample_bytes", "positive integer"),
    ({"max_sample_bytes": -5}, "max_sample_bytes", "positive number of bytes"),
    (train_entry(on_bad_sample="ignore"), "dataset.train[0].on_bad_sample", "one of"),
    (train_entry(chat_template="missing.jinja"), "dataset.train[0].chat_template", "not found"),
    (train_entry(image_root="no_images"), "dataset.train[0].image_root", "not found"),
    ({"dataset": {"train": [{"name": "vqa", "data_files": "train.jsonl", "prompt": "Answer:"}]}},
     "dataset.train[0].prompt", "{question}"),
    ({"dataset": {"train": [{"name": "hf", "data_files": "saved", "columns": {"msgs": "m"}}]}},
     "dataset.train[0].columns", "unknown field"),
    ({"dataset": {"train": [{"name": "hf", "data_files": "shards"}]}}, "dataset.train[0].data_files",
     "not a `datasets` save_to_disk folder"),
    ({"dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.jsonl"}],
                  "eval": [{"name": "chatml_dataset", "data_files": "val.jsonl", "ratio": 0.5}]}},
     "dataset.eval[0]", "training entries only"),
]


@pytest.mark.parametrize("overrides,key,words", BAD, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD)])
def test_bad_value_is_refused_naming_its_key_before_the_model_loads(config, tmp_path, capsys, overrides, key, words):
    overrides = json.loads(json.dumps(overrides).replace("{tmp}", str(tmp_path)))
    assert main(["train", config(**overrides)]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"mixtune: error: config key '{key}': "), err
    import re
    assert re.search(words if ".*" in words else re.escape(words), err), err
    assert MISSING_MODEL not in err  # not found by trying to load the model
    assert not os.path.exists(tmp_path / "out")


def test_report_to_an_integration_that_is_not_installed_says_what_to_install(monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    with pytest.raises(ConfigError, match=r"config key 'report_to': 'wandb' is not installed: pip install wandb"):
        check_report_to("wandb")
    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install tensorboard"):
        check_report_to(["tensorboard"])
    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: True)
    check_report_to(["wandb"])
    check_report_to("none")
    check_report_to("all")


def test_optimizer_from_a_missing_package_says_what_to_install(config, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec  # bitsandbytes is a dev dependency: make it look missing
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"config key 'optim': 'paged_adamw_8bit' needs bitsandbytes: pip install"):
        load_config(config(optim="paged_adamw_8bit"))
    load_config(config(optim="adamw_torch", lr_scheduler_kwargs='{"min_lr": 0.0}'))


def test_real_report_to_check_matches_what_is_installed(config):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(ConfigError, match="pip install wandb"):
        load_config(config(report_to="wandb"))


@pytest.mark.parametrize("overrides", [
    {"warmup_ratio": 0.0}, {"warmup_ratio": 0.5}, {"warmup_steps": 0.03}, {"warmup_steps": 10},
    {"learning_rate": 0.0}, {"max_grad_norm": 0.0}, {"dataloader_num_workers": 0},
    {"save_strategy": "steps", "save_steps": 0.25}, {"save_total_limit": 1}, {"lora": True, "lora_alpha": 1},
    {"max_steps": -1, "num_train_epochs": 0.5}, {"report_to": "none"}, {"report_to": []},
    {"do_train": True, "do_eval": False},
    with_eval(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="loss"),
    {"dataset": {"train": [{"name": "hf", "data_files": "saved"}]}},
    {"dataset": {"train": [{"name": "chatml_dataset", "data_files": "*.jsonl"}]}},
    {"output_dir": "{tmp}/new/deeper/run"},
])
def test_valid_edge_values_are_accepted(config, tmp_path, overrides):
    overrides = json.loads(json.dumps(overrides).replace("{tmp}", str(tmp_path)))
    load_config(config(**overrides))
    assert not os.path.exists(tmp_path / "new")  # reading a config creates nothing


def test_per_entry_metric_names_are_accepted_for_best_model(config, tmp_path):
    (tmp_path / "other.jsonl").write_text("")
    raw = with_eval(eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True,
                    metric_for_best_model="eval_other_loss")
    raw["dataset"]["eval"].append({"name": "chatml_dataset", "data_files": "other.jsonl"})
    assert load_config(config(**raw)).training.metric_for_best_model == "eval_other_loss"


def test_non_utf8_config_file_names_the_byte(tmp_path):
    (tmp_path / "c.json").write_bytes(b'{"learning_rate": 1e-4, "run_name": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"c.json: not UTF-8 text \(byte 0xe9 at byte offset 40\)"):
        load_config(str(tmp_path / "c.json"))
