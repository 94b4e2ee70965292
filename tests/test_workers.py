"""Loader workers by default: the default's arithmetic, a user's value winning, and what workers must not change
(skip counts, error messages, the batches and so the trained weights)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import red_image, write_config
from mixtune.config import load_config
from mixtune.data import workers
from mixtune.data.dataset import build_split
from mixtune.errors import DataError
from test_bad_data import CASES, good, make_bad, qwen, write_jsonl  # noqa: F401 (qwen: fixture)


@pytest.mark.parametrize("cpus,processes,expected", [(1, 1, 0), (2, 1, 1), (3, 1, 2), (8, 1, 4), (64, 1, 4),
                                                     (8, 4, 1), (2, 2, 0), (16, 2, 4)])
def test_default_workers_leave_a_cpu_per_process_for_compute(cpus, processes, expected):
    assert workers.default_loader_workers(cpus, processes) == expected


def test_config_default_and_user_value(tiny_model_dir, tmp_path, monkeypatch):
    red_image(tmp_path / "red.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good()])
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), data)
    monkeypatch.setattr(workers, "available_cpus", lambda: 6)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    config = load_config(cfg)
    assert config.training.dataloader_num_workers == 4
    assert any(n.startswith("dataloader_num_workers: 4 (default") for n in config.notes)
    assert load_config(cfg, {"dataloader_num_workers": 0}).training.dataloader_num_workers == 0
    assert load_config(cfg, {"dataloader_num_workers": 2}).training.dataloader_num_workers == 2
    monkeypatch.setattr(workers, "available_cpus", lambda: 1)
    assert load_config(cfg).training.dataloader_num_workers == 0


def test_skips_are_counted_the_same_with_loader_workers(tmp_path, qwen):  # noqa: F811
    """The length scan runs in the loader's workers too: the same samples kept, the same skips recorded."""
    red_image(tmp_path / "red.png")
    rows = []
    for case in CASES:
        rows += [good(), make_bad(tmp_path, case)[0]]
    write_jsonl(tmp_path / "d.jsonl", rows)
    entry = [{"name": "sharegpt", "data_files": "d.jsonl", "on_bad_sample": "skip"}]
    got = {n: build_split(entry, "train", *qwen, 512, str(tmp_path), cache_dir=str(tmp_path / f"cache{n}"),
                          num_workers=n) for n in (0, 2)}
    assert len(got[2].skipped) == len(got[0].skipped) >= len(CASES) - 1
    def where(records):  # reasons may name an object's address (PIL's decode error), which differs by process
        return [(r["file"], r["index"], r["line"], r["field"], r["kind"]) for r in records]

    assert where(got[2].skipped) == where(got[0].skipped)
    assert got[2].lengths() == got[0].lengths()
    assert [c.index for c in got[2].parts[0].conversations] == [c.index for c in got[0].parts[0].conversations]


class Failing(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            raise DataError("image changed since the scan;\ndelete the length cache", file="t.json", index=2, line=3)
        return i


def test_a_bad_sample_met_in_a_worker_reads_as_without_workers():
    """torch re-raises a worker's error with the worker's traceback as its message; mixtune's errors keep their
    own one message, so the CLI still prints one clear line."""
    messages = {}
    for n in (0, 1):
        with pytest.raises(DataError) as info:
            list(torch.utils.data.DataLoader(Failing(), batch_size=None, num_workers=n))
        messages[n] = str(info.value)
    assert messages[0] == "t.json, line 3, sample 2: image changed since the scan;\ndelete the length cache"
    assert messages[1] == messages[0]


def test_training_with_workers_gives_the_same_losses_and_weights(tiny_model_dir, tmp_path):
    from mixtune.train.run import train

    red_image(tmp_path / "red.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good()] * 3 + [
        {"messages": [{"role": "user", "content": "<image>Describe it."},
                      {"role": "assistant", "content": "a red square, " * 6}], "images": ["red.png"]}] * 3)
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, dataset={"train": [
        {"name": "sharegpt", "data_files": "d.jsonl"}]}, max_steps=3)
    finals = {}
    for n in (0, 2):
        out = tmp_path / f"out{n}"
        train(load_config(cfg, {"dataloader_num_workers": n, "output_dir": str(out)}))
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        finals[n] = [h["loss"] for h in history if "loss" in h]
    assert len(finals[0]) == 3 and finals[2] == finals[0]


def test_persistent_workers_refused_where_each_epoch_redraws(tiny_model_dir, tmp_path):
    # persistent workers keep the first epoch's dataset copy: MixToken's re-packing (or a fractional ratio's
    # redraw) would silently never reach them
    from types import SimpleNamespace

    from mixtune.data.mix import MixDataset, check_persistent_workers
    from mixtune.errors import ConfigError
    from mixtune.train.run import train

    args = SimpleNamespace(dataloader_persistent_workers=True, dataloader_num_workers=2)
    parts = [list(range(4)), list(range(6))]
    check_persistent_workers(args, MixDataset(parts, ["a", "b"], [1, 2]))  # whole ratios: the same draw
    with pytest.raises(ConfigError, match="dataloader_persistent_workers"):
        check_persistent_workers(args, MixDataset(parts, ["a", "b"], [0.5, None]))
    red_image(tmp_path / "red.png")
    data = write_jsonl(tmp_path / "d.jsonl", [good()] * 4)
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), data, mixtoken=True, max_length=400,
                       dataloader_num_workers=1, dataloader_persistent_workers=True)
    with pytest.raises(ConfigError, match="MixToken"):
        train(load_config(cfg))
