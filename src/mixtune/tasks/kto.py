"""`task: kto`: tuning a chat VLM on single replies marked desirable or undesirable, with TRL's KTOTrainer.

mixtune supplies the data (data/formats/unpaired.py; paired preference data is split into a desirable and an
undesirable sample), the rendering and labels (each sample is prompt + reply encoded by the family encoder SFT
uses, labels on the reply only), the KL rows, freezing and LoRA (train/run.py), the reference model and
metrics.json / the loss figure. TRL supplies the loss (`trl: {loss_type: kto | apo_zero_unpaired, beta,
desirable_weight, undesirable_weight}`), the reference log-probabilities and the logged rewards and KL.

KTO's KL term is estimated on mismatched pairs: row i's prompt (its images included) followed by row i-1's
reply, cycled within the batch as TRL's own vision collator does. mixtune builds them from the encoded rows
(the prompt's tokens up to where its labels start, the other row's tokens from there), so they need no second
pass through the processor and the images of row i stay with row i.

The reference is a frozen copy of the starting model; under `lora: true` it is the same model with its
adapters disabled (no copy), as in `task: dpo`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from mixtune.data.collate import PadCollator, pad_stack
from mixtune.data.dataset import ImagePrep
from mixtune.data.encode import IGNORE_INDEX, Encoded, encode_with_processor
from mixtune.data.formats import get_reader
from mixtune.data.formats.unpaired import from_pairs
from mixtune.data.templates import make_renderer
from mixtune.errors import ConfigError
from mixtune.tasks import TaskData
from mixtune.tasks.chat import load  # noqa: F401  (a KTO run loads its checkpoint as chat SFT does)
from mixtune.tasks.dpo import reference_copy
from mixtune.tasks.samples import build_sample_split, eval_argument, reader_task
from mixtune.tasks.trl_bridge import import_trl, mix_with, stand_in, trl_args

log = logging.getLogger("mixtune")

LOSS_TYPES = ("kto", "apo_zero_unpaired")  # KTOConfig.loss_type's values in TRL 1.16
NO_KL = ("apo_zero_unpaired",)  # TRL estimates no KL term for these
# KTOConfig keys mixtune decides: its encoder drops over-long samples whole (never cuts through image tokens);
# TRL refuses precomputed reference log-probabilities for vision data
MANAGED = {"max_length": None, "pad_to_multiple_of": None, "precompute_ref_log_probs": False}
KL_TOKEN_FIELDS = ("token_type_ids", "mm_token_type_ids")  # the per-token inputs TRL takes a KL_ version of


def check_loss_type(options: dict) -> str:
    name = options.get("loss_type", "kto")
    if name not in LOSS_TYPES:
        raise ConfigError(f"unknown loss_type {name!r}; TRL's KTOTrainer has {', '.join(LOSS_TYPES)}",
                          key="trl.loss_type")
    return name


@dataclass
class ReplyEncoder:
    """An unpaired sample -> {"encoded": Encoded, "label": bool}: prompt + reply, encoded as SFT encodes a
    conversation (labels on the reply and its end-of-turn marker only)."""
    family: object
    processor: object
    render: object
    images: ImagePrep

    def __call__(self, sample) -> dict:
        media = [self.images.fit(m) for m in self.images.decode(sample.prompt)]
        encode = self.family.encode or encode_with_processor
        return {"encoded": encode(sample.conversation(), media, self.processor, self.render), "label": sample.label}


def read_samples(entry, bad, encoder: ReplyEncoder, max_length: int) -> list:
    """The entry's samples (a preference entry's pairs split in two), each encoded once up front: one over
    max_length is dropped whole and reported, one that fails to encode is a bad sample."""
    samples = get_reader(entry.name)(entry, bad)
    if reader_task(entry.name) == "preference":
        samples = from_pairs(samples)
    kept = []
    for sample in samples:
        with bad.catch():
            n = len(encoder(sample)["encoded"])
            if n > max_length:
                bad.drop_too_long(sample.prompt.error(f"{n} tokens (image tokens included) > max_length {max_length}"))
            else:
                kept.append(sample)
    return kept


def reply_start(e: Encoded) -> int:
    return int((e.labels != IGNORE_INDEX).nonzero()[0])


def mismatched(rows: list[Encoded]) -> list[Encoded]:
    """Row i's prompt followed by row i-1's reply (cycled), for KTO's KL estimate."""
    out = []
    for i, row in enumerate(rows):
        other = rows[i - 1]
        p, c = reply_start(row), reply_start(other)
        out.append(Encoded(
            input_ids=torch.cat([row.input_ids[:p], other.input_ids[c:]]),
            labels=torch.cat([torch.full((p,), IGNORE_INDEX, dtype=other.labels.dtype), other.labels[c:]]),
            token_fields={k: torch.cat([v[:p], other.token_fields[k][c:]]) for k, v in row.token_fields.items()}))
    return out


