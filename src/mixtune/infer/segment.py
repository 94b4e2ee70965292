"""`mixtune predict` for segmentation models (SAM): one mask per prompted object of a COCO instances file,
written as COCO-style results (predictions.json: image_id, category_id, segmentation as compressed RLE,
score = the IoU head's estimate), metrics.json (mIoU where ground truth exists), and with `--draw` one PNG
per image: every predicted mask blended in, with its prompt box and category drawn (infer/draw.py)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from mixtune.data import masks as mask_codec


def entry_of(entry, base_dir: str):
    from mixtune.data.dataset import DatasetEntry

    return entry if isinstance(entry, DatasetEntry) else DatasetEntry.from_config(entry, base_dir, "--dataset")


def predict_segmentation(model_path: str, entry, output_dir: str, base_dir: str = ".", draw: bool = False,
                         batch_size: int = 16, lora_path: str | None = None, max_drawn: int | None = None) -> dict:
    from mixtune.data.badsamples import BadSamples
    from mixtune.models.loading import load_model_and_processor
    from mixtune.data.formats.segmentation import read_mask_samples
    from mixtune.tasks.segmentation import MaskPrep, collate_masks, predict_masks

    entry = entry_of(entry, base_dir)
    _, model, processor = load_model_and_processor(model_path, lora_path=lora_path, merge_lora=True)
    model.eval()
    bad = BadSamples(entry.on_bad_sample, entry=entry.label())
    samples = read_mask_samples(entry, bad, need_mask=False)
    prep = MaskPrep(processor, train=False)
    results, masks, ious = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pred, scores, _ = predict_masks(model, processor.image_processor, collate_masks([prep(s) for s in chunk]))
        for sample, mask, score in zip(chunk, pred, scores):
            result = {"image_id": sample.image_id, "annotation_id": sample.annotation_id,
                      "category_id": sample.category_id, "prompt_box": [round(v, 2) for v in sample.box],
                      "segmentation": mask_codec.encode(mask), "score": round(float(score), 4)}
            if sample.rle is not None:
                result["iou"] = round(mask_codec.iou(mask, mask_codec.decode(sample.rle)), 4)
                ious.append(result["iou"])
            results.append(result)
            masks.append(mask)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "predictions.json"), "w") as f:
        json.dump(results, f)
    summary = {"objects": len(results), "with_ground_truth": len(ious), "skipped": len(bad.records),
               "miou": float(np.mean(ious)) if ious else None,
               "predictions": os.path.join(output_dir, "predictions.json")}
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    summary["pictures"] = draw_predictions(samples, masks, results, output_dir, max_drawn) if draw else []
    return summary


def draw_predictions(samples, masks, results, output_dir: str, limit: int | None = None) -> list[str]:
    """One PNG per image: its objects' masks blended, their prompt boxes labelled with category and score."""
    from mixtune.data.images import load_image
    from mixtune.infer.draw import draw_boxes, draw_masks

    by_image = defaultdict(list)
    for i, sample in enumerate(samples):
        by_image[sample.image].append(i)
    folder = os.path.join(output_dir, "drawn")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for image_path, idx in list(by_image.items())[:limit]:
        image = load_image(image_path)
        colours = [samples[i].category_id for i in idx]
        picture = draw_masks(image, [masks[i] for i in idx], colours=colours)
        picture = draw_boxes(picture, [samples[i].box for i in idx], [samples[i].category for i in idx],
                             [results[i]["score"] for i in idx], colours=colours, width=1)
        path = os.path.join(folder, os.path.splitext(os.path.basename(image_path))[0] + ".png")
        picture.save(path)
        paths.append(path)
    return paths


def is_segmentation_model(model_path: str | None, lora_path: str | None = None) -> bool:
    from mixtune.models.registry import family_for_checkpoint
    from mixtune.tools.merge_lora import read_adapter_config

    base = model_path or (read_adapter_config(lora_path).get("base_model_name_or_path") if lora_path else None)
    return bool(base) and os.path.isdir(base) and family_for_checkpoint(base).task == "segmentation"



def predict_segmentation_cli(model: str, lora: str | None, entries: list, args) -> int:
    for entry in entries:
        out = args.output_dir if len(entries) == 1 else os.path.join(args.output_dir, entry.label())
        summary = predict_segmentation(model, entry, out, draw=args.draw, batch_size=args.batch_size, lora_path=lora)
        print(json.dumps(summary, indent=1))
    return 0
