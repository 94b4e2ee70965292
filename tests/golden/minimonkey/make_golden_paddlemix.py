"""Golden fixture for mixtune's MiniMonkey multi-scale adaptive cropping (MSAC), from PaddleMIX's own code.

PaddleMIX's `dynamic_preprocess` / `dynamic_preprocess2` (paddlemix/datasets/internvl_dataset.py) cut each test
image into tiles; the tiles are laid out as PaddleMIX's MiniMonkey does it in training
(paddlemix/examples/minimonkey/minimonkey_chat_finetune.py, `multi_modal_get_item`) and in chat
(paddlemix/examples/minimonkey/chat_demo_minimonkey.py, `main`); PaddleMIX's `build_transform` (is_train=False,
as the shipped data json's `data_augment: false`) turns one layout into the model's pixel tensor. Saved: the
source images, every tile (uint8, exact), the grids chosen, and that one normalised tensor.

Run from a folder holding PaddleMIX's source (paddlemix/datasets/internvl_dataset.py, paddlemix/models/internvl2/):
  /path/to/paddle_venv/bin/python make_golden_paddlemix.py OUT_DIR
"""
import os
import sys
import types

import numpy as np

ROOT = os.getcwd()
for name, path in (("paddlemix", "paddlemix"), ("paddlemix.models", "paddlemix/models"),
                   ("paddlemix.models.internvl2", "paddlemix/models/internvl2"),
                   ("paddlemix.datasets", "paddlemix/datasets")):
    # empty packages: PaddleMIX's own __init__ files import every model
    mod = types.ModuleType(name)
    mod.__path__ = [os.path.join(ROOT, path)]
    sys.modules[name] = mod
from PIL import Image  # noqa: E402

from paddlemix.datasets.internvl_dataset import build_transform, dynamic_preprocess, dynamic_preprocess2  # noqa: E402

OUT = sys.argv[1]
TILE = 14  # PaddleMIX uses 448; the cropping arithmetic is the same at any tile size, and the fixture stays small
# (width, height): wide, tall, aspect 1.25 (as near 1:1 as 3:2: a tie between grids), square, tiny, large, 5:4
SIZES = [(45, 15), (20, 50), (25, 20), (32, 32), (60, 25), (15, 85), (5, 5), (100, 45), (35, 28)]
rng = np.random.default_rng(0)


def source(w, h):
    """Smooth gradients plus noise: every tile differs, and resampling differences would show."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // max(w + h - 2, 1)], -1)
    return np.clip(base + rng.integers(-6, 7, size=(h, w, 3)), 0, 255).astype(np.uint8)


def train_layout(image):
    # minimonkey_chat_finetune.py, multi_modal_get_item (shell: max_dynamic_patch 12, min_dynamic_patch 1,
    # use_thumbnail True)
    images, target_aspect_ratio = dynamic_preprocess(image, min_num=1, max_num=12, image_size=TILE,
                                                     use_thumbnail=True, return_target_aspect_ratio=True)
    images = images[:-1] + dynamic_preprocess2(image, min_num=1, max_num=4, image_size=TILE, use_thumbnail=False,
                                               prior_aspect_ratio=target_aspect_ratio) + images[-1:]
    return images, target_aspect_ratio


def chat_layout(image):
    # chat_demo_minimonkey.py, main: load_image(min_num=4, max_num=12), load_image2(min_num=3, max_num=7)
    images, target_aspect_ratio = dynamic_preprocess(image, image_size=TILE, use_thumbnail=True, min_num=4,
                                                     max_num=12, return_target_aspect_ratio=True)
    images2 = dynamic_preprocess2(image, image_size=TILE, use_thumbnail=True, min_num=3, max_num=7,
                                  prior_aspect_ratio=target_aspect_ratio)
    return images2[:-1] + images[:-1] + images2[-1:], target_aspect_ratio


arrays = {"tile": np.int64(TILE)}
for k, (w, h) in enumerate(SIZES):
    src = source(w, h)
    arrays[f"src{k}"] = src
    image = Image.fromarray(src, "RGB")
    for name, layout in (("train", train_layout), ("chat", chat_layout)):
        tiles, grid = layout(image)
        arrays[f"{name}{k}_tiles"] = np.stack([np.asarray(t.convert("RGB")) for t in tiles])
        arrays[f"{name}{k}_grid"] = np.array(grid, dtype=np.int64)
        print(k, (w, h), name, "detail grid", grid, "tiles", len(tiles))

transform = build_transform(is_train=False, input_size=TILE)
tiles, _ = train_layout(Image.fromarray(arrays["src1"], "RGB"))
arrays["train1_pixel_values"] = np.stack([transform(t).numpy() for t in tiles]).astype(np.float32)
np.savez_compressed(os.path.join(OUT, "golden.npz"), **arrays)
print("saved", os.path.getsize(os.path.join(OUT, "golden.npz")))
