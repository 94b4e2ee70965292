"""The classification task: timm image models (EVA02 and any timm model by name) on labelled images
(`imagefolder`, `image_label` JSON/JSONL), cross-entropy with timm's label smoothing / mixup / cutmix when
asked, top-1 and top-5 accuracy, checkpoints in timm's own folder format (`timm.create_model("local-dir:...")`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixtune.data.images import load_image
from mixtune.errors import ConfigError, DataError
from mixtune.tasks import TaskData
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.train.trainer import MixTrainer

log = logging.getLogger("mixtune")


def load(mix, family):
    from mixtune.models.timm_classifier import load_timm

    family.check_requires()
    model, config = load_timm(mix.model_name_or_path)
    model.mixtune_timm_config = config  # label names and model_args, for saving
    return model, None


def read_labels(entry, bad):
    from mixtune.data.formats import get_reader

    return get_reader(entry.name)(entry, bad)


def class_names(model, train) -> list[str]:
    """The checkpoint's classes when the data's labels are among them, else the data's (a new head)."""
    labels = {s.label for part in train.parts for s in part.samples}
    known = list(model.mixtune_timm_config.get("label_names") or [])
    if all(isinstance(x, int) for x in labels):
        n = max(max(labels) + 1, model.num_classes)
        return known if len(known) == n else [str(i) for i in range(n)]
    if known and labels <= set(known):
        return known
    return sorted(str(x) for x in labels)


@dataclass
class LabelPrep:
    transform: object
    classes: list[str]

    def __call__(self, sample) -> dict:
        try:
            image = load_image(sample.image)
        except DataError as e:
            raise DataError(e.reason, file=sample.file, index=sample.index, line=sample.line, field="image") from None
        if isinstance(sample.label, int):
            label = sample.label
            if label >= len(self.classes):
                raise DataError(f"label {label} is not below the {len(self.classes)} classes", file=sample.file,
                                index=sample.index, line=sample.line, field="label")
        elif sample.label in self.classes:
            label = self.classes.index(sample.label)
        else:
            raise DataError(f"label '{sample.label}' is not a class of the training data ({len(self.classes)} "
                            "classes)", file=sample.file, index=sample.index, line=sample.line, field="label")
        return {"pixel_values": self.transform(image), "labels": label}


@dataclass
class LabelCollator:
    mixup: object = None  # timm.data.Mixup: soft targets (training batches only)

    def __call__(self, batch: list[dict]) -> dict:
        pixels = torch.stack([b["pixel_values"] for b in batch])
        labels = torch.tensor([b["labels"] for b in batch])
        if self.mixup is not None and len(batch) % 2 == 0:  # timm's Mixup pairs samples: an even batch
            pixels, labels = self.mixup(pixels, labels)
        return {"pixel_values": pixels, "labels": labels}


def transforms(model, augment: bool):
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=augment), create_transform(**cfg, is_training=False)


def mixup_for(mix, smoothing: float, n_classes: int):
    if not (mix.mixup_alpha or mix.cutmix_alpha):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=mix.mixup_alpha, cutmix_alpha=mix.cutmix_alpha, label_smoothing=smoothing,
                 num_classes=n_classes)


def build_data(config, family, model, processor) -> TaskData:
    mix, args = config.mix, config.training
    # the task applies label smoothing itself: the Trainer's own label smoother reads a transformers `model.config`
    smoothing, args.label_smoothing_factor = args.label_smoothing_factor, 0.0
    train = build_sample_split(config, "train", read_labels, None, "classification")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    classes = class_names(model, train)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.num_classes != len(classes):
        if mix.lora:
            raise ConfigError(f"the checkpoint has {base.num_classes} classes, the data {len(classes)}: a new head "
                              "cannot start under LoRA; train fully, or add the head to lora_modules_to_save",
                              key="dataset.train")
        log.info("classifier head replaced: %d classes -> %d (%s)", base.num_classes, len(classes),
                 ", ".join(classes[:10]))
        base.reset_classifier(len(classes))
    train_transform, eval_transform = transforms(base, mix.augment)
    for part in train.parts:
        part.prepare = LabelPrep(train_transform, classes)
    evals = build_sample_split(config, "eval", read_labels, LabelPrep(eval_transform, classes), "classification")
    log.info("train images per epoch: %d, eval images: %d, classes: %d", len(train), len(evals) if evals else 0,
             len(classes))
    collator = LabelCollator(mixup_for(mix, smoothing, len(classes)))
    return TaskData(train=train, eval=eval_argument(evals), collator=collator,
                    trainer_class=ClassificationTrainer, compute_metrics=topk_accuracy,
                    skipped=train.skipped + (evals.skipped if evals is not None else []),
                    trainer_attrs={"class_names": classes, "label_names": ["labels"], "label_smoothing": smoothing,
                                   "eval_collator": LabelCollator()})


def topk_accuracy(prediction) -> dict[str, float]:
    logits, labels = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    top = np.argsort(-logits, axis=1)
    out = {"top1": float((top[:, 0] == labels).mean())}
    if logits.shape[1] > 5:
        out["top5"] = float((top[:, :5] == labels[:, None]).any(1).mean())
    return out


class ClassificationTrainer(MixTrainer):
    """Cross-entropy on the timm model's logits (soft targets under mixup); saves in timm's folder format."""
    class_names: list[str] = []
    eval_collator = None
    label_smoothing = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        labels = inputs["labels"]
        if labels.dim() == 2:  # mixup / cutmix soft targets (label smoothing folded in)
            loss = torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        return (loss, {"logits": logits}) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self.eval_collator or self.data_collator
        try:  # evaluation never mixes
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _save(self, output_dir: str | None = None, state_dict=None):
        from mixtune.models.timm_classifier import save_timm

        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "get_base_model"):  # LoRA: peft's adapter folder
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        config = getattr(model, "mixtune_timm_config", {})
        model_args = dict(config.get("model_args") or {}, num_classes=model.num_classes)
        save_timm(model, output_dir, self.class_names, model_args=model_args, state_dict=state_dict)
        torch.save(self.args, f"{output_dir}/training_args.bin")
