"""The end-of-training throughput figures: real tokens/s is the tokens the trained batches carried over the train
time, counted by a hook of this test on the collator (independent of mixtune's own count); packing fill is
those tokens over the MixToken rows' capacity; metrics.json carries them."""

from __future__ import annotations

import json
import os

import pytest

import mixtune.train.run as run
from conftest import red_image, write_config, write_json
from mixtune.config import load_config
from mixtune.train.throughput import COUNT_KEY, METRIC_KEYS, BatchCounts, Throughput, count_batch, describe


class Recorder:
    """Wraps a collator; keeps what each collated batch carried, computed from the batch itself."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, batch):
        out = self.collate(batch)
        if isinstance(batch[0], list):  # MixToken packs: each row's samples, the row's tensor length
            real = sum(int(s.input_ids.numel()) for pack in batch for s in pack)
        else:  # padded batch: the attention mask marks each row's real tokens
            real = int(out["attention_mask"].sum())
        self.batches.append({"real": real, "positions": int(out["input_ids"].numel()), "rows": len(batch)})
        return out

    def __getattr__(self, name):
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


def varied_data(tmp_path, n=7):
    img = red_image(tmp_path / "red.png")
    records = [{"image": img, "conversations": [["<image>What colour is the shape?" + " Look closely." * (i % 4),
                                                 "red" + " indeed" * i]]} for i in range(n)]
    return write_json(tmp_path / "train.json", records)


def train_recorded(monkeypatch, config):
    recorders, trainers = [], []
    build = run.build_trainer

    def recorded(cfg):
        trainer = build(cfg)
        trainer.data_collator = Recorder(trainer.data_collator)
        recorders.append(trainer.data_collator)
        trainers.append(trainer)
        return trainer
    monkeypatch.setattr(run, "build_trainer", recorded)
    final = run.train(config)
    return final, recorders[0], trainers[0]


@pytest.mark.parametrize("mixtoken,accumulation", [(False, 2), (True, 1)])
def test_tokens_per_second_is_the_tokens_the_batches_carried_over_train_time(tiny_model_dir, tmp_path, monkeypatch,
                                                                            mixtoken, accumulation):
    # one whole epoch, no eval: every batch the collator built is a batch that trained
    cfg = load_config(write_config(tmp_path, tiny_model_dir("qwen2_vl"), varied_data(tmp_path), max_steps=-1,
                                   num_train_epochs=1, gradient_accumulation_steps=accumulation, mixtoken=mixtoken,
                                   max_length=400, benchmark=True,
                                   dataloader_num_workers=0))  # the recorder's list lives in this process
    final, recorder, trainer = train_recorded(monkeypatch, cfg)
    carried = sum(b["real"] for b in recorder.batches)
    positions = sum(b["positions"] for b in recorder.batches)
    lengths = trainer.train_dataset.lengths if mixtoken else trainer.train_dataset.lengths()
    assert carried == sum(lengths)  # each of the 7 samples trained exactly once
    assert final["train_real_samples"] == 7
    assert final["train_real_samples_per_second"] == pytest.approx(7 / final["train_runtime"], rel=1e-12)
    assert final["train_real_tokens"] == carried
    assert final["train_real_tokens_per_second"] == pytest.approx(carried / final["train_runtime"], rel=1e-12)
    assert final["train_token_fill"] == pytest.approx(carried / positions, rel=1e-12)
    if mixtoken:
        rows = sum(b["rows"] for b in recorder.batches)
        assert rows == len(trainer.train_dataset)
        assert final["train_packing_fill"] == pytest.approx(carried / (rows * 400), rel=1e-12)
        assert final["train_packing_fill"] == pytest.approx(trainer.train_dataset.fill(), rel=1e-12)
    else:
        assert "train_packing_fill" not in final
        assert final["train_token_fill"] < 1  # the samples differ in length: padding was computed
    assert final["train_peak_rss_mb"] > 100  # torch alone takes more
    assert "train_mfu" not in final  # CPU: no peak to compare with
    assert {k for k in final if k in METRIC_KEYS} == set(METRIC_KEYS) - {"train_mfu", "train_peak_gpu_mb"} - (
        set() if mixtoken else {"train_packing_fill"})
    saved = json.load(open(os.path.join(cfg.training.output_dir, "metrics.json")))["final"]
    assert saved["train_real_tokens"] == carried and saved["train_real_tokens_per_second"] == \
        final["train_real_tokens_per_second"]


def test_only_batches_that_train_are_counted():
    """A batch fetched ahead by the loader, or an eval batch, never passes training_step; a batch without text
    (image classification) adds rows but no tokens."""
    import torch

    counter = Throughput()
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2])
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": mask,
             COUNT_KEY: BatchCounts(tokens=8, positions=10, rows=2)}
    counter.take(batch)
    assert COUNT_KEY not in batch and (counter.tokens, counter.positions, counter.rows) == (8, 10, 2)
    counter.take({"pixel_values": torch.zeros(2, 3, 4, 4)})  # no counts: nothing added
    assert counter.rows == 2
    pixels = {"pixel_values": torch.zeros(2, 3, 4, 4), "labels": torch.zeros(2)}
    images = count_batch([object(), object()], pixels, None)
    assert images.tokens is None and images.rows == 2
    text = count_batch([object()], {"input_ids": torch.ones(1, 4), "attention_mask": torch.tensor([[1, 1, 0, 0]])},
                       None)
    assert text.tokens == 2 and text.positions == 4
    line = describe({"train_real_tokens": 8, "train_real_tokens_per_second": 4.0, "train_token_fill": 0.8,
                     "train_peak_rss_mb": 900.0, "train_mfu": 0.41})
    assert "4.0 real tokens/s" in line and "token fill 80.0%" in line and "MFU 41.0%" in line


def test_mfu_estimate_follows_transformers_flop_convention(tiny_model_dir, monkeypatch):
    """6 x non-embedding parameters per token (transformers' own count), over the peak the environment names;
    only with bf16/fp16, the precision GPU peaks are quoted for."""
    from types import SimpleNamespace

    from mixtune.models.loading import load_model_and_processor
    from mixtune.train.throughput import flops_per_token, throughput_metrics

    _, model, _ = load_model_and_processor(tiny_model_dir("qwen2_vl"))
    per_token = flops_per_token(model)
    assert per_token == 6 * model.num_parameters(exclude_embeddings=True)
    monkeypatch.setenv("MIXTUNE_PEAK_TFLOPS", "2e-6")  # 2 MFLOP/s
    counter = Throughput(tokens=1000, positions=1200, rows=4, has_tokens=True, has_positions=True)
    trainer = SimpleNamespace(throughput=counter, accelerator=SimpleNamespace(num_processes=1))
    out = throughput_metrics(trainer, 10.0, per_token, half_precision=True)
    assert out["train_mfu"] == pytest.approx(per_token * 1000 / 10.0 / 2e6)
    assert out["train_real_tokens_per_second"] == 100.0 and out["train_token_fill"] == pytest.approx(1000 / 1200)
    assert "train_mfu" not in throughput_metrics(trainer, 10.0, per_token, half_precision=False)
