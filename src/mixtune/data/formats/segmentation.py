"""Masks for the segmentation task (mixtune/tasks/segmentation.py).

`coco_segmentation`: a COCO instances JSON (data/formats/coco_instances.py) whose annotations carry a
`segmentation` (polygons, or RLE with list or compressed counts; data/masks.py checks and decodes them). One
sample per non-crowd annotation: its image, its mask as compressed RLE, its tight box, its category, and the
entry's prompt kind (`prompt: box`, the default, or `point`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mixtune.data import masks as mask_codec
from mixtune.data.formats import expand_data_files, register
from mixtune.data.formats.coco_instances import read_coco_instances
from mixtune.errors import ConfigError, DataError

log = logging.getLogger("mixtune")
PROMPTS = ("box", "point")


@dataclass
class MaskSample:
    image: str  # path
    height: int
    width: int
    rle: dict | None  # compressed RLE of the ground truth (None: prompts only, at predict time)
    box: list[float]  # [x0, y0, x1, y1] in pixels: the mask's tight box, else the annotation's bbox
    category_id: int
    category: str
    prompt: str = "box"
    file: str | None = None
    index: int | None = None  # the annotation's position in the file
    image_id: object = None
    annotation_id: object = None


@register("coco_segmentation")
def read_coco_segmentation(entry, bad) -> list:
    return read_mask_samples(entry, bad, need_mask=True)


read_coco_segmentation.task = "segmentation"


def read_mask_samples(entry, bad, need_mask: bool = True) -> list[MaskSample]:
    """Every non-crowd annotation of the entry's COCO instances files as one sample. A missing, broken or
    empty segmentation raises (file, annotation index, field) or is counted under `on_bad_sample: skip`;
    with `need_mask` False (predict) an annotation without one is prompted by its bbox."""
    prompt = entry.prompt or "box"
    if prompt not in PROMPTS:
        raise ConfigError(f"segmentation prompts are {' or '.join(PROMPTS)}, got {prompt!r}", key="dataset.prompt")
    out, crowd = [], 0
    for path in expand_data_files(entry.data_files, entry.base_dir):
        coco = read_coco_instances(path, entry.image_root, bad)
        for image in coco.images:
            for ann in image.annotations:
                if ann.iscrowd:  # a crowd region covers many objects: no single object to prompt
                    crowd += 1
                    continue
                with bad.catch():
                    out.append(mask_sample(image, ann, coco.categories, prompt, path, need_mask))
    if crowd:
        log.info("dataset %s: %d crowd annotations (iscrowd: 1) not used as objects", entry.label(), crowd)
    return out


def mask_sample(image, ann, categories: dict, prompt: str, path: str, need_mask: bool) -> MaskSample:
    where = dict(file=path, index=ann.index)
    rle = None
    if ann.segmentation is None:
        if need_mask:
            raise DataError("annotation has no 'segmentation'", field="segmentation", **where)
        x, y, w, h = ann.bbox
        box = [x, y, x + w, y + h]
    else:
        try:
            mask = mask_codec.segmentation_mask(ann.segmentation, image.height, image.width)
        except DataError as e:
            raise DataError(e.reason, field=e.field, **where) from None
        rle, box = mask_codec.encode(mask), mask_codec.mask_box(mask)
    return MaskSample(image.path, image.height, image.width, rle, box, ann.category_id,
                      categories[ann.category_id], prompt, path, ann.index, image.id, ann.id)
