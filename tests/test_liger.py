"""`use_liger_kernel`: refused in one line where Liger cannot run (no CUDA GPU, not installed, a family it has no
kernels for). Its loss equality (on within 1e-4 of off) is checked on a GPU: benchmarks/liger_gpu_check.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import red_image, write_config
from mixtune.cli import main
from mixtune.config import load_config
from mixtune.errors import ConfigError
from mixtune.models.registry import get_family
from mixtune.train import liger
from test_bad_data import good, write_jsonl


@pytest.fixture
def config_file(tiny_model_dir, tmp_path):
    red_image(tmp_path / "red.png")
    return write_config(tmp_path, tiny_model_dir("qwen2_vl"), write_jsonl(tmp_path / "d.jsonl", [good()]),
                        dataset={"train": [{"name": "sharegpt", "data_files": "d.jsonl"}]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_cuda_gpu_train_stops_in_one_line(config_file, capsys):
    assert main(["train", config_file, "--use_liger_kernel", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mixtune: error: config key 'use_liger_kernel': needs a CUDA GPU (Liger's kernels are Triton GPU "
                   "kernels); set it to false to train on the CPU"]
    assert load_config(config_file, {"use_liger_kernel": False}).training.use_liger_kernel is False


def test_without_liger_installed_the_line_gives_the_pip_command(config_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^config key 'use_liger_kernel': needs liger-kernel, which is not "
                                          r"installed: pip install 'mixtune\[liger\]'$"):
        load_config(config_file, {"use_liger_kernel": True, "device": "gpu"})


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="reads liger-kernel's table")
@pytest.mark.parametrize("name,supported", [("qwen2_vl", True), ("qwen2_5_vl", True), ("qwen3_vl", True),
                                            ("llava", True), ("internvl", True), ("gemma3", True),
                                            ("llava_onevision", False), ("blip-2", False), ("clip", False)])
def test_families_liger_has_no_kernels_for_are_refused(name, supported):
    family = get_family(name)
    if supported:
        liger.check_family(family)
    else:
        with pytest.raises(ConfigError, match=rf"Liger has no kernels for the {name} family"):
            liger.check_family(family)
