"""Shared fixtures: tiny checkpoints and demo data, built once per test session."""

from __future__ import annotations

import json
import os

import pytest
import torch

torch.set_num_threads(1)  # stable timings on a shared 2-core machine


@pytest.fixture(autouse=True, scope="session")
def _length_cache_in_tmp(tmp_path_factory):
    """Token-length caches go to a per-session folder, never the user's ~/.cache."""
    os.environ["MIXTUNE_CACHE_DIR"] = str(tmp_path_factory.mktemp("mixtune_cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """`tiny_model_dir(family)` -> path of a tiny checkpoint of that family, built once per session."""
    from mixtune.models.registry import get_family

    root = tmp_path_factory.mktemp("tiny_models")
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = get_family(family).build_tiny(str(root / family))
        return built[family]
    return get


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    from mixtune.tools.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo_data")
    make_demo_data(str(root), n_train_images=20, n_val_images=8)
    return str(root)


def write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def write_config(tmp_path, model_dir: str, train_file: str, **overrides) -> str:
    raw = {
        "model_name_or_path": model_dir,
        "dataset": {"train": [{"name": "chatml_dataset", "data_files": train_file}]},
        "output_dir": str(tmp_path / "out"),
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "max_length": 512,
        "seed": 0,
        **overrides,
    }
    return write_json(tmp_path / "config.json", raw)


def red_image(path) -> str:
    from PIL import Image

    Image.new("RGB", (112, 112), (220, 30, 30)).save(path)
    return os.path.basename(str(path))
