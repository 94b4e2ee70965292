"""The contrastive task: image-text pairs for CLIP-style dual encoders (CLIP's InfoNCE, SigLIP's sigmoid loss,
each the model's own `return_loss=True`), evaluated by zero-shot retrieval R@1/5/10 in both directions.

Pairs come from any reader that gives Conversations (coco_caption, a captions JSON/JSONL, hf image + caption
columns, chat data): the first image and the first assistant reply. Checkpoints save in transformers' format
(`from_pretrained` reloads them with the processor).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from mixtune.data.dataset import read_entry
from mixtune.data.images import load_image
from mixtune.errors import ConfigError, DataError
from mixtune.tasks import TaskData
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.train.trainer import MixTrainer

log = logging.getLogger("mixtune")
RECALL_AT = (1, 5, 10)


@dataclass
class PairSample:
    image: str  # path or data: URI
    text: str
    file: str | None = None
    index: int | None = None
    line: int | None = None


def pair_from_conversation(conv) -> PairSample:
    """A chat sample as a pair: its first image and its first assistant reply."""
    reply = next((t.text for t in conv.turns if t.role == "assistant"), None)
    if not conv.images:
        raise conv.error("a contrastive pair needs an image; the sample has none", "image")
    return PairSample(conv.images[0], reply.strip(), conv.file, conv.index, conv.line)


def read_pairs(entry, bad) -> list[PairSample]:
    pairs = []
    for conv in read_entry(entry, bad):
        with bad.catch():
            pairs.append(pair_from_conversation(conv))
    return pairs


@dataclass
class PairPrep:
    """Decodes a pair's image into pixel values (picklable for loader workers); text is tokenised per batch."""
    image_processor: object

    def __call__(self, pair: PairSample) -> dict:
        try:
            image = load_image(pair.image)
        except DataError as e:
            raise DataError(e.reason, file=pair.file, index=pair.index, line=pair.line, field="image") from None
        pixels = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixels, "text": pair.text, "image_key": pair.image}


@dataclass
class PairCollator:
    tokenizer: object
    max_length: int
    pad_to_max_length: bool  # SigLIP's text tower pools the last position: pad every text to max_length

    def __call__(self, batch: list[dict]) -> dict:
        text = self.tokenizer([b["text"] for b in batch], padding="max_length" if self.pad_to_max_length else True,
                              truncation=True, max_length=self.max_length, return_tensors="pt")
        out = {"input_ids": text["input_ids"], "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
               "return_loss": True}
        if not self.pad_to_max_length:  # SigLIP is trained without a text attention mask
            out["attention_mask"] = text["attention_mask"]
        return out


OPEN_CLIP_FAMILIES = ("open_clip", "coca")


def load(mix, family):
    from mixtune.models.loading import load_model_and_processor

    if family.name in OPEN_CLIP_FAMILIES:
        from mixtune.models.open_clip_family import load_open_clip

        if mix.lora and not family.supports_lora:
            # measured: under peft, the tiny CoCa's loss intermittently explodes (1e18+, infinite gradients)
            raise ConfigError(f"LoRA on {family.name} is not supported yet; train it fully (freeze_vision / "
                              "freeze_text to train fewer weights)", key="lora")
        family.check_requires()
        return load_open_clip(mix.model_name_or_path)

    _, model, processor = load_model_and_processor(mix.model_name_or_path, mix.attn_implementation,
                                                   tp_size=mix.tensor_parallel_degree)
    return model, processor


def text_max_length(model, mix) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "model_cfg"):  # open_clip: a fixed context length
        return base.model_cfg["text_cfg"].get("context_length", 77)
    return min(mix.max_length, base.config.text_config.max_position_embeddings)


