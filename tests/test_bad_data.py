"""Bad data: each class stops with file, index (or line) and reason under on_bad_sample "error", and is
skipped, counted and reported under "skip"; over-long samples are dropped (or downscaled), never cut."""

import json
import re

import pytest
from PIL import Image
from transformers import AutoProcessor

from conftest import red_image, write_config
from mixtune.cli import main
from mixtune.config import load_config
from mixtune.data.dataset import build_split
from mixtune.errors import DataError
from mixtune.models.registry import get_family


@pytest.fixture(scope="module")
def qwen(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir("qwen2_vl")), get_family("qwen2_vl")


def good(img="red.png"):
    return {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
            "images": [img]}


def make_bad(tmp_path, case):
    """(record or raw JSONL line, expected reason regex) for one bad-data class."""
    d = tmp_path
    if case == "malformed_line":
        return '{"messages": [oops', r"malformed JSON line"
    if case == "missing_field":
        return {"images": ["red.png"]}, r"missing field: expected one of \['messages', 'conversations'\]"
    if case == "unknown_role":
        return {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}, \
            r"field 'role': unknown role 'bot'"
    if case == "role_order":
        return {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, \
            r"field 'role': broken role order"
    if case == "missing_image":
        return good("ghost.png"), r"field 'image': image not found: .*ghost.png"
    if case == "corrupt_image":
        (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
        return good("corrupt.png"), r"field 'image': cannot decode image .*corrupt.png"
    if case == "empty_image":
        (d / "empty.png").write_bytes(b"")
        return good("empty.png"), r"field 'image': image file is empty"
    if case == "bomb_image":
        Image.new("1", (9000, 9000)).save(d / "bomb.png")  # 81 MP in a few kB
        return good("bomb.png"), r"field 'image': image is too large \(9000x9000"
    if case == "placeholder_mismatch":
        rec = good()
        rec["messages"][0]["content"] = "<image><image>Two?"
        return rec, r"field 'image': 2 '<image>' placeholder\(s\) but 1 image"
    raise AssertionError(case)


CASES = ["malformed_line", "missing_field", "unknown_role", "role_order", "missing_image", "corrupt_image",
         "empty_image", "bomb_image", "placeholder_mismatch"]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", CASES)
def test_each_bad_class_errors_naming_file_line_and_index(tmp_path, qwen, case):
    red_image(tmp_path / "red.png")
    bad, reason = make_bad(tmp_path, case)
    write_jsonl(tmp_path / "d.jsonl", [good(), good(), bad, good()])
    with pytest.raises(DataError) as info:
        build_split([{"name": "sharegpt", "data_files": "d.jsonl"}], "train", *qwen, 512, str(tmp_path))
    e = info.value
    assert (e.file, e.index, e.line) == (str(tmp_path / "d.jsonl"), 2, 3)
    assert re.search(reason, str(e)), str(e)
    assert str(e).startswith(f"{tmp_path / 'd.jsonl'}, line 3, sample 2")


def test_skip_drops_each_bad_class_counts_it_and_keeps_the_rest(tmp_path, qwen):
    red_image(tmp_path / "red.png")
    rows, reasons = [], {}
    for case in CASES:
        rows.append(good())
        bad, reason = make_bad(tmp_path, case)
        reasons[len(rows)] = reason
        rows.append(bad)
    write_jsonl(tmp_path / "d.jsonl", rows)
    mix = build_split([{"name": "sharegpt", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *qwen,
                      512, str(tmp_path))
    assert len(mix) == len(CASES) and len(mix.lengths()) == len(CASES)
    assert [c.index for c in mix.parts[0].conversations] == list(range(0, 2 * len(CASES), 2))
    skipped = sorted(mix.skipped, key=lambda r: r["index"])
    assert [r["index"] for r in skipped] == sorted(reasons)
    for r in skipped:
        assert r["file"] == str(tmp_path / "d.jsonl") and r["entry"] == "d"
        assert re.search(reasons[r["index"]].split("': ")[-1], r["reason"]), r
    for i in range(len(mix)):  # the loader never meets a bad sample
        assert len(mix[i]) == mix.lengths()[i]


def test_global_default_and_entry_override(tmp_path, qwen):
    red_image(tmp_path / "red.png")
    write_jsonl(tmp_path / "d.jsonl", [good(), good("ghost.png")])
    entries = [{"name": "sharegpt", "data_files": "d.jsonl"}]
    mix = build_split(entries, "train", *qwen, 512, str(tmp_path), defaults={"on_bad_sample": "skip"})
    assert len(mix) == 1 and len(mix.skipped) == 1
    with pytest.raises(DataError, match="ghost.png"):
        build_split([dict(entries[0], on_bad_sample="error")], "train", *qwen, 512, str(tmp_path),
                    defaults={"on_bad_sample": "skip"})


def test_malformed_json_file_is_an_error_even_with_skip(tmp_path, qwen):
    (tmp_path / "d.json").write_text('[{"messages": []},\n {"oops"\n]')
    with pytest.raises(DataError, match=r"d.json, line 3: malformed JSON"):
        build_split([{"name": "sharegpt", "data_files": "d.json", "on_bad_sample": "skip"}], "train", *qwen, 512,
                    str(tmp_path))


def three_image_sample():
    return {"messages": [{"role": "user", "content": "<image><image><image>Same colours?"},
                         {"role": "assistant", "content": "yes"}], "images": ["red.png"] * 3}


def test_over_long_dropped_or_downscaled_never_cut(tmp_path, qwen):
    red_image(tmp_path / "red.png")  # 112x112: 16 image tokens each with the tiny processor
    write_jsonl(tmp_path / "d.jsonl", [good(), three_image_sample(), good()])
    entries = [{"name": "sharegpt", "data_files": "d.jsonl"}]
    full = build_split(entries, "train", *qwen, 512, str(tmp_path)).lengths()
    assert full[1] > 48 + 5
    limit = full[1] - 10
    dropped = build_split(entries, "train", *qwen, limit, str(tmp_path))
    assert dropped.lengths() == [full[0], full[2]]
    assert [(r["index"], r["kind"]) for r in dropped.skipped] == [(1, "too long for max_length")]
    assert f"{full[1]} tokens" in dropped.skipped[0]["reason"]
    shrunk = build_split([dict(entries[0], truncation="downscale")], "train", *qwen, limit, str(tmp_path))
    assert len(shrunk) == 3 and shrunk.skipped == []
    assert shrunk.lengths()[1] <= limit < full[1]
    enc = shrunk[1]
    image_id = qwen[0].tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert len(enc) == shrunk.lengths()[1]
    assert int((enc.input_ids == image_id).sum()) == enc.media["image_grid_thw"].prod(-1).sum() // 4  # whole images
    # a text-only sample cannot shrink: dropped even with downscale
    write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "word " * 100},
                                                     {"role": "assistant", "content": "ok"}]}, good()])
    text = build_split([{"name": "sharegpt", "data_files": "t.jsonl", "truncation": "downscale"}], "train", *qwen,
                       60, str(tmp_path))
    assert len(text) == 1 and text.skipped[0]["index"] == 0


