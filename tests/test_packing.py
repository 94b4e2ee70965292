"""MixToken packing: packed rows give the same per-token losses and gradients as the samples unpacked."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest
import torch
from PIL import Image

from conftest import write_config, write_json
from mixtune.config import build_config, load_config
from mixtune.data.collate import PadCollator
from mixtune.data.dataset import build_split
from mixtune.data.encode import IGNORE_INDEX
from mixtune.data.pack import (PACKED_SDPA, PackCollator, PackedDataset, first_fit_decreasing, isolation_for,
                               use_packed_sdpa)
from mixtune.errors import ConfigError, DataError
from mixtune.models import registry
from mixtune.models.loading import load_model_and_processor
from video_fixtures import moving_square, write_frame_folder, write_tone, write_video

TOL = 1e-5


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir):
    return tiny_model_dir


def uneven_samples(tmp_path, processor, family, n_text_only: int = 1):
    """Samples of different lengths: images of different sizes, long and short replies, two turns, text only."""
    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / "sq.png")
    Image.new("RGB", (112, 56), (30, 30, 220)).save(tmp_path / "wide.png")
    long_reply = "a red square drawn on a plain white background, seen from above, " * 3
    records = [
        {"image": "sq.png", "conversations": [["<image>What colour is it?", "red"]]},
        {"image": "wide.png", "conversations": [["<image>Describe the image.", long_reply]]},
        {"image": "sq.png", "conversations": [["<image>Shape?", "square"], ["And the colour?", "red, mostly"]]},
        {"image": "wide.png", "conversations": [["<image>Colour?", "blue"]]},
    ] + [{"messages": [{"role": "user", "content": "Say hello."},
                       {"role": "assistant", "content": "hello there"}]}] * n_text_only
    data = write_json(tmp_path / "train.json", records)
    ds = build_split([{"name": "chatml_dataset", "data_files": data}], "train", processor, family, 4096,
                     str(tmp_path))
    return [ds[i] for i in range(len(ds))]


def uneven_video_samples(tmp_path, processor, family):
    """Video samples among image and text samples: a file, a frame folder over two turns, a video beside an
    image, each with its own M-RoPE temporal positions."""
    write_video(tmp_path / "right.mp4", moving_square(8, "right"))
    write_frame_folder(tmp_path / "up", moving_square(6, "up"))
    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / "sq.png")
    records = [
        {"messages": [{"role": "user", "content": "<video>Which way?"}, {"role": "assistant", "content": "right"}],
         "videos": ["right.mp4"]},
        {"messages": [{"role": "user", "content": "<image>Describe it."},
                      {"role": "assistant", "content": "a red square on white, " * 4}], "images": ["sq.png"]},
        {"messages": [{"role": "user", "content": "<video>Which way?"}, {"role": "assistant", "content": "up"},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes, upwards"}],
         "videos": ["up"]},
        {"messages": [{"role": "user", "content": "<image><video>Same colour?"},
                      {"role": "assistant", "content": "yes"}], "images": ["sq.png"], "videos": ["right.mp4"]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]},
    ]
    data = write_json(tmp_path / "video.json", records)
    ds = build_split([{"name": "messages", "data_files": data, "max_frames": 4}], "train", processor, family, 4096,
                     str(tmp_path))
    return [ds[i] for i in range(len(ds))]


def uneven_audio_samples(tmp_path, processor, family):
    """Audio samples of different clip lengths and replies, two turns, text only (for audio-only families)."""
    write_tone(tmp_path / "low.wav", 440, seconds=1.0)
    write_tone(tmp_path / "high.wav", 1320, seconds=2.5)
    records = [
        {"messages": [{"role": "user", "content": "<audio>Which tone?"}, {"role": "assistant", "content": "low"}],
         "audios": ["low.wav"]},
        {"messages": [{"role": "user", "content": "<audio>Describe it."},
                      {"role": "assistant", "content": "a steady high whistle, " * 4}], "audios": ["high.wav"]},
        {"messages": [{"role": "user", "content": "<audio>Which tone?"}, {"role": "assistant", "content": "high"},
                      {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "yes, high"}],
         "audios": ["high.wav"]},
        {"messages": [{"role": "user", "content": "<audio>Loud?"}, {"role": "assistant", "content": "no"}],
         "audios": ["low.wav"]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello there"}]},
    ]
    data = write_json(tmp_path / "audio.json", records)
    ds = build_split([{"name": "messages", "data_files": data}], "train", processor, family, 4096, str(tmp_path))
    return [ds[i] for i in range(len(ds))]


def loss_and_grads(model, inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def per_token_losses(logits, labels, starts_and_lengths):
    """Per-token CE of each sample's label tokens, in sample order, from one row or a padded batch."""
    out = []
    for row, start, length in starts_and_lengths:
        lg = logits[row, start: start + length - 1]
        lb = labels[row, start + 1: start + length]
        keep = lb != IGNORE_INDEX
        out.append(torch.nn.functional.cross_entropy(lg[keep].float(), lb[keep], reduction="none"))
    return torch.cat(out)


