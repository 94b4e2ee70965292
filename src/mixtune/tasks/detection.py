"""The detection task: open-vocabulary detectors prompted with phrases (Grounding DINO), trained with the
model's own Hungarian matcher and loss, evaluated by COCO box mAP / AP50 / AP75 (pycocotools).

Samples come from the detection readers (data/formats/detection.py: `coco_detection`, `odvg`, `refcoco`).
Each batch goes through the checkpoint's own processor: its image processor resizes the images and turns
the boxes into the model's normalised (cx, cy, w, h) targets; its tokenizer encodes the prompts
("red circle . blue square ."), whose phrase order gives each box's class index. Checkpoints save in
transformers' format.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mixtune.data.images import load_image
from mixtune.errors import ConfigError, DataError
from mixtune.tasks import TaskData
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.train.trainer import MixTrainer

log = logging.getLogger("mixtune")
TOP_K = 100  # detections kept per image for COCO eval (COCO's own maxDets)


def load(mix, family, **_):
    from mixtune.models.loading import load_model_and_processor

    if family.name == "yolo_world":  # ultralytics' model and loss (tasks/yolo_world.py)
        from mixtune.tasks.yolo_world import load as load_yolo_world

        return load_yolo_world(mix, family)

    if mix.lora and not family.supports_lora:
        raise ConfigError(f"LoRA on {family.name} is not supported; train fully, or freeze parts", key="lora")
    _, model, processor = load_model_and_processor(mix.model_name_or_path, mix.attn_implementation)
    return model, processor


def read_samples(entry, bad):
    from mixtune.data.formats import get_reader

    return get_reader(entry.name)(entry, bad)


@dataclass
class DetectionPrep:
    """Decodes a sample's image (picklable for loader workers); boxes and prompt are processed per batch."""

    def __call__(self, sample) -> dict:
        where = dict(file=sample.file, index=sample.index, line=sample.line, field="image")
        try:
            image = load_image(sample.image)
        except DataError as e:
            raise DataError(e.reason, **where) from None
        if image.size != (sample.width, sample.height):
            raise DataError(f"the image is {image.size[0]}x{image.size[1]} but its record says "
                            f"{sample.width}x{sample.height}: the boxes would land in the wrong place", **where)
        return {"image": image, "sample": sample}


def coco_annotations(sample, image_id: int) -> dict:
    """A sample's boxes as the image processor's `coco_detection` annotations; the category is the phrase
    index (the class index the model's loss reads). Crowd boxes are dropped by the processor."""
    return {"image_id": image_id, "annotations": [
        {"bbox": list(box), "category_id": label, "area": box[2] * box[3], "iscrowd": crowd}
        for box, label, crowd in zip(sample.boxes, sample.labels, sample.iscrowd or [0] * len(sample.boxes))]}


@dataclass
class DetectionCollator:
    processor: object  # the checkpoint's GroundingDinoProcessor

    def inputs(self, batch: list[dict], with_labels: bool = True) -> dict:
        samples = [b["sample"] for b in batch]
        images = [b["image"] for b in batch]
        kwargs = {"annotations": [coco_annotations(s, i) for i, s in enumerate(samples)]} if with_labels else {}
        pixels = self.processor.image_processor(images=images, return_tensors="pt", **kwargs)
        text = self.processor.tokenizer([s.prompt for s in samples], padding=True, return_tensors="pt")
        out = {"pixel_values": pixels["pixel_values"], "pixel_mask": pixels["pixel_mask"], **text}
        if with_labels:
            out["labels"] = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in pixels["labels"]]
        return out

    def __call__(self, batch: list[dict]) -> dict:
        return self.inputs(batch)


