"""`mixtune make-demo-data`: a synthetic VQA + caption set drawn with Pillow.

Each image holds one shape (circle, square or triangle) of one colour, on the left or the right,
sometimes repeated (one to three copies). Questions ask its colour, shape, side or count; captions
describe it. Validation images are new draws and the validation set is questions only, so the demo
measures answers to unseen images.
"""

from __future__ import annotations

import json
import os
import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (235, 210, 30)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
COUNTS = {1: "one", 2: "two", 3: "three"}
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is in the image?",
    "side": "Is the shape on the left or the right?",
    "count": "How many shapes are there?",
}
IMAGE_SIZE = 112


def draw_scene(rng: random.Random, colour: str, shape: str, side: str, count: int) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (245, 245, 245))
    d = ImageDraw.Draw(img)
    size = 28
    x0 = 6 if side == "left" else IMAGE_SIZE // 2 + 6
    rows = rng.sample(range(3), count)
    for row in rows:
        x = x0 + rng.randint(0, 16)
        y = 4 + row * 36 + rng.randint(0, 4)
        box = (x, y, x + size, y + size)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(x + size // 2, y), (x, y + size), (x + size, y + size)], fill=fill)
    return img


def make_demo_data(output_dir: str, n_train_images: int = 600, n_val_images: int = 120, seed: int = 0) -> dict:
    rng = random.Random(seed)
    os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
    splits = {"train": [], "val": []}
    for split, n in (("train", n_train_images), ("val", n_val_images)):
        for i in range(n):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            side, count = rng.choice(SIDES), rng.choice(list(COUNTS))
            name = f"images/{split}_{i:04d}.png"
            draw_scene(rng, colour, shape, side, count).save(os.path.join(output_dir, name))
            answers = {"colour": colour, "shape": shape, "side": side, "count": COUNTS[count]}
            kinds = list(QUESTIONS)
            if split == "train":
                for kind in kinds:
                    splits[split].append({"image": name, "conversations": [[f"<image>{QUESTIONS[kind]}",
                                                                          answers[kind]]]})
                plural = "s" if count > 1 else ""
                caption = f"{COUNTS[count]} {colour} {shape}{plural} on the {side}"
                splits[split].append({"messages": [{"role": "user", "content": "<image>Describe the image."},
                                                   {"role": "assistant", "content": caption}],
                                      "images": [name]})
            else:
                kind = kinds[i % len(kinds)]
                splits[split].append({"image": name, "conversations": [[f"<image>{QUESTIONS[kind]}",
                                                                      answers[kind]]]})
    for split, records in splits.items():
        rng.shuffle(records)
        with open(os.path.join(output_dir, f"{split}.json"), "w") as f:
            json.dump(records, f, indent=1)
    return {split: len(records) for split, records in splits.items()}
