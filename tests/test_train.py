"""`mixtune train` end to end on tiny checkpoints: loss falls, save/reload, resume, bad data."""

import json
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import red_image, write_config, write_json
from mixtune.cli import main
from mixtune.config import load_config
from mixtune.train.run import train


def repeated_data(tmp_path, n=8):
    img = red_image(tmp_path / "red.png")
    records = [{"image": img, "conversations": [["<image>What colour is the shape?", "red"]]}] * n
    return write_json(tmp_path / "train.json", records)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_loss_falls_and_reload_gives_identical_logits(tiny_model_dir, tmp_path, family):
    cfg = load_config(write_config(tmp_path, tiny_model_dir(family), repeated_data(tmp_path), max_steps=8,
                                   learning_rate=5e-3, lr_scheduler_type="constant"))
    train(cfg)
    out = cfg.training.output_dir
    history = json.load(open(os.path.join(out, "metrics.json")))["train_loss"]
    losses = [loss for _, loss in history]
    assert losses[-1] < 0.5 * losses[0]
    assert os.path.exists(os.path.join(out, "loss_curve.png"))
    assert os.path.exists(os.path.join(out, "chat_template.jinja"))

    # plain transformers loads the output folder; logits equal the trained model's
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    from PIL import Image
    inputs = processor(text=[text], images=[Image.open(tmp_path / "red.png")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    from mixtune.train.run import build_trainer  # the in-memory model from a fresh trainer is the base model
    cfg2 = load_config(write_config(tmp_path, out, repeated_data(tmp_path), output_dir=str(tmp_path / "o2")))
    again = build_trainer(cfg2).model.eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)


def test_resume_continues_step_count_and_schedule(tiny_model_dir, tmp_path):
    import shutil

    data = repeated_data(tmp_path, n=16)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear",
                  learning_rate=1e-3)
    model = tiny_model_dir("qwen2_vl")
    train(load_config(write_config(tmp_path, model, data, output_dir=str(tmp_path / "full"), **common)))
    full_history = json.load(open(tmp_path / "full" / "metrics.json"))["log_history"]
    # an interrupted run: only its step-3 checkpoint survived
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part_dir / "checkpoint-3")
    train(load_config(write_config(tmp_path, model, data, output_dir=str(part_dir),
                                   resume_from_checkpoint=True, **common)))
    history = json.load(open(part_dir / "metrics.json"))["log_history"]
    steps = [h["step"] for h in history if "loss" in h]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's state; no restart at 1
    for key in ("learning_rate", "loss"):
        full = {h["step"]: h[key] for h in full_history if key in h}
        resumed = {h["step"]: h[key] for h in history if key in h}
        for step in (4, 5, 6):
            # same weights, optimizer, schedule and data order as the uninterrupted run
            assert resumed[step] == pytest.approx(full[step], rel=1e-4), (key, step)


def test_refuses_non_empty_output_dir(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), repeated_data(tmp_path))
    assert main(["train", cfg]) == 2
    assert "overwrite_output_dir" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case,expected", [
    ("missing_file", r"data file not found: .*nope.json"),
    ("malformed", r"train.json, line 3.*malformed JSON"),
    ("missing_image", r"train.json, sample 1, field 'image': image not found: .*ghost.png"),
    ("placeholder_mismatch", r"train.json, sample 0, field 'image': 2 '<image>' placeholder"),
    ("unknown_role", r"train.json, sample 0, field 'role': unknown role 'bot'"),
])
def test_bad_data_errors_name_file_and_sample(tiny_model_dir, tmp_path, capsys, case, expected):
    img = red_image(tmp_path / "red.png")
    good = {"image": img, "conversations": [["<image>Q?", "A"]]}
    train_file = str(tmp_path / "train.json")
    if case == "missing_file":
        train_file = str(tmp_path / "nope.json")
    elif case == "malformed":
        (tmp_path / "train.json").write_text(json.dumps(good) + "\n" + json.dumps(good) + '\n{"broken": \n')
        train_file = str(tmp_path / "train.jsonl")
        os.rename(tmp_path / "train.json", train_file)
        expected = r"train.jsonl, line 3.*malformed JSON"
    elif case == "missing_image":
        write_json(train_file, [good, {"image": "ghost.png", "conversations": [["<image>Q?", "A"]]}])
    elif case == "placeholder_mismatch":
        write_json(train_file, [{"image": img, "conversations": [["<image><image>Q?", "A"]]}])
    elif case == "unknown_role":
        write_json(train_file, [{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}])
    cfg = write_config(tmp_path, tiny_model_dir("qwen2_vl"), train_file, max_steps=2,
                       per_device_train_batch_size=1)
    assert main(["train", cfg]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(expected, err), err
