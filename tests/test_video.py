"""Video inputs: readers, decoding budgets, bad videos, labels, training, reload and truncation, for every family
that lists video. Videos are generated here: mp4 files written with PyAV, frame folders with Pillow."""

import json
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import write_config
from mixtune.config import load_config
from mixtune.data.dataset import DatasetEntry, build_split, read_entry
from mixtune.data.encode import IGNORE_INDEX, media_inputs
from mixtune.errors import ConfigError, DataError
from mixtune.media.video import VideoBudget, load_video
from mixtune.models.registry import families, get_family
from video_fixtures import moving_square, write_frame_folder, write_video

VIDEO_FAMILIES = [f.name for f in families() if f.video_placeholder is not None]


def test_the_video_families_are_the_ones_whose_processors_take_video():
    assert VIDEO_FAMILIES == ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video", "llava_onevision"]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def ask(video_key_value=None, question="<video>Which way does the square move?", answer="right"):
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    if video_key_value is not None:
        row["videos"] = video_key_value
    return row


@pytest.fixture
def clips(tmp_path):
    write_video(tmp_path / "right.mp4", moving_square(8, "right"))
    write_video(tmp_path / "left.mp4", moving_square(8, "left"))
    write_frame_folder(tmp_path / "up", moving_square(6, "up"))
    return tmp_path


def entry(tmp_path, name, data_files, **keys):
    return DatasetEntry.from_config({"name": name, "data_files": data_files, **keys}, str(tmp_path), "test")


# ---- readers: every shape carries its videos, in placeholder order ----

def test_readers_carry_videos_from_every_shape(clips):
    t = clips
    rows = {
        "messages": [ask(["right.mp4"]),
                     {"messages": [{"role": "user", "content": [
                         {"type": "video_url", "video_url": {"url": "left.mp4"}}, {"type": "text", "text": "Way?"}]},
                         {"role": "assistant", "content": "left"}]},
                     {"messages": [{"role": "user", "content": [{"type": "video", "video": ["up/0000.png",
                                                                                           "up/0001.png"]}]},
                                   {"role": "assistant", "content": "up"}]}],
        "chatml_dataset": [{"video": "up", "conversations": [["Way?", "up"]]}],
        "llava": [{"videos": ["right.mp4"], "conversations": [{"from": "human", "value": "Way?"},
                                                             {"from": "gpt", "value": "right"}]}],
    }
    got = {}
    for reader, records in rows.items():
        got[reader] = [(c.videos, c.turns[-2].text) for c in read_entry(entry(t, reader, write_jsonl(
            t / f"{reader}.jsonl", records)))]
    assert got["messages"] == [([str(t / "right.mp4")], "<video>Which way does the square move?"),
                               ([str(t / "left.mp4")], "<video>Way?"),
                               ([[str(t / "up/0000.png"), str(t / "up/0001.png")]], "<video>")]
    # without a placeholder the video goes before the first user text (LLaVA's and PaddleMIX's convention)
    assert got["chatml_dataset"] == [([str(t / "up")], "<video>Way?")]
    assert got["llava"] == [([str(t / "right.mp4")], "<video>Way?")]


def test_placeholder_count_must_match_the_videos(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [ask(["a.mp4", "b.mp4"])])
    with pytest.raises(DataError) as e:
        read_entry(entry(tmp_path, "messages", "d.jsonl"))
    assert (e.value.index, e.value.field) == (0, "videos")
    assert "1 '<video>' placeholder(s) but 2 video(s)" in e.value.reason


# ---- decoding: fps, frame counts, pixel budgets ----

def test_fps_and_frame_limits_pick_evenly_spread_frames(tmp_path):
    write_video(tmp_path / "v.mp4", moving_square(20, "right"), fps=10)  # 2 seconds
    v = load_video(str(tmp_path / "v.mp4"), VideoBudget(fps=2.0))
    assert (len(v), v.total_frames, v.indices) == (4, 20, (0, 5, 10, 15))
    assert v.fps == pytest.approx(2.0)
    assert len(load_video(str(tmp_path / "v.mp4"), VideoBudget(fps=10.0, max_frames=6))) == 6
    assert len(load_video(str(tmp_path / "v.mp4"), VideoBudget(fps=0.5, min_frames=3))) == 3
    folder = write_frame_folder(tmp_path / "f", moving_square(10, "up"))
    assert len(load_video(str(tmp_path / folder), VideoBudget(max_frames=5))) == 5


