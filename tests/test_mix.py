"""Mixing: per-entry counts over an epoch, per-epoch redraws, lengths() aligned with samples, max_samples,
the length cache, and a three-format config that trains and reports eval loss per entry and overall."""

import json
import os

import numpy as np
import pytest
from transformers import AutoProcessor

from conftest import red_image, write_config, write_json
from mixtune.config import load_config
from mixtune.data.dataset import build_split
from mixtune.data.mix import MixDataset
from mixtune.models.registry import get_family
from mixtune.train.run import train


class FakePart:
    def __init__(self, name, n):
        self.name, self.n, self.skipped = name, n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.name, i)

    def lengths(self):
        return [1000 * (ord(self.name) - 96) + i for i in range(self.n)]  # unique per sample


def test_ratio_and_repeat_give_expected_counts_every_epoch():
    parts = [FakePart("a", 1000), FakePart("b", 700), FakePart("c", 333), FakePart("d", 50)]
    weights = [0.5, 2.0, 1.37, 3]  # ratio, ratio, ratio, repeat
    mix = MixDataset(parts, ["a", "b", "c", "d"], weights, seed=0)
    expected = {"a": 500, "b": 1400, "c": 456, "d": 150}
    seen = {name: np.zeros(p.n) for name, p in zip("abcd", parts)}
    draws = []
    for epoch in range(20):
        mix.set_epoch(epoch)
        counts = {name: 0 for name in "abcd"}
        for i in range(len(mix)):
            name, j = mix[i]
            counts[name] += 1
            seen[name][j] += 1
        for name, n in expected.items():
            assert abs(counts[name] - n) <= 0.01 * n, (epoch, name, counts[name])
        assert len(mix) == sum(expected.values())
        draws.append(tuple(mix.index[mix.which == 0][:50]))
    assert len(set(draws)) == 20  # a new draw each epoch
    # over epochs every sample is drawn about `weight` times per epoch
    for name, w in zip("abcd", weights):
        assert seen[name].mean() / 20 == pytest.approx(w, rel=0.01)
    assert seen["b"].min() >= 2 * 20 and seen["d"].min() == seen["d"].max() == 60
    # same seed and epoch, same draw; another seed, another draw
    again = MixDataset(parts, list("abcd"), weights, seed=0)
    again.set_epoch(19)
    assert np.array_equal(again.index, mix.index)
    other = MixDataset(parts, list("abcd"), weights, seed=1)
    other.set_epoch(19)
    assert not np.array_equal(other.index, mix.index)


def test_lengths_follow_the_epoch_draw():
    parts = [FakePart("a", 30), FakePart("b", 20)]
    mix = MixDataset(parts, ["a", "b"], [0.5, 1.5], seed=3)
    for epoch in range(3):
        mix.set_epoch(epoch)
        lengths = mix.lengths()
        assert len(lengths) == len(mix) == 15 + 30
        for i in range(len(mix)):
            name, j = mix[i]
            assert lengths[i] == parts["ab".index(name)].lengths()[j]


def test_concatenation_by_default():
    parts = [FakePart("a", 3), FakePart("b", 2)]
    mix = MixDataset(parts, ["a", "b"])
    assert [mix[i] for i in range(len(mix))] == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")), get_family("qwen2_vl")


def qa_file(tmp_path, name, n):
    img = red_image(tmp_path / "red.png")
    return write_json(tmp_path / name, [{"image": img, "question": f"Q{i}?", "answer": f"A{i}"} for i in range(n)])


def test_max_samples_and_ratio_through_build_split(tmp_path, qwen):
    qa_file(tmp_path, "a.json", 12)
    qa_file(tmp_path, "b.json", 10)
    mix = build_split([{"name": "vqa", "data_files": "a.json", "max_samples": 5},
                       {"name": "vqa", "data_files": "b.json", "ratio": 0.5}], "train", *qwen, 512, str(tmp_path))
    assert [len(p) for p in mix.parts] == [5, 10]
    assert [c.turns[0].text for c in mix.parts[0].conversations] == [f"<image>Q{i}?" for i in range(5)]
    assert len(mix) == 10 and len(mix.lengths()) == 10
    from mixtune.errors import ConfigError
    with pytest.raises(ConfigError, match="train"):
        build_split([{"name": "vqa", "data_files": "a.json", "ratio": 2}], "eval", *qwen, 512, str(tmp_path))
    with pytest.raises(ConfigError, match=r"dataset.train\[0\].*did you mean 'ratio'"):
        build_split([{"name": "vqa", "data_files": "a.json", "ration": 2}], "train", *qwen, 512, str(tmp_path))


def test_lengths_are_cached_and_the_key_follows_content(tmp_path, qwen, monkeypatch):
    import mixtune.data.dataset as dataset_module

    path = qa_file(tmp_path, "a.json", 6)
    cache = str(tmp_path / "cache")
    entries = [{"name": "vqa", "data_files": "a.json"}]
    first = build_split(entries, "train", *qwen, 512, str(tmp_path), cache_dir=cache).lengths()
    assert len(os.listdir(cache)) == 1
    calls = []
    real = dataset_module.measure
    monkeypatch.setattr(dataset_module, "measure", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert build_split(entries, "train", *qwen, 512, str(tmp_path), cache_dir=cache).lengths() == first
    assert calls == []  # served from the cache
    build_split(entries, "train", *qwen, 256, str(tmp_path), cache_dir=cache)  # other max_length: new key
    assert len(calls) == 6
    records = json.load(open(path))
    records[0]["answer"] = "a much longer answer than before"
    write_json(path, records)
    changed = build_split(entries, "train", *qwen, 512, str(tmp_path), cache_dir=cache).lengths()
    assert len(calls) == 12 and changed[0] > first[0] and changed[1:] == first[1:]
    assert len(os.listdir(cache)) == 3


def test_three_formats_train_with_eval_loss_per_entry_and_overall(tiny_model_dir, tmp_path):
    img = red_image(tmp_path / "red.png")
    write_json(tmp_path / "captions.json", [{"image": img, "caption": "a red square"}] * 4)
    (tmp_path / "vqa.jsonl").write_text(
        "".join(json.dumps({"image": img, "question": "Colour?", "answer": "red"}) + "\n" for _ in range(4)))
    write_json(tmp_path / "llava.json", [{"image": img, "conversations": [
        {"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "square"}]}] * 4)
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), "unused", max_steps=3, eval_strategy="steps",
                       eval_steps=3, per_device_eval_batch_size=3, dataset={
                           "train": [{"name": "coco_caption", "data_files": "captions.json", "ratio": 0.5},
                                     {"name": "vqa", "data_files": "vqa.jsonl"},
                                     {"name": "llava", "data_files": "llava.json", "repeat": 2}],
                           "eval": [{"name": "coco_caption", "data_files": "captions.json"},
                                    {"name": "vqa", "data_files": "vqa.jsonl", "max_samples": 2}]})
    metrics = train(load_config(cfg))
    assert metrics["train_loss"] > 0
    per_entry = {k: metrics[f"eval_{k}_loss"] for k in ("captions", "vqa")}
    assert metrics["eval_loss"] == pytest.approx((4 * per_entry["captions"] + 2 * per_entry["vqa"]) / 6)
    assert per_entry["captions"] != per_entry["vqa"]
    history = json.load(open(tmp_path / "out" / "metrics.json"))["log_history"]
    assert any("eval_loss" in h for h in history) and any("eval_vqa_loss" in h for h in history)
