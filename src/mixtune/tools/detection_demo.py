"""`mixtune demo --task detection [--family yolo_world]`: a tiny Grounding DINO (or YOLO-World) trained on
synthetic shapes drawn with Pillow, prompted "red circle . blue square . green triangle . yellow circle .",
through `mixtune train`'s own path, with held-out COCO AP50 / mAP before and after, and one held-out prediction
drawn to a PNG."""

from __future__ import annotations

import json
import os
import random
import shutil
import time

from PIL import Image, ImageDraw

from mixtune.tools.demo_data import COLOURS

DEMO_SIZE = 96
CATEGORIES = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("yellow", "circle")]


def draw_shape(draw: ImageDraw.ImageDraw, colour: str, shape: str, x: int, y: int, size: int) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([x, y, x + size - 1, y + size - 1], fill=fill)
    elif shape == "square":
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=fill)
    else:
        draw.polygon([(x + size // 2, y), (x, y + size - 1), (x + size - 1, y + size - 1)], fill=fill)


def draw_image(rng: random.Random, n_objects: int, size: int = DEMO_SIZE) -> tuple[Image.Image, list[dict]]:
    """One picture with up to `n_objects` non-overlapping shapes; COCO annotations [x, y, w, h] (category ids
    from 1, in CATEGORIES' order)."""
    img = Image.new("RGB", (size, size), (245, 245, 245))
    draw = ImageDraw.Draw(img)
    placed: list[tuple[int, int, int]] = []
    anns = []
    for _ in range(n_objects):
        for _attempt in range(20):
            side = rng.randint(size // 5, size // 3)
            x, y = rng.randint(0, size - side), rng.randint(0, size - side)
            if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y for px, py, ps in placed):
                break
        else:
            continue
        placed.append((x, y, side))
        cat = rng.randrange(len(CATEGORIES))
        draw_shape(draw, *CATEGORIES[cat], x, y, side)
        anns.append({"bbox": [x, y, side, side], "category_id": cat + 1, "area": side * side, "iscrowd": 0})
    return img, anns


def make_detection_data(root: str, n_images: int, split: str, seed: int = 0, max_objects: int = 2) -> str:
    """A COCO instances file `<split>.json` with its images under `<split>/`."""
    rng = random.Random(f"{seed}-{split}")
    os.makedirs(os.path.join(root, split), exist_ok=True)
    images, annotations = [], []
    for i in range(n_images):
        img, anns = draw_image(rng, rng.randint(1, max_objects))
        name = f"{split}/{i:04d}.png"
        img.save(os.path.join(root, name))
        images.append({"id": i + 1, "file_name": name, "width": img.width, "height": img.height})
        annotations += [dict(a, id=len(annotations) + j + 1, image_id=i + 1) for j, a in enumerate(anns)]
    categories = [{"id": i + 1, "name": f"{c} {s}"} for i, (c, s) in enumerate(CATEGORIES)]
    path = os.path.join(root, f"{split}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


DEMO_TRAINING = {"per_device_train_batch_size": 8, "learning_rate": 1e-3, "num_train_epochs": 30,
                 "warmup_ratio": 0.05, "lr_scheduler_type": "cosine", "weight_decay": 1e-4, "max_grad_norm": 0.1}
# YOLO-World: AdamW at ultralytics' own rate for small runs (its "auto" optimiser), its gradient clip of 10
FAMILY_TRAINING = {"yolo_world": {"per_device_train_batch_size": 8, "learning_rate": 2e-3, "num_train_epochs": 20,
                                  "warmup_ratio": 0.05, "lr_scheduler_type": "cosine", "weight_decay": 5e-4,
                                  "max_grad_norm": 10.0}}


def run_detection_demo(output_dir: str, overrides: dict | None = None, n_train: int = 400, n_val: int = 40,
                       family: str = "grounding_dino") -> dict:
    from mixtune.config import build_config
    from mixtune.models.registry import get_family
    from mixtune.train.run import build_trainer, train

    build_tiny = get_family(family).build_tiny
    shutil.rmtree(output_dir, ignore_errors=True)
    data = os.path.join(output_dir, "data")
    make_detection_data(data, n_train, "train")
    make_detection_data(data, n_val, "val")
    model_dir = build_tiny(os.path.join(output_dir, "tiny_model"))
    raw = {"model_name_or_path": model_dir, "output_dir": os.path.join(output_dir, "trained"),
           "dataset": {"train": [{"name": "coco_detection", "data_files": "train.json"}],
                       "eval": [{"name": "coco_detection", "data_files": "val.json"}]},
           "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no", "per_device_eval_batch_size": 20,
           "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True,
           **FAMILY_TRAINING.get(family, DEMO_TRAINING), **(overrides or {})}
    before = build_trainer(build_config(dict(raw), data)).evaluate()
    start = time.time()
    after = train(build_config(dict(raw), data))
    seconds = round(time.time() - start, 1)
    drawn = draw_val_prediction(raw["output_dir"], os.path.join(data, "val.json"), os.path.join(output_dir, "predict"))
    report = {"task": "detection", "family": family, "metric": "eval_map_50",
              "before": before["eval_map_50"], "after": after["eval_map_50"],
              "map_before": before["eval_map"], "map_after": after["eval_map"], "train_seconds": seconds,
              "loss_curve": loss_curve(raw["output_dir"]), "drawn_prediction": drawn, "model": raw["output_dir"]}
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


def loss_curve(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.json")) as f:
        history = json.load(f).get("log_history", [])
    return [(h["step"], round(h["loss"], 3)) for h in history if "loss" in h]


def draw_val_prediction(model_dir: str, val_file: str, out_dir: str) -> str:
    """The first held-out image's detections drawn (through `mixtune predict`'s own code)."""
    from mixtune.infer.detection_predict import predict_detection

    summary = predict_detection(model_dir, {"name": "coco_detection", "data_files": val_file, "max_samples": 1},
                                out_dir, draw=True)
    return summary["drawn"][0]
