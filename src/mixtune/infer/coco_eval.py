"""COCO box mAP, AP50 and AP75 through pycocotools' own COCOeval, from in-memory ground truth and results.

Results are COCO's result format: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].
"""

from __future__ import annotations

import contextlib
import io


def coco_ground_truth(images: list[dict], annotations: list[dict], categories: list[dict]):
    """A pycocotools COCO object from lists shaped like an instances file's (ids given by the caller)."""
    from pycocotools.coco import COCO

    coco = COCO()
    anns = []
    for i, ann in enumerate(annotations):
        x, y, w, h = ann["bbox"]
        anns.append({"id": i + 1, "area": ann.get("area") or w * h, "iscrowd": ann.get("iscrowd", 0), **ann})
    coco.dataset = {"images": images, "annotations": anns, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def box_map(ground_truth, results: list[dict]) -> dict[str, float]:
    """{"map", "map_50", "map_75"} of `results` against `ground_truth` (a COCO object). No results: all 0.0
    (pycocotools refuses an empty result list). A category without ground truth boxes is not averaged in."""
    from pycocotools.cocoeval import COCOeval

    if not results or not ground_truth.getAnnIds():
        return {"map": 0.0, "map_50": 0.0, "map_75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        detections = ground_truth.loadRes([dict(r) for r in results])
        evaluator = COCOeval(ground_truth, detections, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # stats[0..2]: AP at IoU .50:.95, .50, .75; -1 means "no ground truth to score against"
    return {k: max(float(v), 0.0) for k, v in zip(("map", "map_50", "map_75"), evaluator.stats[:3])}