def test_pixel_budgets_shrink_frames_per_frame_and_in_total(tmp_path):
    write_video(tmp_path / "v.mp4", moving_square(8, "right", side=112), fps=4)
    v = load_video(str(tmp_path / "v.mp4"), VideoBudget(fps=4.0))
    assert v.size == (112, 112) and len(v) == 8
    w, h = VideoBudget(max_pixels=56 * 56).fit(v).size
    assert (w, h) == (56, 56)
    fitted = VideoBudget(total_pixels=8 * 28 * 28).fit(v)
    assert fitted.size == (28, 28) and len(fitted) == 8
    # truncation: downscale loses frames first (down to min_frames), then resolution
    half = VideoBudget(min_frames=2).fit(v, 0.5)
    assert (len(half), half.size) == (4, (112, 112))
    small = VideoBudget(min_frames=4).fit(v, 0.25)
    assert len(small) == 4 and small.size == (79, 79)  # the rest of the factor: sqrt(0.5) in each side


def test_video_entry_keys_are_checked():
    for raw, message in (({"fps": 0}, "expected a positive number"), ({"max_frames": 2.5}, "a positive integer"),
                         ({"min_frames": 8, "max_frames": 4}, "min_frames (8) is above max_frames (4)"),
                         ({"video_total_pixels": "big"}, "a positive integer")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            DatasetEntry.from_config({"name": "messages", "data_files": "x", **raw}, ".", "dataset.train[0]")


# ---- bad videos: named errors, or counted skips ----

@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")), get_family("qwen2_vl")


def bad_videos(t):
    (t / "corrupt.mp4").write_bytes(os.urandom(2000))
    (t / "empty.mp4").write_bytes(b"")
    os.makedirs(t / "noframes", exist_ok=True)
    (t / "noframes" / "readme.txt").write_text("no frames here")
    write_frame_folder(t / "tiny", moving_square(4, "up", side=8))
    return {"corrupt.mp4": "cannot decode video", "empty.mp4": "video file is empty",
            "missing.mp4": "video not found", "noframes": "video folder holds no frame images",
            "tiny": "under 28 pixels a side"}


def test_bad_videos_stop_with_file_index_and_field(clips, qwen):
    cases = bad_videos(clips)
    for name, reason in cases.items():
        write_jsonl(clips / "d.jsonl", [ask(["right.mp4"]), ask([name])])
        with pytest.raises(DataError) as e:
            build_split([{"name": "messages", "data_files": "d.jsonl"}], "train", *qwen, 1024, str(clips))
        assert (e.value.file, e.value.index, e.value.field) == (str(clips / "d.jsonl"), 1, "videos"), name
        assert reason in e.value.reason, (name, e.value.reason)


def test_bad_videos_are_counted_under_skip(clips, qwen):
    cases = bad_videos(clips)
    write_jsonl(clips / "d.jsonl", [ask(["right.mp4"])] + [ask([name]) for name in cases] + [ask(["up"])])
    mix = build_split([{"name": "messages", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *qwen,
                      1024, str(clips))
    assert [c.index for c in mix.parts[0].conversations] == [0, len(cases) + 1]
    assert [(r["index"], r["field"]) for r in mix.skipped] == [(i + 1, "videos") for i in range(len(cases))]


# ---- per family: labels, training, reload, a different video ----

def test_labels_cover_exactly_the_reply_for_every_video_family(clips, tiny_model_dir):
    write_jsonl(clips / "d.jsonl", [ask(["right.mp4"]), ask(["up"], answer="up")])
    for name in VIDEO_FAMILIES:
        processor = AutoProcessor.from_pretrained(tiny_model_dir(name))
        mix = build_split([{"name": "messages", "data_files": "d.jsonl", "max_frames": 4}], "train", processor,
                          get_family(name), 1024, str(clips))
        video_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)
        for i, answer in ((0, "right"), (1, "up")):
            enc = mix.parts[0][i]
            labelled = processor.decode(enc.labels[enc.labels != IGNORE_INDEX])
            assert labelled.strip() == answer + processor.tokenizer.eos_token, (name, labelled)
            assert (enc.input_ids == video_id).sum() > 0 and (enc.labels[enc.input_ids == video_id]
                                                              == IGNORE_INDEX).all(), name
            assert "pixel_values_videos" in enc.media, name


def video_inputs(processor, path):
    budget = VideoBudget(max_frames=4)
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], **media_inputs(processor, [load_video(str(path), budget)]), return_tensors="pt")


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_training_lowers_loss_and_reloads_with_equal_logits(tiny_model_dir, clips, family):
    from mixtune.train.run import build_trainer

    rows = [ask(["right.mp4"]), ask(["left.mp4"], answer="left"), ask(["up"], answer="up")] * 3
    train_file = str(clips / write_jsonl(clips / "train.jsonl", rows))
    cfg = load_config(write_config(clips, tiny_model_dir(family), train_file, max_steps=8, learning_rate=5e-3,
                                   lr_scheduler_type="constant", per_device_train_batch_size=3,
                                   dataset={"train": [{"name": "messages", "data_files": train_file,
                                                       "max_frames": 4}]}))
    trainer = build_trainer(cfg)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    out = cfg.training.output_dir
    trainer.save_model(out)

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    inputs = video_inputs(processor, clips / "right.mp4")
    trained = trainer.model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits
        assert torch.allclose(trained(**inputs).logits, logits, atol=1e-5)
        other = model(**video_inputs(processor, clips / "left.mp4")).logits
    assert (other - logits).abs().max() > 1e-3  # the model reads the video