EQUALITY_CASES = [
    ("qwen2_vl", PACKED_SDPA, False),  # what mixtoken uses with SDPA
    ("qwen2_vl", "sdpa", False),  # block-diagonal mask built by transformers from the positions
    ("qwen2_vl", "eager", False),
    ("qwen2_vl", "sdpa", True),  # one flattened row, as under flash-attention varlen
    ("qwen2_5_vl", PACKED_SDPA, False),
    ("qwen2_5_vl", "sdpa", False),
    ("qwen3_vl", PACKED_SDPA, False),
    ("qwen3_vl", "sdpa", False),
    ("llava_next", PACKED_SDPA, False),
    ("llava_onevision", PACKED_SDPA, False),
    ("llava_next_video", PACKED_SDPA, False),
    ("internvl", PACKED_SDPA, False),
    ("qwen2_audio", PACKED_SDPA, False),
    ("idefics3", PACKED_SDPA, False),
    ("glm4v", PACKED_SDPA, False),
    ("smolvlm", PACKED_SDPA, False),
    ("llava", PACKED_SDPA, False),
    ("llava", "sdpa", False),
    ("llava", "eager", True),
    ("qwen_vl", PACKED_SDPA, False),
    ("qwen_vl", "sdpa", False),
    ("qwen_vl", "eager", False),
    # the native VisualGLM port always runs SDPA with GLM's own mask, built from the restarted 2-D positions
    # (each sample's prompt attended both ways); mixtune's packed-SDPA switch does not apply to it
    ("visualglm", "sdpa", False),
    ("cogvlm", PACKED_SDPA, False),  # token types travel per sample; CogVLM's positions restart at 0
    ("cogvlm", "sdpa", False),
    ("cogvlm", "eager", False),
]


def test_every_family_that_packs_is_proven_exact():
    """`mixtune list-models` says "packing: yes" exactly for the families the equality test covers."""
    packing = {f.name for f in registry.families() if f.pack_positions is not None}
    assert packing == {name for name, _, _ in EQUALITY_CASES}


# video samples packed: every family that reads video, with the isolations that apply
VIDEO_EQUALITY_CASES = [
    ("qwen2_vl", PACKED_SDPA, False, "video"),
    ("qwen2_vl", "sdpa", True, "video"),
    ("qwen2_5_vl", PACKED_SDPA, False, "video"),
    ("qwen3_vl", PACKED_SDPA, False, "video"),
    ("llava_onevision", PACKED_SDPA, False, "video"),
    ("llava_next_video", PACKED_SDPA, False, "video"),
]
SAMPLES = {"image": uneven_samples, "video": uneven_video_samples, "audio": uneven_audio_samples}


def media_of(name: str) -> str:
    """The equality test's samples for a family: images, or audio for audio-only families."""
    return "image" if registry.get_family(name).reads_images else "audio"


def test_every_family_that_reads_video_is_proven_to_pack_videos_exactly():
    video = {f.name for f in registry.families() if f.video_placeholder is not None and f.pack_positions}
    assert video == {name for name, *_ in VIDEO_EQUALITY_CASES}


@pytest.mark.parametrize("name,attn,flatten,media", [c + (media_of(c[0]),) for c in EQUALITY_CASES]
                         + VIDEO_EQUALITY_CASES)