def check_prompts(datasets, tokenizer, max_text_len: int) -> None:
    """Every distinct prompt fits the model's text length: a cut prompt would lose phrases (classes)."""
    seen = set()
    for dataset in datasets:
        for part in dataset.parts if dataset is not None else []:
            for s in part.samples:
                if s.phrases in seen:
                    continue
                seen.add(s.phrases)
                n = len(tokenizer(s.prompt)["input_ids"])
                if n > max_text_len:
                    raise DataError(f"the prompt of {len(s.phrases)} phrases is {n} tokens, over the model's "
                                    f"max_text_len {max_text_len}: '{s.prompt[:80]}...'; use fewer categories per "
                                    "file or a checkpoint with a longer max_text_len", file=s.file, index=s.index)


def build_data(config, family, model, processor) -> TaskData:
    if family.name == "yolo_world":
        from mixtune.tasks.yolo_world import build_data as build_yolo_world_data

        return build_yolo_world_data(config, family, model, processor)
    prep = DetectionPrep()
    train = build_sample_split(config, "train", read_samples, prep, "detection", reads="detection")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    evals = build_sample_split(config, "eval", read_samples, prep, "detection", reads="detection")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    check_prompts([train, evals], processor.tokenizer, base.config.max_text_len)
    log.info("train images per epoch: %d, eval images: %d", len(train), len(evals) if evals else 0)
    return TaskData(train=train, eval=eval_argument(evals), collator=DetectionCollator(processor),
                    trainer_class=DetectionTrainer,
                    skipped=train.skipped + (evals.skipped if evals is not None else []),
                    # the model's loss is already a per-batch mean: the Trainer must not count label tokens
                    trainer_attrs={"model_accepts_loss_kwargs": False})


def phrase_scores(logits: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per image, a (queries, phrases) score: the mean token probability over each phrase of the prompt (the
    phrases split as the model's own loss splits them). The mean, as Grounding DINO's own COCO evaluation
    weighs a phrase's tokens: a highest-token score would rate "red circle" and "yellow circle" alike
    wherever "circle" fires."""
    from transformers.models.grounding_dino.modeling_grounding_dino import build_label_maps

    probs = logits.sigmoid()
    out = []
    for p, m in zip(probs, build_label_maps(logits, input_ids)):
        weights = m.to(p) / m.sum(-1, keepdim=True).clamp(min=1).to(p)  # (phrases, tokens)
        out.append(p @ weights.T)
    return out


def decode_detections(logits, pred_boxes, input_ids, sizes: list[tuple[int, int]], top_k: int = TOP_K):
    """Per image: (boxes as [x, y, w, h] pixels of the original image, phrase indices, scores), the top_k
    (query, phrase) pairs by score."""
    out = []
    for scores, boxes, (width, height) in zip(phrase_scores(logits, input_ids), pred_boxes, sizes):
        n_phrases = scores.shape[1]
        best = scores.flatten().topk(min(top_k, scores.numel()))
        queries, phrases = best.indices // n_phrases, best.indices % n_phrases
        cx, cy, w, h = boxes[queries].float().unbind(-1)
        xywh = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height], -1)
        out.append((xywh.tolist(), phrases.tolist(), best.values.float().tolist()))
    return out


def class_nms(detection: tuple, iou: float) -> tuple:
    """One image's detections (see decode_detections) after class-wise NMS (torchvision's batched_nms): of two
    boxes of the same phrase overlapping above `iou`, the lower-scored goes; other phrases' boxes never compete.
    Off by default for Grounding DINO: its one-to-one Hungarian training makes it NMS-free by design, and its
    published COCO figures use none; a lower `iou` tidies drawn pictures of an undertrained model."""
    from torchvision.ops import batched_nms

    boxes, phrases, scores = detection
    if not boxes:
        return detection
    xywh = torch.tensor(boxes, dtype=torch.float32)
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], -1)
    keep = batched_nms(xyxy, torch.tensor(scores), torch.tensor(phrases), iou).tolist()  # by score, descending
    return [boxes[i] for i in keep], [phrases[i] for i in keep], [scores[i] for i in keep]


@torch.no_grad()
def detect(model, collator: DetectionCollator, items: list[dict], top_k: int = TOP_K):
    """Detections for prepared items ({"image", "sample"}), one tuple per item (see decode_detections)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in collator.inputs(items, with_labels=False).items()}
    out = model(**inputs)
    sizes = [it["image"].size for it in items]
    return decode_detections(out.logits, out.pred_boxes, inputs["input_ids"], sizes, top_k)


