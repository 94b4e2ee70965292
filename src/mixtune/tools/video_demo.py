"""`mixtune demo --video`: a task that needs time. Each video shows a square moving left, right, up or down;
the question asks which way. The square starts anywhere in the same central region whatever its direction, so
one frame says nothing about the answer: a model trained and asked on the first frame alone (the baseline,
trained the same way) stays near chance, while the model given the frames learns the direction.

Videos are frame folders drawn with Pillow (no video codec needed); training and scoring run through
`mixtune train` and `mixtune predict`'s own code paths.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time

import torch
from PIL import Image, ImageDraw

from mixtune.config import build_config
from mixtune.models.registry import get_family
from mixtune.tools.demo import DEMO_TRAINING, answer_accuracy
from mixtune.train.run import train

log = logging.getLogger("mixtune")

DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
QUESTION = "<video>Which way does the square move: left, right, up or down?"
SIDE, BOX, TRAVEL, FRAMES = 112, 28, 28, 8
COLOURS = [(220, 30, 30), (30, 170, 50), (40, 60, 220), (235, 160, 30)]
# every video keeps all its frames, and a one-frame video repeats its frame to the same count
VIDEO_KEYS = {"min_frames": FRAMES, "max_frames": FRAMES, "fps": 4}

VIDEO_TRAINING = {**DEMO_TRAINING, "learning_rate": 1e-3, "num_train_epochs": 8, "max_length": 256,
                  "logging_steps": 10}


def draw_video(rng: random.Random, direction: str, folder: str) -> list[str]:
    """FRAMES frames of one square moving TRAVEL pixels in `direction` from a start drawn independently of it."""
    os.makedirs(folder, exist_ok=True)
    x0, y0 = rng.randint(TRAVEL, SIDE - BOX - TRAVEL), rng.randint(TRAVEL, SIDE - BOX - TRAVEL)
    dx, dy = DIRECTIONS[direction]
    colour = rng.choice(COLOURS)
    paths = []
    for t in range(FRAMES):
        step = TRAVEL * t / (FRAMES - 1)
        x, y = round(x0 + dx * step), round(y0 + dy * step)
        img = Image.new("RGB", (SIDE, SIDE), (245, 245, 245))
        ImageDraw.Draw(img).rectangle((x, y, x + BOX - 1, y + BOX - 1), fill=colour)
        paths.append(os.path.join(folder, f"{t:02d}.png"))
        img.save(paths[-1])
    return paths


def make_video_demo_data(output_dir: str, n_train: int = 400, n_val: int = 80, seed: int = 0) -> dict:
    """train.json / val.json with whole videos (frame folders), and first_frame_train.json /
    first_frame_val.json where each video is its first frame alone."""
    rng = random.Random(seed)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        full, first = [], []
        for i in range(n):
            direction = list(DIRECTIONS)[i % len(DIRECTIONS)]
            name = f"videos/{split}_{i:04d}"
            frames = draw_video(rng, direction, os.path.join(output_dir, name))
            full.append({"video": name, "conversations": [[QUESTION, direction]]})
            first.append({"videos": [[os.path.relpath(frames[0], output_dir)]],
                          "conversations": [[QUESTION, direction]]})
        order = list(range(n))
        rng.shuffle(order)
        for prefix, records in (("", full), ("first_frame_", first)):
            with open(os.path.join(output_dir, f"{prefix}{split}.json"), "w") as f:
                json.dump([records[k] for k in order], f, indent=1)
        counts[split] = n
    return counts


def train_and_score(model_dir: str, data_dir: str, prefix: str, output_dir: str, overrides: dict) -> dict:
    train_file, val_file = (os.path.join(data_dir, f"{prefix}{s}.json") for s in ("train", "val"))
    raw = {"model_name_or_path": model_dir,
           "dataset": {"train": [{"name": "chatml_dataset", "data_files": train_file, **VIDEO_KEYS}]},
           "output_dir": output_dir, "overwrite_output_dir": True, **VIDEO_TRAINING, "eval_strategy": "no",
           **overrides}
    metrics = train(build_config(raw))
    accuracy, rows = answer_accuracy(output_dir, val_file, output_dir=os.path.join(output_dir, "predictions"),
                                     video=VIDEO_KEYS)
    with open(os.path.join(output_dir, "metrics.json")) as f:
        losses = [loss for _, loss in json.load(f)["train_loss"]]
    return {"accuracy": accuracy, "rows": rows, "loss_first": losses[0], "loss_last": losses[-1],
            "runtime": metrics.get("train_runtime", 0)}


def run_video_demo(family_name: str = "qwen2_vl", output_dir: str = "runs/demo_video",
                   overrides: dict | None = None, baseline: bool = True) -> dict:
    start = time.time()
    torch.set_num_threads(1)  # see tools/demo.py: one thread is faster and steady for tiny models
    family = get_family(family_name)
    if family.video_placeholder is None:
        from mixtune.errors import ConfigError

        raise ConfigError(f"family {family.name} takes no video; video families: qwen2_vl, qwen2_5_vl, qwen3_vl, "
                          "llava_next_video, llava_onevision", key="--family")
    model_dir, data_dir = os.path.join(output_dir, "tiny_model"), os.path.join(output_dir, "data")
    family.build_tiny(model_dir)
    log.info("drawing moving-square videos in %s: %s", data_dir, make_video_demo_data(data_dir))
    val_file = os.path.join(data_dir, "val.json")
    before, _ = answer_accuracy(model_dir, val_file, output_dir=os.path.join(output_dir, "predictions_before"),
                                video=VIDEO_KEYS)
    full = train_and_score(model_dir, data_dir, "", os.path.join(output_dir, "trained"), overrides or {})
    report = {"family": family.name, "task": "direction of a moving square (4 ways)", "chance_accuracy": 0.25,
              "accuracy_before": before, "accuracy_after": full["accuracy"],
              "train_loss_first": full["loss_first"], "train_loss_last": full["loss_last"],
              "train_runtime_s": round(full["runtime"], 1), "eval_samples": len(full["rows"])}
    if baseline:
        first = train_and_score(model_dir, data_dir, "first_frame_", os.path.join(output_dir, "first_frame"),
                                overrides or {})
        report["first_frame_accuracy_after"] = first["accuracy"]
        report["first_frame_train_loss_last"] = first["loss_last"]
    model = os.path.join(output_dir, "trained")
    report.update(total_runtime_s=round(time.time() - start, 1), model_dir=model, examples=full["rows"][:8],
                  next_commands=[(f"mixtune predict --model {model} --data_files {val_file} "
                                  f"--output_dir {model}/predictions")])
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
