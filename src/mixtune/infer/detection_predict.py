"""`mixtune predict` for detection checkpoints: detections of a dataset entry written in COCO's result format
(predictions.json), COCO box mAP / AP50 / AP75 against the entry's boxes, and with `--draw` one PNG per image
with the boxes over `threshold` drawn, labelled and scored."""

from __future__ import annotations

import functools
import json
import os

import torch

from mixtune.errors import MixtuneError


def load_detector(model_dir: str, lora_path: str | None = None):
    from mixtune.models.loading import load_model_and_processor

    family, model, processor = load_model_and_processor(model_dir, lora_path=lora_path, merge_lora=True)
    if family.task != "detection":
        raise MixtuneError(f"{model_dir} is a {family.name} checkpoint ({family.task}), not a detector")
    return model.eval(), processor


def read_entries(entries) -> list:
    """Prepared items ({"image", "sample"}) of the entries' samples (bad ones raise or are counted as set)."""
    from mixtune.data.badsamples import BadSamples
    from mixtune.data.formats import get_reader
    from mixtune.data.formats.detection import DetectionSample
    from mixtune.tasks.detection import DetectionPrep

    samples = []
    for entry in entries:
        bad = BadSamples(entry.on_bad_sample, entry=entry.label(), strict_fields=entry.strict_fields)
        got = get_reader(entry.name)(entry, bad)
        if got and not isinstance(got[0], DetectionSample):
            raise MixtuneError(f"'{entry.name}' data has no boxes: a detector predicts on coco_detection, odvg or "
                               "refcoco entries")
        samples += got[: entry.max_samples] if entry.max_samples else got
    return [DetectionPrep()(s) for s in samples]


@torch.no_grad()
def predict_detection(model_dir: str, entries, output_dir: str, draw: bool = False, batch_size: int = 8,
                      threshold: float = 0.3, lora_path: str | None = None, nms_iou: float | None = None) -> dict:
    """`nms_iou`: Grounding DINO: class-wise NMS at that IoU (default none: tasks/detection.py's class_nms);
    YOLO-World: the IoU of its own NMS (default 0.7, ultralytics')."""
    from mixtune.data.dataset import DatasetEntry
    from mixtune.infer.coco_eval import box_map, coco_ground_truth
    from mixtune.models.registry import family_for_checkpoint
    from mixtune.tasks.detection import DetectionCollator, class_nms, coco_records, detect

    if isinstance(entries, dict):  # one raw entry (the demo's)
        entries = [DatasetEntry.from_config(entries, os.getcwd(), "--dataset")]
    items = read_entries(entries)
    if family_for_checkpoint(model_dir).name == "yolo_world":  # ultralytics' model (tasks/yolo_world.py)
        from mixtune.tasks.yolo_world import world_detector

        model, collator, detect = world_detector(model_dir, items, lora_path)
        detect = functools.partial(detect, iou=nms_iou) if nms_iou is not None else detect
    else:
        model, processor = load_detector(model_dir, lora_path)
        collator = DetectionCollator(processor)
    detections = []
    for start in range(0, len(items), batch_size):
        detections += detect(model, collator, items[start: start + batch_size])
    if nms_iou is not None and family_for_checkpoint(model_dir).name != "yolo_world":
        detections = [class_nms(d, nms_iou) for d in detections]
    samples = [it["sample"] for it in items]
    images, annotations, results, categories = coco_records(samples, detections)
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "predictions.json")
    with open(path, "w") as f:
        json.dump(results, f)
    metrics = box_map(coco_ground_truth(images, annotations, categories), results)
    summary = {"images": len(items), "detections": len(results), "predictions": path, **metrics,
               "categories": categories}
    if draw:
        summary["drawn"] = draw_all(items, detections, os.path.join(output_dir, "drawn"), threshold)
    with open(os.path.join(output_dir, "predict_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


DRAW_MIN_SIDE = 384  # small pictures are enlarged so that the labels stay readable


def readable_size(image):
    """(image, scale): enlarged by a whole factor when its shorter side is under DRAW_MIN_SIDE."""
    scale = max(1, DRAW_MIN_SIDE // max(1, min(image.size)))
    if scale == 1:
        return image, 1
    from PIL import Image

    return image.resize((image.width * scale, image.height * scale), Image.NEAREST), scale


def draw_all(items: list, detections: list, out_dir: str, threshold: float) -> list[str]:
    from mixtune.infer.draw import draw_boxes

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for n, (item, (boxes, phrases, scores)) in enumerate(zip(items, detections)):
        keep = [i for i, sc in enumerate(scores) if sc >= threshold]
        s = item["sample"]
        image, scale = readable_size(item["image"])
        corners = [[v * scale for v in (boxes[i][0], boxes[i][1], boxes[i][0] + boxes[i][2], boxes[i][1] + boxes[i][3])]
                   for i in keep]
        picture = draw_boxes(image, corners, [s.phrases[phrases[i]] for i in keep], [scores[i] for i in keep],
                             colours=[phrases[i] for i in keep])
        name = os.path.splitext(os.path.basename(s.image))[0] if not s.image.startswith("data:") else "image"
        paths.append(os.path.join(out_dir, f"{n:05d}_{name}.png"))
        picture.save(paths[-1])
    return paths
