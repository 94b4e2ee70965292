"""`mixtune init`: each registered family's starter config names only keys the schema accepts, and trains 2 steps
on the family's tiny checkpoint once its two FILL_IN values (checkpoint, data) are filled in.

Training every family takes minutes on a CPU, so the fast suite trains one family per task plus the LoRA and
MixToken variants; the whole registry trains under `-m slow`."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from mixtune.cli import main
from mixtune.config import build_config, valid_keys
from mixtune.errors import MixtuneError
from mixtune.models.registry import families, get_family
from mixtune.paddle_compat import SCHEDULE_KEYS
from mixtune.tools.starter import FILL_IN, STARTERS, starter_config
from video_fixtures import write_tone

ALL = [f.name for f in families(task=None)]
FAST = [("qwen2_vl", False, False), ("qwen2_vl", True, True), ("llava", True, False), ("qwen2_audio", False, False),
        ("clip", False, False), ("clip", True, False), ("timm", False, False), ("audioldm2", True, False),
        ("sam", False, False)]


def write_data(root, family) -> str:
    """Data in the shape the starter's comment describes, for the family's task and media."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    if family.task == "classification":  # a folder of class folders
        for name, rgb in colours.items():
            os.makedirs(os.path.join(root, "classes", name), exist_ok=True)
            for i in range(2):
                Image.new("RGB", (64, 64), rgb).save(os.path.join(root, "classes", name, f"{i}.png"))
        return os.path.join(root, "classes")
    if family.task in ("segmentation", "detection"):  # a COCO instances JSON with boxes and masks (synthetic shapes)
        from mixtune.tools.seg_demo import make_shapes_coco

        return make_shapes_coco(root, "shapes", 2)
    for name, rgb in colours.items():
        Image.new("RGB", (112, 112), rgb).save(os.path.join(root, f"{name}.png"))
    if family.task == "text_to_audio":
        rows = [{"audio": write_tone(os.path.join(root, f"{n}.wav"), hz), "caption": f"a {n} tone"}
                for n, hz in (("low", 440), ("high", 880))]
        path = os.path.join(root, "clips.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows))
        return path
    if family.task == "contrastive":
        rows = [{"image": f"{name}.png", "caption": f"a {name} square"} for name in colours]
        path = os.path.join(root, "pairs.jsonl")
        with open(path, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows))
        return path
    if family.reads_images:
        rows = [{"image": f"{name}.png", "conversations": [["<image>What colour is it?", name]]} for name in colours]
    else:  # audio only
        rows = [{"messages": [{"role": "user", "content": "<audio>Which tone?"}, {"role": "assistant", "content": n}],
                 "audios": [write_tone(os.path.join(root, f"{n}.wav"), hz)]} for n, hz in (("low", 440), ("high", 880))]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def filled(text: str, model: str, data: str) -> dict:
    raw = yaml.safe_load(text)
    assert raw["model_name_or_path"] == FILL_IN and raw["dataset"]["train"][0]["data_files"] == FILL_IN
    raw["model_name_or_path"] = model
    raw["dataset"]["train"][0]["data_files"] = data
    return raw


def commented_keys(text: str) -> list[str]:
    """Top-level keys offered in comments (`# key: value`): a user uncomments them, so they must be valid too."""
    return [m.group(1) for m in re.finditer(r"^# ([a-z_0-9]+): ", text, re.M)]


@pytest.mark.parametrize("name", ALL)
def test_every_family_has_a_starter_of_valid_keys(name, tmp_path, monkeypatch):
    family = get_family(name)
    assert family.task in STARTERS, f"no starter config for the {family.task} task: add one to tools/starter.py"
    monkeypatch.chdir(tmp_path)
    variants = [(False, False)] + [(True, False)] * family.supports_lora + \
        [(False, True)] * (family.pack_positions is not None)
    for lora, mixtoken in variants:
        text = starter_config(name, lora=lora, mixtoken=mixtoken)
        raw = filled(text, str(tmp_path / "no-model-needed"), write_data(str(tmp_path / "data"), family))
        accepted = valid_keys() | set(SCHEDULE_KEYS)
        assert set(raw) <= accepted and set(commented_keys(text)) <= accepted, text
        shortcuts = [f"freeze_{part}" for part in family.named_parts() if f"freeze_{part}" in accepted]
        if family.task == "text_to_audio":  # its frozen parts are the task's default: the starter shows globs only
            assert not any(k in raw for k in shortcuts) and "freeze_include" in text
        else:
            assert shortcuts and all(k in raw for k in shortcuts) != lora
        if not mixtoken:  # with mixtoken the config is checked against the checkpoint (tested by training below)
            config = build_config(raw, str(tmp_path))
            assert config.mix.lora == lora and config.training.bf16


def train_starter(name, lora, mixtoken, tiny_model_dir, tmp_path, monkeypatch) -> dict:
    family = get_family(name)
    for module in family.requires:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    args = ["init", "--family", name, "--output", "cfg.yaml"] + ["--lora"] * lora + ["--mixtoken"] * mixtoken
    assert main(args) == 0
    raw = filled(open("cfg.yaml").read(), tiny_model_dir(name), write_data(str(tmp_path / "data"), family))
    with open("cfg.yaml", "w") as f:
        yaml.safe_dump(raw, f)
    assert main(["train", "cfg.yaml", "--max_steps", "2", "--disable_tqdm", "true"]) == 0
    out = os.path.join(tmp_path, raw["output_dir"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["final"]["train_runtime"] > 0 and 0 < metrics["final"]["train_loss"] < 1e4
    assert metrics["log_history"][-1]["step"] == 2
    return metrics


@pytest.mark.parametrize("name,lora,mixtoken", FAST)
def test_starter_trains_two_steps(name, lora, mixtoken, tiny_model_dir, tmp_path, monkeypatch):
    train_starter(name, lora, mixtoken, tiny_model_dir, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL if n not in {f for f, _, _ in FAST}])
def test_every_family_starter_trains_two_steps(name, tiny_model_dir, tmp_path, monkeypatch):
    train_starter(name, False, False, tiny_model_dir, tmp_path, monkeypatch)


def test_init_refuses_what_the_family_cannot_do(tmp_path, capsys):
    with pytest.raises(MixtuneError, match="cannot pack samples exactly.*Families that pack: qwen2_vl"):
        starter_config("gemma3", mixtoken=True)
    with pytest.raises(MixtuneError, match="unsupported model family 'nope'"):
        starter_config("nope")
    existing = tmp_path / "cfg.yaml"
    existing.write_text("keep me")
    assert main(["init", "--family", "clip", "--output", str(existing)]) == 2
    assert "exists already" in capsys.readouterr().err and existing.read_text() == "keep me"
    assert main(["init", "--family", "clip", "--output", str(tmp_path / "cfg.json")]) == 2
    assert "is YAML" in capsys.readouterr().err
    assert main(["init", "--family", "clip"]) == 0  # no --output: printed
    assert "name: coco_caption" in capsys.readouterr().out
