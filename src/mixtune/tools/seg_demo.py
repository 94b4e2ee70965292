"""`mixtune demo --task segmentation`: a tiny SAM trained on synthetic shapes (circles, squares, triangles
drawn with Pillow, their masks written as COCO RLE) with box prompts, through `mixtune train`'s own path;
held-out mIoU before and after, and a drawn prediction picture."""

from __future__ import annotations

import json
import os
import random
import shutil
import time

import numpy as np
from PIL import Image, ImageDraw

from mixtune.data.masks import encode, mask_box

SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64
COLOURS = [(220, 30, 30), (30, 170, 50), (40, 60, 220), (235, 210, 30), (160, 60, 200)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_image(rng: random.Random, size: int = IMAGE_SIZE):
    """One picture of 1-3 shapes (later ones may cover earlier ones) and each shape's visible mask."""
    background = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(img)
    objects = []  # (shape, mask)
    for _ in range(rng.randint(2, 4)):
        shape, side = rng.choice(SHAPES), rng.randint(size // 5, size // 2)
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        box = (x0, y0, x0 + side, y0 + side)
        draw_shape(draw, shape, box, rng.choice(COLOURS))
        layer = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(layer), shape, box, 255)
        mask = np.asarray(layer) > 0
        objects = [(s, m & ~mask) for s, m in objects]  # what the new shape covers is no longer theirs
        objects.append((shape, mask))
    return img, [(s, m) for s, m in objects if m.sum() >= 16]  # drop shapes covered almost entirely


def make_shapes_coco(root: str, name: str, n_images: int, seed: int = 0, size: int = IMAGE_SIZE) -> str:
    """`n_images` pictures under root/name/ and root/name.json (COCO instances, RLE masks)."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, name), exist_ok=True)
    images, annotations = [], []
    categories = [{"id": i + 1, "name": s} for i, s in enumerate(SHAPES)]
    for i in range(n_images):
        img, objects = draw_image(rng, size)
        file_name = f"{name}/{i:04d}.png"
        img.save(os.path.join(root, file_name))
        images.append({"id": i, "file_name": file_name, "width": size, "height": size})
        for shape, mask in objects:
            x0, y0, x1, y1 = mask_box(mask)
            annotations.append({"id": len(annotations), "image_id": i, "category_id": SHAPES.index(shape) + 1,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": encode(mask)})
    path = os.path.join(root, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


# The tiny SAM's image encoder is random, so the demo trains it too (a real SAM keeps its encoder frozen).
# Batches of 8 (twice the updates of 16 for the same time): held-out mIoU 0.57 against 0.41 after 8 epochs,
# 0.749 against 0.725 after 30 (measured with 8-pixel patches; batches of 4 stayed near 0.3 for 15 epochs).
# With the tiny SAM's 4-pixel patches: 0.818 after 30 epochs, 0.8 from epoch 21 (measured).
DEMO = dict(n_train=300, n_val=30, training={"per_device_train_batch_size": 8, "learning_rate": 3e-3,
                                              "num_train_epochs": 30, "warmup_ratio": 0.05,
                                              "lr_scheduler_type": "cosine", "weight_decay": 0.0,
                                              "freeze_exclude": ["vision_encoder.*"]})


def run_segmentation_demo(output_dir: str, overrides: dict | None = None) -> dict:
    from mixtune.config import build_config
    from mixtune.models.sam import build_tiny
    from mixtune.train.run import build_trainer, train

    shutil.rmtree(output_dir, ignore_errors=True)
    data = os.path.join(output_dir, "data")
    make_shapes_coco(data, "train", DEMO["n_train"], seed=0)
    make_shapes_coco(data, "val", DEMO["n_val"], seed=1)
    model_dir = build_tiny(os.path.join(output_dir, "tiny_model"))
    entry = {"name": "coco_segmentation", "prompt": "box"}
    raw = {"model_name_or_path": model_dir, "output_dir": os.path.join(output_dir, "trained"),
           "dataset": {"train": [dict(entry, data_files="train.json")], "eval": [dict(entry, data_files="val.json")]},
           "logging_steps": 10, "save_strategy": "no", "eval_strategy": "epoch", "per_device_eval_batch_size": 64,
           "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True, **DEMO["training"], **(overrides or {})}
    before = build_trainer(build_config(dict(raw), data)).evaluate()
    start = time.time()
    after = train(build_config(dict(raw), data))
    seconds = round(time.time() - start, 1)
    with open(os.path.join(raw["output_dir"], "metrics.json")) as f:
        history = json.load(f).get("log_history", [])
    curve = [(h.get("epoch"), round(h["eval_miou"], 4)) for h in history if "eval_miou" in h]
    from mixtune.infer.segment import predict_segmentation

    drawn = predict_segmentation(raw["output_dir"], {"name": "coco_segmentation", "data_files": "val.json",
                                                     "prompt": "box"}, os.path.join(output_dir, "predictions"),
                                 base_dir=data, draw=True, max_drawn=4)
    return {"task": "segmentation", "family": "sam", "metric": "eval_miou", "before": before["eval_miou"],
            "after": after["eval_miou"], "train_seconds": seconds, "miou_per_epoch": curve,
            "model": raw["output_dir"], "pictures": drawn["pictures"]}