def phrase_ids(samples) -> dict[str, int]:
    """One category id per distinct phrase (COCO eval scores each category apart)."""
    names = dict.fromkeys(p for s in samples for p in s.phrases)
    return {p: i + 1 for i, p in enumerate(names)}


def own_coco_ids(samples) -> bool:
    """Whether the samples are one COCO file's images: then results keep that file's image and category ids."""
    return bool(samples) and all(s.image_id is not None and s.category_ids for s in samples) and \
        len({s.file for s in samples}) == 1 and len({s.image_id for s in samples}) == len(samples)


def coco_records(samples, detections) -> tuple[list, list, list, list]:
    """(images, annotations, results, categories) in COCO's shapes, for the samples and their detections
    (see decode_detections). Ids: the COCO file's own when it is one file, else one per image and phrase."""
    own = own_coco_ids(samples)
    ids = {} if own else phrase_ids(samples)

    def category(s, phrase_index: int) -> int:
        return s.category_ids[phrase_index] if own else ids[s.phrases[phrase_index]]

    images, annotations, results, categories = [], [], [], {}
    for n, (s, (boxes, phrases, scores)) in enumerate(zip(samples, detections)):
        image_id = s.image_id if own else n + 1
        images.append({"id": image_id, "width": s.width, "height": s.height, "file_name": s.image})
        for i, phrase in enumerate(s.phrases):
            categories.setdefault(category(s, i), phrase)
        annotations += [{"image_id": image_id, "bbox": list(b), "category_id": category(s, lab), "iscrowd": c}
                        for b, lab, c in zip(s.boxes, s.labels, s.iscrowd or [0] * len(s.boxes))]
        results += [{"image_id": image_id, "category_id": category(s, p), "bbox": [round(v, 2) for v in b],
                     "score": round(sc, 5)} for b, p, sc in zip(boxes, phrases, scores)]
    return images, annotations, results, [{"id": i, "name": p} for i, p in categories.items()]


def detect_all(model, dataset, collator, batch_size: int = 8, top_k: int = TOP_K, detect_fn=None):
    """(samples, detections) over a prepared dataset, in order; `detect_fn`: the family's detect (this
    module's, for Grounding DINO, by default)."""
    was_training = model.training
    model.eval()
    samples, detections = [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        samples += [it["sample"] for it in items]
        detections += (detect_fn or detect)(model, collator, items, top_k)
    model.train(was_training)
    return samples, detections


def box_metrics(model, dataset, collator, batch_size: int = 8, detect_fn=None) -> dict[str, float]:
    """COCO mAP, AP50, AP75 of the model's detections on a prepared dataset."""
    from mixtune.infer.coco_eval import box_map, coco_ground_truth

    detected = detect_all(model, dataset, collator, batch_size, detect_fn=detect_fn)
    images, annotations, results, categories = coco_records(*detected)
    return box_map(coco_ground_truth(images, annotations, categories), results)


class DetectionTrainer(MixTrainer):
    """The model's own loss; evaluation adds COCO box mAP, AP50 and AP75 (eval_map, eval_map_50, ...)."""
    detect_fn = None  # the family's detect(model, collator, items, top_k); None: Grounding DINO's

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # the eval loss only: the targets are a list of dicts, which the Trainer cannot gather as labels
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = model(**inputs).loss
        return loss.detach(), None, None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(dataset, dict):  # the Trainer evaluated each entry through this method
            return metrics
        scores = box_metrics(self.model, dataset, self.data_collator, self.args.per_device_eval_batch_size,
                             detect_fn=self.detect_fn)
        scores = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(scores)
        metrics.update(scores)
        return metrics