def build_data(config, family, model, processor) -> TaskData:
    prep = PairPrep(processor.image_processor)
    train = build_sample_split(config, "train", read_pairs, prep, "contrastive")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    raw_eval = config.mix.dataset.get("eval") or []
    labelled = [e for e in raw_eval if isinstance(e, dict) and e.get("name") in LABEL_READERS]
    evals = build_sample_split(config, "eval", read_pairs, prep, "contrastive",
                               raw=[e for e in raw_eval if not any(e is x for x in labelled)])
    zero_shot = zero_shot_sets(config, labelled, processor.image_processor)
    if zero_shot and evals is None:
        raise ConfigError("zero-shot classification entries (imagefolder, image_label) are evaluated beside image-text "
                          "pairs: add a pair entry (e.g. coco_caption) to dataset.eval", key="dataset.eval")
    log.info("train pairs per epoch: %d, eval pairs: %d, zero-shot classification sets: %d", len(train),
             len(evals) if evals else 0, len(zero_shot))
    # SigLIP pools the last position and open_clip uses a fixed context: texts padded to the full length
    collator = PairCollator(processor.tokenizer, text_max_length(model, config.mix),
                            family.name in ("siglip", *OPEN_CLIP_FAMILIES))
    return TaskData(train=train, eval=eval_argument(evals), collator=collator, trainer_class=ContrastiveTrainer,
                    skipped=train.skipped + (evals.skipped if evals is not None else []),
                    trainer_attrs={"zero_shot": zero_shot})


LABEL_READERS = ("imagefolder", "image_label", "hf_label")
ZERO_SHOT_PROMPT = "a photo of a {label}."


@dataclass
class ZeroShotSet:
    """Labelled eval images, classified by the text embedding of `template` filled with each class name."""
    name: str
    dataset: object  # SampleList of LabelSample, prepared as {"pixel_values", "label"}
    template: str
    classes: list[str]


@dataclass
class LabelledImagePrep:
    image_processor: object

    def __call__(self, sample) -> dict:
        pixels = PairPrep(self.image_processor)(PairSample(sample.image, "", sample.file, sample.index, sample.line))
        return {"pixel_values": pixels["pixel_values"], "label": str(sample.label)}


def zero_shot_sets(config, raw: list, image_processor) -> list[ZeroShotSet]:
    from mixtune.data.dataset import parse_entries
    from mixtune.data.formats import get_reader

    if not raw:
        return []
    mixed = build_sample_split(config, "eval", lambda e, bad: get_reader(e.name)(e, bad),
                               LabelledImagePrep(image_processor), "classification", raw=raw)
    entries = parse_entries(raw, "eval", config.base_dir)
    out = []
    for entry, part in zip(entries, mixed.parts):
        template = entry.prompt or ZERO_SHOT_PROMPT
        if "{label}" not in template:
            raise ConfigError("a zero-shot prompt template must contain '{label}'", key="dataset.eval.prompt")
        classes = sorted({str(s.label) for s in part.samples})
        out.append(ZeroShotSet(part.name, part, template, classes))
    return out


@torch.no_grad()
def zero_shot_top1(model, collator, zero_shot: ZeroShotSet, batch_size: int = 32) -> float:
    """The share of images whose most similar class prompt is their own class."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [zero_shot.template.replace("{label}", c) for c in zero_shot.classes]
    text = collator.tokenizer(prompts, padding="max_length" if collator.pad_to_max_length else True,
                              truncation=True, max_length=collator.max_length, return_tensors="pt")
    correct = 0
    for start in range(0, len(zero_shot.dataset), batch_size):
        items = [zero_shot.dataset[i] for i in range(start, min(start + batch_size, len(zero_shot.dataset)))]
        inputs = {"input_ids": text["input_ids"].to(device), "return_loss": False,
                  "pixel_values": torch.stack([it["pixel_values"] for it in items]).to(device)}
        if not collator.pad_to_max_length:
            inputs["attention_mask"] = text["attention_mask"].to(device)
        best = model(**inputs).logits_per_image.argmax(-1).cpu()
        correct += sum(zero_shot.classes[int(b)] == it["label"] for b, it in zip(best, items))
    return correct / max(len(zero_shot.dataset), 1)


@torch.no_grad()
def embed(model, dataset, collator, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Normalised text and image embeddings of every pair, and each pair's image key."""
    model.eval()
    texts, images, keys = [], [], []
    device = next(model.parameters()).device
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(items).items()}
        batch["return_loss"] = False
        out = model(**batch)
        texts.append(torch.nn.functional.normalize(out.text_embeds.float(), dim=-1).cpu())
        images.append(torch.nn.functional.normalize(out.image_embeds.float(), dim=-1).cpu())
        keys += [item["image_key"] for item in items]
    return torch.cat(texts), torch.cat(images), keys