def test_min_max_pixels_set_the_image_token_count(tmp_path, qwen):
    Image.new("RGB", (112, 112), "red").save(tmp_path / "red.png")
    write_jsonl(tmp_path / "d.jsonl", [good()])
    counts = {}
    for key, entry in {"default": {}, "small": {"max_pixels": 56 * 56}, "large": {"min_pixels": 224 * 224,
                                                                                  "max_pixels": 224 * 224}}.items():
        mix = build_split([{"name": "sharegpt", "data_files": "d.jsonl", **entry}], "train", *qwen, 512,
                          str(tmp_path))
        counts[key] = int(mix[0].media["image_grid_thw"].prod(-1).sum()) // 4
        assert len(mix[0]) == mix.lengths()[0]
    assert counts == {"default": 16, "small": 4, "large": 64}


def test_train_with_skip_writes_report_and_logs_summary(tiny_model_dir, tmp_path, caplog):
    red_image(tmp_path / "red.png")
    train_file = write_jsonl(tmp_path / "d.jsonl", [good(), good("ghost.png"), '{"broken', good(), good(),
                                                    three_image_sample()])
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), train_file, max_steps=-1, num_train_epochs=2,
                       on_bad_sample="skip", max_length=60, group_by_modality_length=True, dataset={"train": [
                           {"name": "sharegpt", "data_files": "d.jsonl", "ratio": 0.5}]})
    from mixtune.train.run import build_trainer
    with caplog.at_level("WARNING", logger="mixtune"):
        assert main(["train", cfg]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "out" / "skipped_samples.jsonl")]
    assert [(r["index"], r["kind"]) for r in rows] == [(2, "malformed JSON line"), (1, "image not found"),
                                                       (5, "too long for max_length")]
    log = caplog.text
    assert "3 sample(s) skipped or dropped" in log and "1 x image not found" in log
    assert str(tmp_path / "out" / "skipped_samples.jsonl") in log
    # the mixture is redrawn each epoch
    trainer = build_trainer(load_config(cfg, {"output_dir": str(tmp_path / "o2")}))
    trainer.train()
    assert trainer.train_dataset.epoch == 1 and len(trainer.train_dataset) == 2


def test_nothing_left_after_skipping_is_a_clear_error(tmp_path, qwen):
    write_jsonl(tmp_path / "d.jsonl", [good("ghost.png"), good("ghost.png")])
    with pytest.raises(DataError, match=r"dataset.train has no samples left: 2 were skipped or dropped "
                                        r"\(image not found\)"):
        build_split([{"name": "sharegpt", "data_files": "d.jsonl", "on_bad_sample": "skip"}], "train", *qwen, 512,
                    str(tmp_path))