def test_packed_loss_and_gradients_equal_unpacked(model_dirs, tmp_path, name, attn, flatten, media):
    # the reference runs the plain checkpoint (SDPA for mixtune's attention, which is switched on after)
    family, model, processor = load_model_and_processor(model_dirs(name), "sdpa" if attn == PACKED_SDPA else attn)
    model.eval()  # no dropout; gradients still flow
    samples = SAMPLES[media](tmp_path, processor, family)
    # a sample whose first token carries a label: unpacked it is never a target (nothing precedes it);
    # packed, the collator must mask it or the previous sample's last token would learn to predict it
    samples[1].labels[0] = samples[1].input_ids[0]
    packs = [[samples[0], samples[1], samples[4]], [samples[2], samples[3]]]  # two rows, uneven: a padded tail
    order = [s for pack in packs for s in pack]

    padded = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)(order)
    ref, ref_grads = loss_and_grads(model, padded)
    if attn == PACKED_SDPA:
        use_packed_sdpa(model)
        assert getattr(model.config, "text_config", model.config)._attn_implementation == PACKED_SDPA
        encoder = getattr(model.config, "vision_config", None) or getattr(model.config, "audio_config", None)
        # Qwen-VL: one config, own ViT attention; CogVLM: its published vision_config is a plain dict (own attention)
        assert encoder is None or isinstance(encoder, dict) or encoder._attn_implementation == "sdpa"
    packed = PackCollator(processor.tokenizer.pad_token_id, partial(family.pack_positions, model), flatten,
                         collate_media=family.collate_media)(packs)
    assert "attention_mask" not in packed and packed["use_cache"] is False
    got, grads = loss_and_grads(model, packed)

    ref_tokens = per_token_losses(ref.logits, padded["labels"], [(i, 0, len(s)) for i, s in enumerate(order)])
    spans, offset = [], 0
    for r, pack in enumerate([order] if flatten else packs):
        offset = 0
        for s in pack:
            spans.append((r, offset, len(s)))
            offset += len(s)
    got_tokens = per_token_losses(got.logits, packed["labels"], spans)
    assert got_tokens.shape == ref_tokens.shape and got_tokens.numel() > 20
    assert (got_tokens - ref_tokens).abs().max() <= TOL
    assert abs(got.loss.item() - ref.loss.item()) <= TOL
    assert ref_grads.keys() == grads.keys()
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    assert worst <= TOL, worst
    # the trainer's token count (labels[..., 1:]) is the same packed as unpacked
    assert packed["labels"][..., 1:].ne(IGNORE_INDEX).sum() == padded["labels"][..., 1:].ne(IGNORE_INDEX).sum()


def test_without_restarted_positions_samples_leak(model_dirs, tmp_path):
    """The check above can fail: the same row with plain 0..L-1 positions gives different losses."""
    family, model, processor = load_model_and_processor(model_dirs("llava"), "sdpa")
    model.eval()
    samples = uneven_samples(tmp_path, processor, family, n_text_only=0)
    pad_id = processor.tokenizer.pad_token_id
    with torch.no_grad():
        ref = model(**PadCollator(pad_id)(samples)).loss
        leaky = PackCollator(pad_id, lambda s: torch.arange(len(s)))([samples])
        leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1])[None]
        assert abs(model(**leaky).loss.item() - ref.item()) > 1e-3


@pytest.mark.parametrize("attn,on_gpu,expected", [
    ("flash_attention_2", True, "varlen"), ("flash_attention_3", True, "varlen"),
    ("sdpa", False, "per_sample_sdpa"), ("sdpa", True, "mask"), ("eager", False, "mask"),
    ("flex_attention", True, "mask")])
def test_each_attention_implementation_gets_its_isolation(attn, on_gpu, expected):
    assert isolation_for(attn, on_gpu) == expected


