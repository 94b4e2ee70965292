"""The segmentation task: SAM (transformers' SamModel) on COCO instances (`name: coco_segmentation`, polygons
or RLE), one sample per object. Each object's prompt is drawn from its ground-truth mask: its box (`prompt: box`,
the default; jittered a little in training) or one point inside it (`prompt: point`). The loss is SAM's own
recipe on the mask decoder's output with BCE in place of its focal term: BCE + dice, plus the IoU head's
squared error against the mask's actual IoU. The image encoder is frozen by default (`freeze_exclude:
["vision_encoder.*"]` trains it; `lora: true` puts adapters on its attention and trains the mask decoder
fully). Evaluation: `eval_miou`,
the mean IoU of each object's predicted mask (at its image's size) with its ground truth, and `eval_loss`.
Checkpoints save in transformers' format (`SamModel.from_pretrained` + `SamProcessor`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mixtune.data import masks as mask_codec
from mixtune.data.formats.segmentation import MaskSample, read_coco_segmentation
from mixtune.data.images import load_image
from mixtune.errors import ConfigError, DataError
from mixtune.tasks import TaskData
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.train.trainer import MixTrainer

log = logging.getLogger("mixtune")
BOX_JITTER = 0.1  # training boxes move each edge by up to this share of the box side (SAM's recipe)


def jitter_box(box: list[float], width: int, height: int) -> list[float]:
    x0, y0, x1, y1 = box
    dx, dy = (x1 - x0) * BOX_JITTER, (y1 - y0) * BOX_JITTER
    noise = (torch.rand(4) * 2 - 1).tolist()
    return [min(max(x0 + noise[0] * dx, 0), width), min(max(y0 + noise[1] * dy, 0), height),
            min(max(x1 + noise[2] * dx, 0), width), min(max(y1 + noise[3] * dy, 0), height)]


def prompt_point(mask: np.ndarray, train: bool) -> list[float]:
    """A pixel centre inside the mask: a random one in training, else the one nearest the mask's centroid."""
    ys, xs = np.nonzero(mask)
    if train:
        i = int(torch.randint(len(xs), (1,)))
    else:
        i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return [float(xs[i]) + 0.5, float(ys[i]) + 0.5]


def padded_target(mask: np.ndarray, reshaped: tuple[int, int], pad: int) -> torch.Tensor:
    """The ground truth on the processor's padded input: resized with the image, then padded. The loss compares
    it with the predicted logits upscaled the way `post_process_masks` upscales them, so training sees the
    masks that evaluation scores. (Thresholding the mask at the decoder's quarter resolution instead loses
    object edges: a perfect low-resolution mask then scores mIoU 0.88 on the demo's 64-pixel shapes.)"""
    m = torch.from_numpy(mask).float()[None, None]
    if tuple(mask.shape) != tuple(reshaped):
        m = (F.interpolate(m, size=reshaped, mode="bilinear", align_corners=False) > 0.5).float()
    return F.pad(m, (0, pad - reshaped[1], 0, pad - reshaped[0]))[0, 0]


def upscale_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) low-resolution mask logits -> (B, H, W), bilinear as `SamImageProcessor.post_process_masks`."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


@dataclass
class MaskPrep:
    """Image -> pixel values, prompt -> SAM's coordinates, mask -> target on the padded input (picklable)."""
    processor: object
    train: bool

    def __call__(self, sample: MaskSample) -> dict:
        try:
            image = load_image(sample.image)
        except DataError as e:
            raise DataError(e.reason, file=sample.file, index=sample.index, field="image") from None
        if image.size != (sample.width, sample.height):
            raise DataError(f"the image is {image.size[0]}x{image.size[1]}, its record says {sample.width}x"
                            f"{sample.height}", file=sample.file, index=sample.index, field="images.width")
        mask = mask_codec.decode(sample.rle) if sample.rle is not None else None
        prompt = {}
        if sample.prompt == "point" and mask is not None:
            prompt = {"input_points": [[[prompt_point(mask, self.train)]]], "input_labels": [[[1]]]}
        else:
            box = jitter_box(sample.box, sample.width, sample.height) if self.train else sample.box
            prompt = {"input_boxes": [[box]]}
        enc = self.processor(images=image, return_tensors="pt", **prompt)
        item = {"pixel_values": enc["pixel_values"][0], "original_size": enc["original_sizes"][0],
                "reshaped_size": enc["reshaped_input_sizes"][0], "rle": sample.rle}
        for key in ("input_boxes", "input_points", "input_labels"):
            if key in enc:
                item[key] = enc[key][0].float() if key != "input_labels" else enc[key][0].long()
        if mask is not None:
            pad = self.processor.image_processor.pad_size["height"]
            item["target"] = padded_target(mask, tuple(item["reshaped_size"].tolist()), pad)
        return item


MODEL_INPUTS = ("pixel_values", "input_boxes", "input_points", "input_labels")


def collate_masks(items: list[dict]) -> dict:
    batch = {k: torch.stack([it[k] for it in items]) for k in (*MODEL_INPUTS, "original_size", "reshaped_size",
                                                               "target") if k in items[0]}
    batch["rle"] = [it["rle"] for it in items]
    return batch


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    return (1 - (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)).mean()


