"""COCO segmentations (polygons, uncompressed RLE, compressed RLE) checked and turned into boolean masks with
pycocotools, and masks back into compressed RLE for result files.

pycocotools trusts its input: an RLE whose counts do not add up to height x width decodes into memory it
does not own (measured: a 10x12 mask with counts [5, 3] came back with 6494 pixels set). So every RLE is
checked here first, and a bad one is a DataError naming the field, which the caller turns into a file /
index error or a counted skip (data/badsamples.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mixtune.errors import DataError

FIELD = "segmentation"


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict:
    """Polygons or RLE for an image of height x width -> one compressed RLE (pycocotools' dict). Raises a
    DataError (field 'segmentation', no file or index: the caller knows those) when it is malformed."""
    from pycocotools import mask as coco_mask

    if isinstance(segmentation, list):
        return coco_mask.merge(coco_mask.frPyObjects(check_polygons(segmentation), height, width))
    if isinstance(segmentation, dict):
        size = segmentation.get("size")
        if size != [height, width] and tuple(size or ()) != (height, width):
            raise DataError(f"RLE size {size!r} is not the image's [height, width] [{height}, {width}]", field=FIELD)
        counts = segmentation.get("counts")
        if isinstance(counts, list):
            check_counts(counts, height * width)
            return coco_mask.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
        if isinstance(counts, (str, bytes)):
            text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
            check_counts(compressed_counts(text), height * width)
            return {"counts": text.encode("ascii"), "size": [height, width]}
        raise DataError("RLE 'counts' must be a list of run lengths or a compressed string, got "
                        f"{type(counts).__name__}", field=FIELD)
    raise DataError(f"must be a list of polygons or an RLE object, got {type(segmentation).__name__}", field=FIELD)


def check_polygons(polygons: list) -> list[list[float]]:
    if not polygons:
        raise DataError("no polygons (an empty list)", field=FIELD)
    for i, poly in enumerate(polygons):
        if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in poly):
            raise DataError(f"polygon {i} must be a flat list of numbers [x1, y1, x2, y2, ...]", field=FIELD)
        if len(poly) < 6 or len(poly) % 2:
            raise DataError(f"polygon {i} needs an even count of at least 6 numbers (3 points), got {len(poly)}",
                            field=FIELD)
    return [[float(v) for v in poly] for poly in polygons]


def check_counts(counts: list, pixels: int) -> None:
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise DataError("broken RLE: counts must be non-negative integers", field=FIELD)
    if sum(counts) != pixels:
        raise DataError(f"broken RLE: counts add up to {sum(counts)} pixels, the image has {pixels}", field=FIELD)


def compressed_counts(text: str) -> list[int]:
    """COCO's compressed RLE string -> run lengths (pycocotools' rleFrString, which does no checking)."""
    counts: list[int] = []
    p = 0
    while p < len(text):
        value, k, more = 0, 0, True
        while more:
            if p >= len(text):
                raise DataError("broken RLE: the compressed counts string ends inside a number", field=FIELD)
            c = ord(text[p]) - 48
            if not 0 <= c < 64:
                raise DataError(f"broken RLE: character {text[p]!r} cannot occur in compressed counts", field=FIELD)
            value |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                value |= -1 << (5 * k)
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode(rle: dict) -> np.ndarray:
    """Compressed RLE -> boolean mask (height x width)."""
    import warnings

    from pycocotools import mask as coco_mask

    with warnings.catch_warnings():  # pycocotools 2.0.11 under numpy 2 warns on every decode (its __array__)
        warnings.simplefilter("ignore", DeprecationWarning)
        return coco_mask.decode(rle).astype(bool)


def encode(mask: np.ndarray) -> dict:
    """Boolean mask -> compressed RLE with a str `counts` (JSON-ready), COCO's result format."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmentation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A checked, non-empty boolean mask for one annotation (an empty one is a DataError: nothing to learn)."""
    mask = decode(segmentation_to_rle(segmentation, height, width))
    if not mask.any():
        raise DataError("empty mask: the segmentation covers no pixel of its image", field=FIELD)
    return mask


def mask_box(mask: np.ndarray) -> list[float]:
    """The tight [x0, y0, x1, y1] box (pixel edges) around a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree perfectly (1.0)."""
    union = np.logical_or(pred, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, target).sum() / union)


def mean_iou(preds: list[np.ndarray], targets: list[np.ndarray]) -> float:
    """mIoU over instances: the mean of each predicted mask's IoU with its own ground truth."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} ground-truth masks")
    return float(np.mean([iou(p, t) for p, t in zip(preds, targets)])) if targets else 0.0