def test_first_fit_decreasing_packs_every_sample_once_within_capacity():
    lengths = [500, 20, 300, 210, 90, 90, 400, 12, 101, 512, 33, 33, 33]
    bins = first_fit_decreasing(lengths, 512, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    assert len(bins) == -(-sum(lengths) // 512)  # optimal here: as few rows as the token count allows
    assert first_fit_decreasing(lengths, 512, seed=0) == bins  # reproducible from the seed
    with pytest.raises(ValueError, match="sample 9"):
        first_fit_decreasing(lengths, 511)
    with pytest.raises(DataError, match="sample 9 has 512 tokens.*raise max_length"):
        PackedDataset(list(range(len(lengths))), 511, lengths=lengths)


def test_first_fit_decreasing_is_first_fit():
    # longest first: 6 -> bin 0 (3 left), 5 -> bin 1 (4 left), 4 -> bin 1 (first with room), 3 -> bin 0,
    # 2 -> bin 2, 1 -> bin 2
    assert first_fit_decreasing([2, 3, 5, 1, 4, 6], 9) == [[5, 1], [2, 4], [0, 3]]


def test_packs_are_redrawn_each_epoch_from_the_seed():
    class Redrawn(list):  # a dataset that redraws its samples per epoch, like a weighted mixture
        def set_epoch(self, epoch):
            self[:] = [10 + (i * 7 + epoch * 3) % 40 for i in range(30)]

        def lengths(self):
            return list(self)

    def fresh():
        data = Redrawn()
        data.set_epoch(0)
        return data

    packed = PackedDataset(fresh(), 64, seed=0)
    first = [list(p) for p in packed.packs]
    packed.set_epoch(1)
    data = packed.dataset
    assert packed.lengths == data.lengths() and packed.packs != first
    assert sorted(i for p in packed.packs for i in p) == list(range(30))
    assert all(sum(data[i] for i in p) <= 64 for p in packed.packs)
    again = PackedDataset(fresh(), 64, seed=0)
    again.set_epoch(1)
    assert again.packs == packed.packs  # the same seed and epoch give the same rows


def test_packed_dataset_serves_packs_with_images_in_order(model_dirs, tmp_path):
    family, model, processor = load_model_and_processor(model_dirs("qwen2_vl"))
    samples = uneven_samples(tmp_path, processor, family)
    packed = PackedDataset(samples, max_length=160, seed=0, lengths=[len(s) for s in samples])
    assert sorted(i for p in packed.packs for i in p) == list(range(len(samples)))
    batch = PackCollator(0, partial(family.pack_positions, model))([packed[k] for k in range(len(packed))])
    assert batch["input_ids"].shape[1] <= 160
    in_order = [samples[i] for p in packed.packs for i in p if "pixel_values" in samples[i].media]
    assert torch.equal(batch["pixel_values"], torch.cat([s.media["pixel_values"] for s in in_order]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([s.media["image_grid_thw"] for s in in_order]))
    # M-RoPE positions: 4 rows (text + t/h/w); every sample restarts at 0 in all of them
    assert batch["position_ids"].shape == (4, len(packed), batch["input_ids"].shape[1])
    width = batch["input_ids"].shape[1]
    for r, pack in enumerate(packed.packs):
        used = sum(len(samples[i]) for i in pack)
        starts = (batch["position_ids"][:, r] == 0).all(dim=0).nonzero().flatten().tolist()
        expected = [sum(len(samples[i]) for i in pack[:k]) for k in range(len(pack))]
        assert starts == expected + ([used] if used < width else [])  # a padded tail restarts once more


def test_mixtoken_trains_end_to_end(model_dirs, tmp_path):
    from mixtune.train.run import build_trainer

    img = "sq.png"
    Image.new("RGB", (112, 112), (220, 30, 30)).save(tmp_path / img)
    records = [{"image": img, "conversations": [["<image>What colour is the shape?", "red " * (1 + i % 7)]]}
               for i in range(12)]
    data = write_json(tmp_path / "data.json", records)
    cfg = load_config(write_config(tmp_path, model_dirs("qwen2_vl"), data, mixtoken=True, max_length=256,
                                   max_steps=3, learning_rate=5e-3))
    trainer = build_trainer(cfg)
    assert isinstance(trainer.train_dataset, PackedDataset)
    assert len(trainer.train_dataset) < 12  # several samples per row
    assert trainer.model.config.text_config._attn_implementation == PACKED_SDPA
    assert trainer.data_collator.flatten is False
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model(cfg.training.output_dir)
    assert PACKED_SDPA not in open(f"{cfg.training.output_dir}/config.json").read()  # checkpoints stay plain


def test_family_without_packing_hook_is_refused_when_config_is_read(model_dirs, monkeypatch, tmp_path):
    table = registry._load()
    monkeypatch.setitem(table, "llava", dataclasses.replace(table["llava"], pack_positions=None))
    (tmp_path / "d.jsonl").write_text("")  # data files must exist when the config is read
    raw = {"model_name_or_path": model_dirs("llava"), "mixtoken": True,
           "dataset": {"train": [{"name": "chatml_dataset", "data_files": str(tmp_path / "d.jsonl")}]},
           "output_dir": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match="mixtoken.*llava.*cannot pack"):
        build_config(raw)
    raw["mixtoken"] = False
    build_config(raw)  # fine without packing


def test_paddlemix_length_grouping_gives_way_to_packing(model_dirs, tmp_path):
    (tmp_path / "d.jsonl").write_text("")  # data files must exist when the config is read
    raw = {"model_name_or_path": model_dirs("qwen2_vl"), "mixtoken": True,
           "dataset": {"train": [{"name": "chatml_dataset", "data_files": str(tmp_path / "d.jsonl")}]},
           "group_by_modality_length": True, "output_dir": str(tmp_path / "o")}
    cfg = build_config(raw)
    assert cfg.training.train_sampling_strategy == "random"
    assert any("group_by_length has no effect with mixtoken" in n for n in cfg.notes)


# ---- mixtune's packed SDPA: every sample of every row in a few batched calls, not one call per sample ----

def per_sample_reference(query, key, value, lengths_per_row, groups):
    """SDPA on each sample alone, one call per sample: what the batched attention must reproduce."""
    rows = []
    for b, lengths in enumerate(lengths_per_row):
        parts, start = [], 0
        for n in lengths:
            k = key[b:b + 1, :, start:start + n].repeat_interleave(groups, dim=1)
            v = value[b:b + 1, :, start:start + n].repeat_interleave(groups, dim=1)
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:start + n], k, v, is_causal=True).transpose(1, 2))
            start += n
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


