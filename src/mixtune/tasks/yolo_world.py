"""The detection task for YOLO-World (models/yolo_world.py): mixtune's readers, checks, skips, Trainer,
logging and saving around ultralytics' WorldModel and its own loss (v8DetectionLoss: task-aligned assignment,
BCE + CIoU + DFL).

A sample's phrases are its classes, as for Grounding DINO: each image is scored against its own phrases'
CLIP embeddings. In a batch whose images have different phrase lists the shorter lists are padded with
copies of their own first phrase (the neck's text attention takes a max over phrases, which copies leave
unchanged) and the copies' scores are masked out of the loss and the detections, so an image's detections do
not depend on what it is batched with. Images are letterboxed to the checkpoint's `imgsz` (aspect kept,
grey 114 borders: ultralytics' own LetterBox) without further augmentation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from mixtune.errors import ConfigError
from mixtune.tasks import TaskData
from mixtune.tasks.detection import TOP_K, DetectionPrep, DetectionTrainer, read_samples
from mixtune.tasks.samples import build_sample_split, eval_argument

log = logging.getLogger("mixtune")
MAX_SAVED_CLASSES = 1000  # more distinct training phrases (referring expressions) are not stored as classes
MASKED_SCORE = -100.0  # a padded phrase's logit: sigmoid 0, BCE against 0 is 0, no gradient
PAD_GREY = 114


def load(mix, family, **_):
    from mixtune.models.yolo_world import load_world

    if mix.lora:
        raise ConfigError("LoRA on yolo_world is not supported (its layers are convolutions in ultralytics' own "
                          "modules); train fully, or freeze_backbone", key="lora")
    model, _ = load_world(mix.model_name_or_path)
    return model, None


def letterbox_geometry(width: int, height: int, imgsz: int) -> tuple[float, int, int, int, int]:
    """(scale, new width, new height, left pad, top pad) fitting the image into an imgsz square."""
    scale = imgsz / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    return scale, w, h, (imgsz - w) // 2, (imgsz - h) // 2


def letterbox(image, imgsz: int) -> torch.Tensor:
    """(3, imgsz, imgsz) floats in [0, 1], RGB, the image centred on grey."""
    from PIL import Image

    _, w, h, left, top = letterbox_geometry(image.width, image.height, imgsz)
    canvas = Image.new("RGB", (imgsz, imgsz), (PAD_GREY,) * 3)
    canvas.paste(image.convert("RGB").resize((w, h), Image.BILINEAR), (left, top))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)


def target_boxes(sample, imgsz: int) -> list[list[float]]:
    """The sample's non-crowd boxes as ultralytics' targets: (cx, cy, w, h) over the letterboxed image, 0-1."""
    scale, _, _, left, top = letterbox_geometry(sample.width, sample.height, imgsz)
    crowd = sample.iscrowd or [0] * len(sample.boxes)
    return [[(x * scale + left + w * scale / 2) / imgsz, (y * scale + top + h * scale / 2) / imgsz,
             w * scale / imgsz, h * scale / imgsz] for (x, y, w, h), c in zip(sample.boxes, crowd) if not c]


@dataclass
class WorldCollator:
    imgsz: int
    embeddings: dict  # phrase -> CLIP text embedding (computed once, before training)

    def texts(self, samples) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, n, dim) phrase embeddings, padded with each image's first phrase, and the (B, n) real-phrase mask."""
        n = max(len(s.phrases) for s in samples)
        feats = torch.stack([torch.stack([self.embeddings[s.phrases[min(i, len(s.phrases) - 1)]] for i in range(n)])
                             for s in samples])
        mask = torch.tensor([[i < len(s.phrases) for i in range(n)] for s in samples])
        return feats, mask

    def inputs(self, batch: list[dict], with_labels: bool = True) -> dict:
        samples = [b["sample"] for b in batch]
        feats, mask = self.texts(samples)
        out = {"img": torch.stack([letterbox(b["image"], self.imgsz) for b in batch]), "txt_feats": feats,
               "text_mask": mask}
        if with_labels:
            boxes, classes, index = [], [], []
            for i, s in enumerate(samples):
                crowd = s.iscrowd or [0] * len(s.labels)
                kept = [lab for lab, c in zip(s.labels, crowd) if not c]
                boxes += target_boxes(s, self.imgsz)
                classes += kept
                index += [i] * len(kept)
            out.update(bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                       cls=torch.tensor(classes, dtype=torch.float32).reshape(-1, 1),
                       batch_idx=torch.tensor(index, dtype=torch.float32))
        return out

    def __call__(self, batch: list[dict]) -> dict:
        return self.inputs(batch)


def forward(model, inputs: dict):
    """WorldModel's forward on `inputs`' phrases: training mode gives ultralytics' raw prediction dict, eval
    mode (decoded (B, 4 + n, anchors), raw dict); padded phrases' scores are masked in both."""
    model.model[-1].nc = inputs["txt_feats"].shape[1]  # what ultralytics' set_classes does
    out = model.predict(inputs["img"], txt_feats=inputs["txt_feats"])
    raw = out[1] if isinstance(out, tuple) else out
    raw["scores"] = raw["scores"].masked_fill(~inputs["text_mask"][:, :, None], MASKED_SCORE)
    if isinstance(out, tuple):
        decoded = out[0].clone()
        decoded[:, 4:] = decoded[:, 4:] * inputs["text_mask"][:, :, None]
        return decoded, raw
    return raw