def mask_iou_of_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(1)
    target = target.flatten(1) > 0.5
    union = (pred | target).sum(1)
    return torch.where(union > 0, (pred & target).sum(1) / union.clamp(min=1), torch.ones_like(union).float())


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, iou_pred: torch.Tensor) -> torch.Tensor:
    """Pixel BCE + dice on one mask per prompt, plus the IoU head's squared error against the mask's IoU (as
    SAM trains it). SAM's paper weighs focal loss 20:1 against dice instead; on the tiny model that drove every
    mask to empty within an epoch (measured: mIoU 0.0 after 6 epochs, against 0.48 with BCE + dice).
    The decoder's low-resolution logits are upscaled to the target's (padded input) size first."""
    logits = upscale_logits(logits, tuple(target.shape[-2:]))
    bce = F.binary_cross_entropy_with_logits(logits, target)
    iou_head = F.mse_loss(iou_pred, mask_iou_of_logits(logits.detach(), target))
    return bce + dice_loss(logits, target) + iou_head


def model_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}


def load(mix, family, **_):
    from mixtune.models.loading import load_model_and_processor

    if mix.lora and not mix.lora_modules_to_save:
        mix.lora_modules_to_save = ["mask_decoder"]  # adapters on the image encoder, the decoder trained fully
    elif not mix.lora:  # the image encoder frozen by default; freeze_exclude: ["vision_encoder.*"] trains it
        mix.freeze_include = [*(mix.freeze_include or []), "vision_encoder.*"]
    _, model, processor = load_model_and_processor(mix.model_name_or_path, mix.attn_implementation)
    return model, processor


def check_prompts(train, evals) -> None:
    kinds = {s.prompt for ds in (train, evals) if ds is not None for part in ds.parts for s in part.samples}
    if len(kinds) > 1:  # SAM takes a box for every object of a batch or for none
        raise ConfigError(f"entries mix prompt kinds {sorted(kinds)}: use one for the whole run",
                          key="dataset.prompt")


def build_data(config, family, model, processor) -> TaskData:
    train = build_sample_split(config, "train", read_coco_segmentation, MaskPrep(processor, True),
                               "segmentation", reads="segmentation")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    evals = build_sample_split(config, "eval", read_coco_segmentation, MaskPrep(processor, False),
                               "segmentation", reads="segmentation")
    check_prompts(train, evals)
    log.info("train objects per epoch: %d, eval objects: %d", len(train), len(evals) if evals else 0)
    return TaskData(train=train, eval=eval_argument(evals), collator=collate_masks,
                    trainer_class=SegmentationTrainer,
                    skipped=train.skipped + (evals.skipped if evals is not None else []))


@torch.no_grad()
def predict_masks(model, image_processor, batch: dict) -> tuple[list[np.ndarray], list[float], torch.Tensor]:
    """One mask per prompt at its image's own size, the IoU head's score, and the low-resolution logits."""
    device = next(model.parameters()).device
    out = model(**model_inputs(batch, device), multimask_output=False)
    logits = out.pred_masks[:, 0, 0].float()
    full = image_processor.post_process_masks(list(out.pred_masks.float().cpu()),
                                              batch["original_size"], batch["reshaped_size"])
    masks = [m[0, 0].numpy() for m in full]
    return masks, out.iou_scores[:, 0, 0].float().cpu().tolist(), logits


def evaluate_masks(model, dataset, batch_size: int, image_processor) -> dict[str, float]:
    """Mean IoU of each object's mask with its ground truth (at image size), and the mean training loss."""
    model.eval()
    ious, losses = [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate_masks([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        masks, scores, logits = predict_masks(model, image_processor, batch)
        target = batch["target"].to(logits.device)
        losses.append(float(segmentation_loss(logits, target, torch.tensor(scores, device=logits.device)))
                      * len(masks))
        ious += [mask_codec.iou(m, mask_codec.decode(rle)) for m, rle in zip(masks, batch["rle"])]
    n = max(len(ious), 1)
    return {"miou": float(np.mean(ious)) if ious else 0.0, "loss": sum(losses) / n}


class SegmentationTrainer(MixTrainer):
    """SAM's mask loss on one mask per prompt; evaluation reports eval_miou and eval_loss."""

    def __init__(self, *args, processing_class=None, **kwargs):
        # transformers' Trainer reads `.tokenizer` of any processor it is given before training, and SAM's
        # processor has none: it gets the image processor, and saves write the whole SamProcessor (_save)
        self.mask_processor = processing_class
        super().__init__(*args, processing_class=getattr(processing_class, "image_processor", None), **kwargs)

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.mask_processor is not None and self.args.should_save:
            self.mask_processor.save_pretrained(output_dir or self.args.output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, multimask_output=False)
        logits = out.pred_masks[:, 0, 0]
        loss = segmentation_loss(logits, inputs["target"], out.iou_scores[:, 0, 0])
        return (loss, {"pred_masks": logits}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):  # several entries: each its own eval_<name>_miou
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        scores = evaluate_masks(self.model, dataset, self.args.per_device_eval_batch_size,
                                self.mask_processor.image_processor)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
