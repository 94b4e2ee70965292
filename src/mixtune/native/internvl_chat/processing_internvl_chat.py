"""InternVL2's processor: text with `<image>` marks plus images -> input ids, pixel values (tiles) and labels' offsets.

Dynamic tiling as published (`dynamic_preprocess`): among the tile grids (i, j) with min_dynamic_patch <= i*j <=
max_dynamic_patch, the one closest to the image's aspect ratio (ties go to the larger grid when the image has more
than half its pixels); the image is resized to that grid and cut into image_size tiles, plus a whole-image
thumbnail when there is more than one tile and `use_thumbnail` is set. Each tile: bicubic resize to image_size,
[0, 1], ImageNet mean and std. `dynamic_image_size` false: one tile (the whole image).

In the text, the k-th `<image>` becomes `<img>` + num_image_token x (its tiles) `<IMG_CONTEXT>` + `</img>`.
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from mixtune.native.internvl_chat.configuration_internvl_chat import IMG_CONTEXT, IMG_END, IMG_START
from mixtune.native.padding import pad_rows

IMAGE_MARK = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    grids = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num}
    return sorted(grids, key=lambda g: g[0] * g[1])  # stable from a set: as published, ties keep set order


def closest_grid(aspect: float, grids, width: int, height: int, size: int) -> tuple[int, int]:
    best, best_diff = (1, 1), float("inf")
    for grid in grids:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and width * height > 0.5 * size * size * grid[0] * grid[1]:
            best = grid
    return best


def dynamic_tiles(image: Image.Image, min_num: int, max_num: int, size: int, use_thumbnail: bool) -> list:
    width, height = image.size
    cols, rows = closest_grid(width / height, tile_grids(min_num, max_num), width, height, size)
    resized = image.resize((size * cols, size * rows))  # PIL's default filter (bicubic), as published
    tiles = [resized.crop(((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size))
             for i in range(cols * rows)]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size)))
    return tiles


class InternVLChatImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 448, dynamic_image_size: bool = True, use_thumbnail: bool = True,
                 min_dynamic_patch: int = 1, max_dynamic_patch: int = 12, image_mean=IMAGENET_MEAN,
                 image_std=IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.dynamic_image_size, self.use_thumbnail = image_size, dynamic_image_size, use_thumbnail
        self.min_dynamic_patch, self.max_dynamic_patch = min_dynamic_patch, max_dynamic_patch
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        if not self.dynamic_image_size:
            return [image]
        return dynamic_tiles(image, self.min_dynamic_patch, self.max_dynamic_patch, self.image_size,
                             self.use_thumbnail)

    def to_tensor(self, tile: Image.Image) -> torch.Tensor:
        size = self.image_size
        tile = tile.resize((size, size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (x - mean) / std

    def preprocess(self, images, return_tensors="pt", **kwargs) -> BatchFeature:
        images = images if isinstance(images, (list, tuple)) else [images]
        pixels, counts = [], []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image))
            tiles = [self.to_tensor(t) for t in self.tiles(image)]
            pixels += tiles
            counts.append(len(tiles))
        return BatchFeature({"pixel_values": torch.stack(pixels), "num_patches": counts})


class InternVLChatProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, num_image_token: int = 256, chat_template=None,
                 **kwargs):
        self.num_image_token = num_image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        folder = str(pretrained_model_name_or_path)
        if not os.path.isdir(folder) or any(os.path.exists(os.path.join(folder, name)) for name in
                                            ("processor_config.json", "preprocessor_config.json")):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls.for_published_folder(folder)

    @classmethod
    def for_published_folder(cls, folder: str) -> InternVLChatProcessor:
        """A published InternVL2 folder has no processor files (its chat code hard-codes them): build the processor
        from config.json's tiling keys and the folder's tokenizer."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        images = InternVLChatImageProcessor(config.image_size, config.dynamic_image_size, config.use_thumbnail,
                                            config.min_dynamic_patch, config.max_dynamic_patch)
        return cls(images, AutoTokenizer.from_pretrained(folder), num_image_token=config.num_image_token)

    def _encode_text(self, text: str, tiles: list[int], want_offsets: bool, add_special_tokens: bool):
        """Token ids (and per-token character spans of `text`), each `<image>` expanded for its image's tiles. The
        tokenizer's own leading special tokens (InternLM2's `<s>`) come first, once, as when the published code
        tokenizes the whole expanded prompt."""
        tok = self.tokenizer
        ids = list(tok("", add_special_tokens=True)["input_ids"]) if add_special_tokens else []
        offsets, cursor = [(0, 0)] * len(ids), 0
        marks = [(m.start(), m.end()) for m in re.finditer(re.escape(IMAGE_MARK), text)]
        start_id, context_id, end_id = (tok.convert_tokens_to_ids(t) for t in (IMG_START, IMG_CONTEXT, IMG_END))
        for k, (start, end) in enumerate(marks + [(len(text), None)]):
            if start > cursor:
                enc = tok(text[cursor:start], add_special_tokens=False, return_offsets_mapping=want_offsets)
                ids += enc["input_ids"]
                if want_offsets:
                    offsets += [(a + cursor, b + cursor) for a, b in enc["offset_mapping"]]
            if end is None:
                break
            n = self.num_image_token * tiles[k]
            ids += [start_id] + [context_id] * n + [end_id]
            offsets += [(start, end)] * (n + 2)
            cursor = end
        return ids, offsets, len(marks)

    def __call__(self, text=None, images=None, return_offsets_mapping: bool = False,
                 return_text_replacement_offsets: bool = False, return_tensors="pt", padding=True,
                 add_special_tokens: bool = True, **kwargs) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        images = [] if images is None else (images if isinstance(images, (list, tuple)) else [images])
        marks = sum(t.count(IMAGE_MARK) for t in texts)
        if marks != len(images):
            raise ValueError(f"the text has {marks} {IMAGE_MARK} marks but {len(images)} images were given")
        data, tiles = {}, []
        if images:
            processed = self.image_processor(images)
            data["pixel_values"], tiles = processed["pixel_values"], processed["num_patches"]
        encoded, used = [], 0
        for t in texts:
            ids, offsets, n = self._encode_text(t, tiles[used:], return_offsets_mapping, add_special_tokens)
            encoded.append((ids, offsets))
            used += n
        data.update(self._pad([e[0] for e in encoded], [e[1] for e in encoded] if return_offsets_mapping else None))
        if return_text_replacement_offsets:  # offsets already refer to the text as given
            data["text_replacement_offsets"] = [[] for _ in texts]
        return BatchFeature(data, tensor_type=None)

    def _pad(self, ids: list[list[int]], offsets: list | None) -> dict:
        return pad_rows(ids, offsets, self.tokenizer.pad_token_id or 0, self.tokenizer.padding_side == "left")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]