def world_loss(model, inputs: dict, criteria: dict) -> tuple[torch.Tensor, dict]:
    """ultralytics' v8DetectionLoss (box, cls, dfl gains from the model's args), per image: ultralytics returns
    it summed over the batch."""
    from ultralytics.utils.loss import v8DetectionLoss

    preds = forward(model, inputs)
    n = inputs["txt_feats"].shape[1]
    if n not in criteria:  # its assigner one-hot encodes over the batch's phrase count
        criteria[n] = v8DetectionLoss(model)
    loss, items = criteria[n](preds, inputs)
    return loss.sum() / inputs["img"].shape[0], items


def unletterbox(xyxy: torch.Tensor, sample, imgsz: int) -> list[list[float]]:
    """Boxes (x1, y1, x2, y2) on the letterboxed image -> [x, y, w, h] pixels of the original, clipped to it."""
    scale, _, _, left, top = letterbox_geometry(sample.width, sample.height, imgsz)
    x1 = ((xyxy[:, 0] - left) / scale).clamp(0, sample.width)
    y1 = ((xyxy[:, 1] - top) / scale).clamp(0, sample.height)
    x2 = ((xyxy[:, 2] - left) / scale).clamp(0, sample.width)
    y2 = ((xyxy[:, 3] - top) / scale).clamp(0, sample.height)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], -1).tolist()


@torch.no_grad()
def detect(model, collator: WorldCollator, items: list[dict], top_k: int = TOP_K, conf: float = 0.0,
           iou: float = 0.7):
    """Per item (boxes [x, y, w, h], phrase indices, scores), the top_k after ultralytics' class-wise NMS with
    its validation settings (IoU 0.7, several classes per box) and no score floor (COCO's 100 per image, as
    for Grounding DINO): the shape decode_detections gives."""
    from ultralytics.utils.nms import non_max_suppression

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in collator.inputs(items, with_labels=False).items()}
    decoded, _ = forward(model, inputs)
    out = []
    for it, det in zip(items, non_max_suppression(decoded, conf, iou, multi_label=True, max_det=top_k)):
        det = det.float().cpu()
        out.append((unletterbox(det[:, :4], it["sample"], collator.imgsz), det[:, 5].long().tolist(),
                    det[:, 4].tolist()))
    return out


def world_detector(model_dir: str, items: list[dict], lora_path: str | None = None):
    """(model, collator, detect) for `mixtune predict`: the checkpoint with its items' phrases embedded."""
    from mixtune.errors import MixtuneError
    from mixtune.models.yolo_world import load_world, phrase_embeddings

    if lora_path:
        raise MixtuneError("yolo_world checkpoints have no LoRA adapters: pass the trained folder as --model")
    model, _ = load_world(model_dir)
    phrases = list(dict.fromkeys(p for it in items for p in it["sample"].phrases))
    return model.eval(), WorldCollator(model.mixtune_folder["imgsz"], phrase_embeddings(model, phrases)), detect


def distinct_phrases(*datasets) -> list[str]:
    return list(dict.fromkeys(p for d in datasets if d is not None for part in d.parts for s in part.samples
                              for p in s.phrases))


def build_data(config, family, model, processor) -> TaskData:
    from mixtune.models.yolo_world import phrase_embeddings

    prep = DetectionPrep()
    train = build_sample_split(config, "train", read_samples, prep, "detection", reads="detection")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    evals = build_sample_split(config, "eval", read_samples, prep, "detection", reads="detection")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = phrase_embeddings(base, distinct_phrases(train, evals))
    train_phrases = distinct_phrases(train)
    log.info("train images per epoch: %d, eval images: %d, phrases: %d", len(train), len(evals) if evals else 0,
             len(embeddings))
    return TaskData(train=train, eval=eval_argument(evals),
                    collator=WorldCollator(base.mixtune_folder["imgsz"], embeddings),
                    trainer_class=WorldTrainer, skipped=train.skipped + (evals.skipped if evals is not None else []),
                    trainer_attrs={"model_accepts_loss_kwargs": False,
                                   "class_names": train_phrases if len(train_phrases) <= MAX_SAVED_CLASSES else None})


class WorldTrainer(DetectionTrainer):
    """ultralytics' loss; eval COCO mAP through the shared DetectionTrainer; saves ultralytics' checkpoint
    with the training phrases as the model's classes (their embeddings in `txt_feats`)."""
    class_names: list[str] | None = None
    detect_fn = staticmethod(detect)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not hasattr(self, "_criteria"):
            self._criteria = {}
        loss, _ = world_loss(model, inputs, self._criteria)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _save(self, output_dir: str | None = None, state_dict=None):
        from mixtune.models.yolo_world import save_world

        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        names = self.class_names
        save_world(model, output_dir, names, self.data_collator.embeddings if names else None, state_dict)
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        from ultralytics.nn.tasks import load_checkpoint

        saved, _ = load_checkpoint(f"{resume_from_checkpoint}/model.pt")
        (model or self.model).load_state_dict(saved.state_dict())