def retrieval_recall(text_emb: torch.Tensor, image_emb: torch.Tensor, keys: list[str]) -> dict[str, float]:
    """Recall@k text->image and image->text over the distinct images (captions of one image all count)."""
    unique = list(dict.fromkeys(keys))
    first = {k: keys.index(k) for k in unique}
    images = image_emb[[first[k] for k in unique]]
    target = torch.tensor([unique.index(k) for k in keys])
    sim = text_emb @ images.T  # texts x images
    # text->image: the rank of the text's own image
    t2i_rank = (sim > sim[torch.arange(len(keys)), target][:, None]).sum(1)
    # image->text: the best rank among the image's texts
    order = sim.T.argsort(dim=1, descending=True)
    owner = target[order]  # the image each ranked text belongs to
    i2t_rank = (owner == torch.arange(len(unique))[:, None]).float().argmax(1)
    out = {}
    for k in RECALL_AT:
        out[f"t2i_r{k}"] = (t2i_rank < k).float().mean().item()
        out[f"i2t_r{k}"] = (i2t_rank < k).float().mean().item()
    return out


def pair_loss(logits_per_text: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """CLIP's InfoNCE (both directions) or SigLIP's pairwise sigmoid loss, as transformers computes them."""
    if sigmoid:
        signs = 2 * torch.eye(len(logits_per_text), device=logits_per_text.device) - 1
        return -torch.nn.functional.logsigmoid(signs * logits_per_text).sum(-1).mean()
    target = torch.arange(len(logits_per_text), device=logits_per_text.device)
    return (torch.nn.functional.cross_entropy(logits_per_text, target) +
            torch.nn.functional.cross_entropy(logits_per_text.T, target)) / 2


def gathered_pair_loss(model, base, inputs: dict) -> torch.Tensor:
    """The loss over every rank's pairs: embeddings gathered with their gradient (each rank's pairs meet every
    rank's negatives). Each rank computes the same global loss; all_gather's backward sums the ranks'
    gradients into each rank's own embeddings, and data parallel's mean then gives the one-process gradient."""
    from torch.distributed.nn.functional import all_gather

    out = model(**{**inputs, "return_loss": False})
    text, image = torch.cat(all_gather(out.text_embeds)), torch.cat(all_gather(out.image_embeds))
    logits = text @ image.T * base.logit_scale.exp()
    bias = getattr(base, "logit_bias", None)  # SigLIP
    return pair_loss(logits + bias if bias is not None else logits, sigmoid=bias is not None)


class ContrastiveTrainer(MixTrainer):
    """The model's own contrastive loss (across ranks when data parallel); evaluation adds zero-shot retrieval
    recall (eval_t2i_r1, ...)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.world_size <= 1 or return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        base = self.accelerator.unwrap_model(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        return gathered_pair_loss(model, base, inputs)

    zero_shot: list = []  # ZeroShotSet per labelled eval entry

    def _open_clip(self):
        from mixtune.models.open_clip_family import OpenClipForTraining

        model = self.accelerator.unwrap_model(self.model)
        return model if isinstance(model, OpenClipForTraining) else None

    def _save(self, output_dir: str | None = None, state_dict=None):
        model = self._open_clip()
        if model is None:  # transformers' save_pretrained (peft's adapter folder under LoRA)
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        model.save(output_dir, state_dict)  # open_clip's own folder format
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from mixtune.models.open_clip_family import WEIGHTS_NAME

        target = self._open_clip()
        if target is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        target.model.load_state_dict(load_file(os.path.join(resume_from_checkpoint, WEIGHTS_NAME)), strict=True)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if eval_dataset is None and self.zero_shot:  # the top-level call (entries come back through here too)
            scores = {f"{metric_key_prefix}_zeroshot_{z.name}_top1": zero_shot_top1(self.model, self.data_collator, z)
                      for z in self.zero_shot}
            self.log(scores)
            metrics.update(scores)
        if isinstance(dataset, dict):  # the Trainer evaluated each entry through this method
            return metrics
        recall = retrieval_recall(*embed(self.model, dataset, self.data_collator,
                                         self.args.per_device_eval_batch_size))
        recall = {f"{metric_key_prefix}_{k}": v for k, v in recall.items()}
        self.log(recall)
        metrics.update(recall)
        return metrics