# ---- media-safe truncation ----

def test_over_long_videos_are_dropped_or_lose_frames_then_resolution(clips, qwen):
    write_video(clips / "long.mp4", moving_square(16, "right", side=112), fps=4)
    write_jsonl(clips / "d.jsonl", [ask(["right.mp4"]), ask(["long.mp4"])])
    base = {"name": "messages", "data_files": "d.jsonl", "max_frames": 16, "fps": 4}
    full = build_split([base], "train", *qwen, 4096, str(clips)).parts[0]
    short, long_ = full.lengths()
    limit = short + 40
    assert long_ > limit
    dropped = build_split([{**base, "on_bad_sample": "skip"}], "train", *qwen, limit, str(clips))
    assert [c.index for c in dropped.parts[0].conversations] == [0]
    assert [r["index"] for r in dropped.skipped] == [1] and "max_length" in dropped.skipped[0]["reason"]

    fitted = build_split([{**base, "truncation": "downscale"}], "train", *qwen, limit, str(clips)).parts[0]
    assert len(fitted) == 2 and fitted.scales[1] < 1.0
    enc = fitted[1]
    assert len(enc) <= limit
    grid = enc.media["video_grid_thw"][0].tolist()
    video_id = qwen[0].tokenizer.convert_tokens_to_ids("<|video_pad|>")
    # the whole video span is kept: as many video tokens as the grid says (merge 2x2)
    assert (enc.input_ids == video_id).sum().item() == grid[0] * grid[1] * grid[2] // 4
    assert enc.media["pixel_values_videos"].shape[0] == grid[0] * grid[1] * grid[2]


def test_one_frame_count_per_batch_where_the_model_needs_it(clips, tiny_model_dir):
    """LLaVA-OneVision / LLaVA-NeXT-Video read videos as (videos, frames, ...): a batch with two frame counts is
    refused naming the fix, and min_frames = max_frames gives every video that count (short ones repeat)."""
    write_jsonl(clips / "d.jsonl", [ask(["right.mp4"]), ask(["up"], answer="up")])  # 8 and 6 frames
    for name in ("llava_onevision", "llava_next_video"):
        family = get_family(name)
        processor = AutoProcessor.from_pretrained(tiny_model_dir(name))
        uneven = build_split([{"name": "messages", "data_files": "d.jsonl", "fps": 100, "max_frames": 8}], "train",
                             processor, family, 4096, str(clips)).parts[0]
        with pytest.raises(ConfigError, match=r"videos of \[6, 8\] frames.*min_frames equal to max_frames"):
            family.collate_media([uneven[0].media, uneven[1].media])
        even = build_split([{"name": "messages", "data_files": "d.jsonl", "fps": 100, "min_frames": 8,
                             "max_frames": 8}], "train", processor, family, 4096, str(clips)).parts[0]
        batch = family.collate_media([even[0].media, even[1].media])
        assert batch["pixel_values_videos"].shape[:2] == (2, 8)


def test_predict_keeps_each_video_prompt_apart(clips, tiny_model_dir, tmp_path):
    """`mixtune predict`: the same question about two videos is two prompts, each with its own video."""
    from mixtune.infer.engine import Engine, GenerationOptions
    from mixtune.infer.predict import predict, read_prompts

    write_jsonl(clips / "p.jsonl", [ask(["right.mp4"]), ask(["left.mp4"], answer="left")])
    items = read_prompts([entry(clips, "messages", "p.jsonl", max_frames=4)])
    assert [i.conv.videos for i in items] == [[str(clips / "right.mp4")], [str(clips / "left.mp4")]]
    summary = predict(Engine.load(tiny_model_dir("qwen2_vl")), items, GenerationOptions(max_new_tokens=2),
                      str(tmp_path / "preds"), metrics=("exact_match",), progress=False)
    assert len(open(summary["predictions"]).read().splitlines()) == 2
