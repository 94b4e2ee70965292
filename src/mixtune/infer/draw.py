"""Predictions drawn on a picture with Pillow: boxes with their label and score, and masks blended in.

Used by `mixtune predict --draw` for detection and segmentation; a person checks a PNG faster than a JSON.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# distinct, readable colours; a label keeps its colour across pictures (by category id or position)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str] | None = None,
               scores: Sequence[float] | None = None, colours: Sequence[int] | None = None,
               width: int = 2) -> Image.Image:
    """A copy of `image` with each box (x0, y0, x1, y1 in pixels) outlined and captioned "label 0.87".
    `colours`: a palette index per box (e.g. its category id); default: by label, else by position."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    names = list(labels) if labels is not None else [""] * len(boxes)
    for i, box in enumerate(boxes):
        x0, y0, x1, y1 = (float(v) for v in box)
        c = colour(colours[i] if colours is not None else _colour_key(names, i))
        draw.rectangle([x0, y0, x1, y1], outline=c, width=width)
        caption = names[i] + (f" {float(scores[i]):.2f}" if scores is not None else "")
        caption = caption.strip()
        if caption:
            left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
            tw, th = right - left, bottom - top
            ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0
            draw.rectangle([x0, ty, x0 + tw + 2, ty + th + 2], fill=c)
            draw.text((x0 + 1, ty - top + 1), caption, fill=(255, 255, 255), font=font)
    return out


def draw_masks(image: Image.Image, masks: Sequence[np.ndarray], colours: Sequence[int] | None = None,
               alpha: float = 0.5) -> Image.Image:
    """A copy of `image` with each boolean mask (H x W, the image's size) blended in its colour at `alpha`."""
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for i, mask in enumerate(masks):
        m = np.asarray(mask, dtype=bool)
        if m.shape != out.shape[:2]:
            raise ValueError(f"mask {i} is {m.shape[1]}x{m.shape[0]} but the image is {out.shape[1]}x{out.shape[0]}")
        c = np.array(colour(colours[i] if colours is not None else i), dtype=np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def _colour_key(names: list[str], i: int) -> int:
    """Same label, same colour: the first position where the label appears."""
    return names.index(names[i]) if names[i] else i
