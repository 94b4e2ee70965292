"""COCO instances JSON (detection and segmentation annotations) read into plain dataclasses.

A file is {"images": [{"id", "file_name", "width", "height"}], "annotations": [{"id", "image_id", "bbox":
[x, y, w, h], "category_id", "iscrowd", "area", "segmentation"}], "categories": [{"id", "name"}]}.
Boxes are checked against their image; `segmentation` is kept raw (polygons or RLE) for the segmentation
task to decode. A bad annotation raises a DataError naming file, annotation index and field, or is skipped
and counted under `on_bad_sample: skip` (data/badsamples.py); an image whose file is missing likewise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from mixtune.data.badsamples import BadSamples
from mixtune.data.formats.jsonstream import load_document
from mixtune.errors import DataError


@dataclass
class DetectionAnnotation:
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels (COCO's own order)
    category_id: int
    iscrowd: int = 0
    area: float | None = None
    segmentation: Any = None  # raw: a list of polygons, or an RLE dict (counts as list or string)
    index: int = -1  # position in the file's "annotations" list, for messages
    id: int | None = None


@dataclass
class DetectionImage:
    path: str
    width: int
    height: int
    annotations: list[DetectionAnnotation] = field(default_factory=list)
    id: int | None = None
    file_name: str = ""


@dataclass
class CocoInstances:
    images: list[DetectionImage]
    categories: dict[int, str]  # category id -> name, in the file's order
    path: str = ""


def read_coco_instances(path: str, image_root: str | None = None, bad: BadSamples | None = None,
                        check_files: bool = True) -> CocoInstances:
    """Read and check one instances file. `image_root`: where `file_name`s are (default: the file's folder).
    `check_files`: an image whose file does not exist is bad (off for results-only uses such as eval)."""
    bad = bad or BadSamples()
    data = load_document(path)
    if not isinstance(data, dict):
        raise DataError("a COCO instances file is a JSON object with 'images', 'annotations', 'categories'",
                        file=path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"missing or non-list '{key}'", file=path, field=key)
    categories = read_categories(data["categories"], path)
    root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    images = read_images(data["images"], path, root, bad, check_files)
    by_id = {img.id: img for img in images}
    known_ids = {img.get("id") for img in data["images"] if isinstance(img, dict)}
    for index, ann in enumerate(data["annotations"]):
        with bad.catch():
            image_id = _required(ann, "image_id", path, index)
            if image_id not in known_ids:
                raise DataError(f"image_id {image_id!r} is not in the file's 'images' list", file=path, index=index,
                                field="image_id")
            image = by_id.get(image_id)
            if image is None:  # its image was skipped (counted there)
                continue
            image.annotations.append(read_annotation(ann, index, image, categories, path))
    return CocoInstances(images=images, categories=categories, path=path)


def read_categories(raw: list, path: str) -> dict[int, str]:
    categories: dict[int, str] = {}
    for i, cat in enumerate(raw):
        where = dict(file=path, index=i)
        if not isinstance(cat, dict) or not isinstance(cat.get("id"), int) or isinstance(cat.get("id"), bool):
            raise DataError("category needs an integer 'id'", field="categories.id", **where)
        if not isinstance(cat.get("name"), str) or not cat["name"].strip():
            raise DataError("category needs a non-empty 'name'", field="categories.name", **where)
        if cat["id"] in categories:
            raise DataError(f"category id {cat['id']} is listed twice", field="categories.id", **where)
        categories[cat["id"]] = cat["name"]
    if not categories:
        raise DataError("'categories' is empty", file=path, field="categories")
    return categories


def read_images(raw: list, path: str, root: str, bad: BadSamples, check_files: bool) -> list[DetectionImage]:
    images = []
    for i, img in enumerate(raw):
        with bad.catch():
            images.append(read_image(img, i, path, root, check_files))
    return images


def read_image(img: Any, index: int, path: str, root: str, check_files: bool) -> DetectionImage:
    where = dict(file=path, index=index)
    if not isinstance(img, dict):
        raise DataError("an 'images' entry must be an object", field="images", **where)
    for key in ("id", "file_name", "width", "height"):
        if key not in img:
            raise DataError(f"image is missing '{key}'", field=f"images.{key}", **where)
    width, height = img["width"], img["height"]
    if not (_is_number(width) and _is_number(height)) or width <= 0 or height <= 0:
        raise DataError(f"image size must be positive numbers, got width={width!r} height={height!r}",
                        field="images.width", **where)
    file = img["file_name"] if os.path.isabs(img["file_name"]) else os.path.join(root, img["file_name"])
    if check_files and not os.path.exists(file):
        raise DataError(f"image file not found: {file}", field="images.file_name", **where)
    return DetectionImage(path=file, width=int(width), height=int(height), id=img["id"], file_name=img["file_name"])


def read_annotation(ann: Any, index: int, image: DetectionImage, categories: dict[int, str],
                    path: str) -> DetectionAnnotation:
    where = dict(file=path, index=index)
    bbox = check_box(_required(ann, "bbox", path, index), image.width, image.height, dict(where, field="bbox"))
    category_id = _required(ann, "category_id", path, index)
    if category_id not in categories:
        raise DataError(f"unknown category_id {category_id!r}; the file's categories are {sorted(categories)}",
                        field="category_id", **where)
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise DataError(f"iscrowd must be 0 or 1, got {iscrowd!r}", field="iscrowd", **where)
    area = ann.get("area")
    if area is not None and (not _is_number(area) or area < 0):
        raise DataError(f"area must be a non-negative number, got {area!r}", field="area", **where)
    return DetectionAnnotation(bbox=bbox, category_id=category_id, iscrowd=int(iscrowd),
                               area=None if area is None else float(area), segmentation=ann.get("segmentation"),
                               index=index, id=ann.get("id"))


def check_box(bbox: Any, width: float, height: float, where: dict) -> tuple[float, float, float, float]:
    """[x, y, w, h] in pixels inside a width x height image (half a pixel of rounding allowed), as floats.
    `where`: the DataError's file / index / line / field."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(f"bbox must be [x, y, w, h] numbers, got {bbox!r}", **where)
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise DataError(f"bbox has a non-positive size (w={w:g}, h={h:g})", **where)
    if x < -0.5 or y < -0.5 or x + w > width + 0.5 or y + h > height + 0.5:
        raise DataError(f"bbox [{x:g}, {y:g}, {w:g}, {h:g}] lies outside its {width}x{height} image", **where)
    return x, y, w, h


def _required(ann: Any, key: str, path: str, index: int):
    if not isinstance(ann, dict) or key not in ann:
        raise DataError(f"annotation is missing '{key}'", file=path, index=index, field=key)
    return ann[key]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