def test_batched_packed_sdpa_equals_sdpa_per_sample_with_several_length_buckets():
    """Lengths 1..60 in two rows (the second with a padded tail) fall into several buckets; the output and
    the gradients of query, key and value equal SDPA run on each sample alone (fp32, GQA 4 heads over 2)."""
    from types import SimpleNamespace

    from mixtune.data import pack

    lengths_per_row = [[60, 1, 3, 17, 7, 2, 30], [33, 9, 4, 25, 41, 5]]
    length = max(sum(r) for r in lengths_per_row)
    lengths_per_row[1].append(length - sum(lengths_per_row[1]))  # the tail, positions 0.. like the collator's
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    torch.manual_seed(0)
    q = torch.randn(2, 4, length, 16, requires_grad=True)
    k, v = (torch.randn(2, 2, length, 16, requires_grad=True) for _ in range(2))
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)

    layout = pack.sample_layout(pos, 2, length)
    assert 2 < len(layout.buckets) <= pack.MAX_BUCKETS
    # every token has exactly one slot, and its slot reads the token itself
    gathered = torch.cat([b.reshape(-1) for b in layout.buckets])[layout.inverse]
    assert torch.equal(gathered, torch.arange(2 * length))
    for bucket in layout.buckets[:-1]:  # a bucket is as long as its longest sample, its shortest within the spread
        lens = (bucket != bucket[:, :1]).sum(1) + 1
        assert lens.max() == bucket.shape[1] and lens.min() * pack.BUCKET_SPREAD >= bucket.shape[1]
    assert sum(b.shape[0] for b in layout.buckets) == sum(len(r) for r in lengths_per_row)

    got, _ = pack.packed_sdpa_attention(module, q, k, v, None, position_ids=pos, scaling=16 ** -0.5)
    ref = per_sample_reference(q, k, v, lengths_per_row, 2)
    assert got.shape == ref.shape == (2, length, 4, 16)
    assert (got - ref).abs().max() <= TOL
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((got * weights).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= TOL


def test_packed_layout_is_worked_out_once_per_forward(model_dirs, tmp_path, monkeypatch):
    """Every layer of a forward (and the backward) reuses the layout of the first; a new batch gets its own."""
    from mixtune.data import pack

    calls = []
    real = pack.sample_layout
    monkeypatch.setattr(pack, "sample_layout", lambda *a: calls.append(1) or real(*a))
    family, model, processor = load_model_and_processor(model_dirs("llava"), "sdpa")
    samples = uneven_samples(tmp_path, processor, family)
    use_packed_sdpa(model)
    collate = PackCollator(processor.tokenizer.pad_token_id, partial(family.pack_positions, model))
    assert model.config.text_config.num_hidden_layers >= 2
    model(**collate([samples[:3], samples[3:]])).loss.backward()
    assert len(calls) == 1
    model(**collate([samples[:2], samples[2:]])).loss.backward()
    assert len(calls) == 2