@dataclass
class UnpairedCollator:
    """Encoded samples -> one batch with TRL's `completion_mask` where mixtune's encoder put labels, the
    `label`s, and (for loss types with a KL term) the KL rows as `KL_input_ids` / `KL_attention_mask` /
    `KL_completion_mask`; the KL rows share the batch's images (row i's prompt keeps row i's images)."""
    pad: PadCollator
    kl: bool

    def __call__(self, samples: list[dict]) -> dict:
        rows = [s["encoded"] for s in samples]
        batch = self.pad(rows)
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        batch["label"] = torch.tensor([s["label"] for s in samples])
        if self.kl:
            kl_rows = mismatched(rows)
            length = max(len(e) for e in kl_rows)
            batch["KL_input_ids"] = pad_stack([e.input_ids for e in kl_rows], length, self.pad.pad_token_id)
            batch["KL_attention_mask"] = pad_stack([torch.ones_like(e.input_ids) for e in kl_rows], length, 0)
            batch["KL_completion_mask"] = (pad_stack([e.labels for e in kl_rows], length, IGNORE_INDEX)
                                           != IGNORE_INDEX).long()
            for key in rows[0].token_fields:
                if key not in KL_TOKEN_FIELDS:
                    raise ConfigError(f"this family's per-token input '{key}' has no KL version in TRL's "
                                      f"KTOTrainer; use trl: {{loss_type: apo_zero_unpaired}} (no KL term)",
                                      key="task")
                batch[f"KL_{key}"] = pad_stack([e.token_fields[key] for e in kl_rows], length, 0)
        return batch


def build_data(config, family, model, processor) -> TaskData:
    import_trl()
    options = dict(config.mix.trl)
    loss_type = check_loss_type(options)
    if not family.uses_chat_template:
        raise ConfigError(f"the {family.name} family has no chat template to render replies with", key="task")
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    encoder = ReplyEncoder(family, processor, render, ImagePrep())
    read = partial(read_samples, encoder=encoder, max_length=config.mix.max_length)
    kinds = ("unpaired", "preference")
    train = build_sample_split(config, "train", read, encoder, "kto", reads=kinds)
    evals = build_sample_split(config, "eval", read, encoder, "kto", reads=kinds)
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    kl = loss_type not in NO_KL
    if kl and config.training.per_device_train_batch_size < 2:
        raise ConfigError("KTO estimates its KL term from the other rows of a batch: use at least 2 (or "
                          "trl: {loss_type: apo_zero_unpaired})", key="per_device_train_batch_size")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = UnpairedCollator(PadCollator(pad_id, family.collate_media), kl)
    skipped = train.skipped + (evals.skipped if evals is not None else [])
    return TaskData(train=train, eval=eval_argument(evals), collator=collator, skipped=skipped,
                    trainer_class=kto_trainer_class(options))


def kto_trainer_class(options: dict):
    trl = import_trl()
    from accelerate.utils import is_peft_model

    class KTOTaskTrainer(mix_with(trl.KTOTrainer)):
        def __init__(self, *, model, args, train_dataset, eval_dataset=None, data_collator=None,
                     processing_class=None, compute_metrics=None, callbacks=None):
            peft = is_peft_model(model)
            sampling = args.train_sampling_strategy
            # TRL demands sequential sampling because its text path precomputes each KL reply from the
            # neighbouring rows of a fixed order; mixtune's collator builds them from whatever batch it is given,
            # so the user's sampling (shuffled by default) is restored once TRL has checked
            kto_args = trl_args(args, trl.KTOConfig, options, {**MANAGED, "train_sampling_strategy": "sequential"})
            super().__init__(model=model, ref_model=None if peft else reference_copy(model), args=kto_args,
                             data_collator=data_collator,
                             train_dataset=stand_in({"images": [], "prompt": "", "completion": "", "label": True}),
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks)
            self.args.train_sampling_strategy = sampling
            self.train_dataset = train_dataset
            if peft and "ref" in self.model.peft_config:  # as in tasks/dpo.py: the disabled adapter is the reference
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")

    return KTOTaskTrainer
