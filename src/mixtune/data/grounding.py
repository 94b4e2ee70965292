"""Grounding boxes written in each family's own coordinate convention.

ms-swift's grounding data puts `<ref-object>` and `<bbox>` placeholders in the text and the values beside it
(`"objects": {"ref": [...], "bbox": [[x1, y1, x2, y2], ...]}`, see data/formats/records.py). Which text a
box becomes depends on the model: its markup and its coordinates. The coordinates need the decoded image
(its size in the file, and for some families the size the processor resizes it to), so placeholders are
filled just before encoding, in the data-loader workers, not when the file is read.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mixtune.data.conversation import BOX_PLACEHOLDER, REF_PLACEHOLDER, Conversation
from mixtune.data.images import source_size


@dataclass(frozen=True)
class GroundingStyle:
    """How a family writes a referred object and a box. In `box`, `{points}` is `(x1,y1),(x2,y2)` and
    `{list}` is `[x1, y1, x2, y2]`; a point `[x, y]` gives `(x,y)` / `[x, y]`."""
    ref: str = "{ref}"
    box: str = "{list}"
    # None: coordinates are 0-1000 fractions of the image. Otherwise (processor, image as mixtune sized it)
    # -> (width, height) of the image the model sees, and coordinates are absolute pixels of that image.
    model_image_size: Callable[[Any, Any], tuple[int, int]] | None = None


# Families without a convention of their own: the object's name as plain text and a box as a list
# normalised to 0-1000 (the most common convention; ms-swift's default also scales to 0-1000).
DEFAULT_STYLE = GroundingStyle()
# Qwen2-VL and Qwen3-VL (Qwen2.5-VL: the same markup in absolute pixels of the resized image, in qwen2_5_vl.py)
QWEN_STYLE = GroundingStyle(ref="<|object_ref_start|>{ref}<|object_ref_end|>",
                            box="<|box_start|>{points}<|box_end|>")
# InternVL 2/2.5/3: <ref>a dog</ref><box>[[x1, y1, x2, y2]]</box>, 0-1000
INTERNVL_STYLE = GroundingStyle(ref="<ref>{ref}</ref>", box="<box>[{list}]</box>")

_PLACEHOLDERS = re.compile(f"{re.escape(REF_PLACEHOLDER)}|{re.escape(BOX_PLACEHOLDER)}")


def fill_grounding(conv: Conversation, images: list, processor, style: GroundingStyle | None) -> Conversation:
    """A copy of `conv` with every `<ref-object>` / `<bbox>` replaced, in order, by the family's text."""
    if conv.objects is None:
        return conv
    style = style or DEFAULT_STYLE
    objects = conv.objects
    boxes = [box_text(box, image_id(objects, k), objects.bbox_type, images, processor, style, conv)
             for k, box in enumerate(objects.boxes)]
    refs = [style.ref.format(ref=ref) for ref in objects.refs]
    counters = {REF_PLACEHOLDER: iter(refs), BOX_PLACEHOLDER: iter(boxes)}
    turns = [dataclasses.replace(t, text=_PLACEHOLDERS.sub(lambda m: next(counters[m.group(0)]), t.text))
             for t in conv.turns]
    return dataclasses.replace(conv, turns=turns, objects=None)


def image_id(objects, k: int) -> int:
    return objects.image_ids[k] if k < len(objects.image_ids) else 0


def box_text(box: list[float], image_id: int, bbox_type: str, images: list, processor, style: GroundingStyle,
             conv: Conversation) -> str:
    fractions = box_fractions(box, image_id, bbox_type, images, conv)
    if style.model_image_size is None:
        width, height = 1000, 1000
    else:
        width, height = style.model_image_size(processor, images[image_id])
    coords = [round(f * (width if i % 2 == 0 else height)) for i, f in enumerate(fractions)]
    points = ",".join(f"({x},{y})" for x, y in zip(coords[::2], coords[1::2]))
    return style.box.format(points=points, list=str(coords))


def box_fractions(box: list[float], image_id: int, bbox_type: str, images: list, conv: Conversation) -> list[float]:
    """The box as fractions 0-1 of its image's width and height."""
    if bbox_type == "norm1":
        fractions = list(box)
    else:
        width, height = source_size(images[image_id])
        fractions = [v / (width if i % 2 == 0 else height) for i, v in enumerate(box)]
    if any(f < -1e-6 or f > 1 + 1e-6 for f in fractions):
        width, height = source_size(images[image_id])
        bounds = "fractions 0-1 ('bbox_type': 'norm1')" if bbox_type == "norm1" else f"{width}x{height} pixels"
        raise conv.error(f"objects.bbox {list(box)} lies outside image {image_id} ({bounds})", "objects")
    return fractions
