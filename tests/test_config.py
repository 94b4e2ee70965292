import json
import os

import pytest

from mixtune.config import build_config, load_config, parse_overrides
from mixtune.errors import ConfigError, NotSupportedYet

# reading a config only checks that data files exist (this file does); they are read when training starts
BASE = {"model_name_or_path": "some/model",
        "dataset": {"train": [{"name": "chatml_dataset", "data_files": os.path.abspath(__file__)}]}}


def build(**kw):
    return build_config({**BASE, **kw})


def test_unknown_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*did you mean 'learning_rate'"):
        build(learning_rat=1e-4)
    with pytest.raises(ConfigError, match=r"'freeze_includ'.*did you mean 'freeze_include'"):
        build(freeze_includ=["*visual*"])


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", "fast", "learning_rate': expected float"),
    ("num_train_epochs", True, "num_train_epochs': expected float"),
    ("max_length", 1.5, "max_length': expected int"),
    ("per_device_train_batch_size", "2", "per_device_train_batch_size': expected int"),
    ("lr_scheduler_type", "wavy", "lr_scheduler_type': expected one of"),
    ("freeze_include", "*visual*", "freeze_include': expected list"),
    ("fp16_opt_level", "O3", "fp16_opt_level"),
])
def test_wrong_type_or_value_names_the_key(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        build(**{key: value})


def test_unbuilt_features_are_refused_not_ignored():
    with pytest.raises(NotSupportedYet, match="not supported yet"):
        build(remove_unused_columns=True)


def test_seed_and_paddlenlp_names_map_to_transformers():
    cfg = build(dataset={**BASE["dataset"], "eval": BASE["dataset"]["train"]},
                evaluation_strategy="epoch", recompute=True, warmup_ratio=0.03, use_flash_attention=False,
                fp16_opt_level="O1", benchmark=False, skip_memory_metrics=False, eval_accumulation_steps=16,
                adam_beta2=0.95, lr_scheduler_type="cosine", unified_checkpoint=True,
                group_by_modality_length=True)
    t = cfg.training
    assert t.eval_strategy == "epoch"
    assert t.activation_checkpointing is True
    assert t.warmup_steps == pytest.approx(0.03)
    assert t.adam_beta2 == pytest.approx(0.95)
    assert t.train_sampling_strategy == "group_by_length"
    assert t.skip_memory_metrics is False
    assert cfg.mix.attn_implementation is None
    assert any("unified_checkpoint" in n for n in cfg.notes)


def test_paddlemix_config_file_runs_after_changing_paths_only(tmp_path):
    # the keys of PaddleMIX's paddlemix/config/qwen_vl/sft_argument.json, without mixtoken/lora
    paddle = {
        "model_name_or_path": "qwen-vl/qwen-vl-chat-7b",
        "dataset": {"train": [{"name": "chatml_dataset", "data_files": "train.json",
                               "chat_template": "chat_template.json"}],
                    "eval": [{"name": "chatml_dataset", "data_files": "val.json",
                              "chat_template": "chat_template.json"}]},
        "mixtoken": False, "output_dir": "./checkpoints/qwen_vl_sft_ckpts", "overwrite_output_dir": True,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 16, "per_device_eval_batch_size": 1,
        "eval_accumulation_steps": 16, "num_train_epochs": 1, "learning_rate": 1e-05, "weight_decay": 0.1,
        "adam_beta2": 0.95, "warmup_ratio": 0.01, "lr_scheduler_type": "cosine", "logging_steps": 1,
        "save_steps": 100, "evaluation_strategy": "epoch", "save_strategy": "epoch", "max_length": 2048,
        "bf16": False, "fp16_opt_level": "O1", "do_train": True, "do_eval": False, "disable_tqdm": True,
        "load_best_model_at_end": False, "eval_with_do_generation": False, "skip_memory_metrics": False,
        "benchmark": False, "save_total_limit": 1, "recompute": True,
    }
    path = tmp_path / "sft_argument.json"
    path.write_text(json.dumps(paddle))
    for name in ("train.json", "val.json", "chat_template.json"):
        (tmp_path / name).write_text("[]")
    cfg = load_config(str(path))
    assert cfg.training.gradient_accumulation_steps == 16
    assert cfg.overwrite_output_dir is True
    assert cfg.base_dir == str(tmp_path)


def test_yaml_and_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    (tmp_path / "t.jsonl").write_text("")
    path.write_text("model_name_or_path: m\ndataset: {train: [{name: sharegpt, data_files: t.jsonl}]}\n"
                    "learning_rate: 0.1\n")
    cfg = load_config(str(path), parse_overrides(["--learning_rate", "1e-4", "--max_length=128", "--bf16"]))
    assert cfg.training.learning_rate == pytest.approx(1e-4)
    assert cfg.mix.max_length == 128
    assert cfg.training.bf16 is True


def test_malformed_config_file_names_line(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n "learning_rate": 1e-4,\n "max_length": ,\n}')
    with pytest.raises(ConfigError, match=r"c.json line 3"):
        load_config(str(path))
