"""`task: dpo`: preference tuning of a chat VLM (typically the output of `mixtune train`) with TRL's DPOTrainer.

mixtune supplies the data (data/formats/preference.py), the prompt rendering and labels (each pair is encoded
twice, prompt + chosen and prompt + rejected, by the same family encoder SFT uses, so the prompt the model
is tuned on is the prompt it was fine-tuned and is asked with), freezing and LoRA (train/run.py), the
reference model, and metrics.json / the loss figure. TRL supplies the loss (`trl: {loss_type: ...}`, any of
DPOConfig's), the reference log-probabilities and the logged rewards, margins and accuracies.

The reference is a frozen copy of the starting model; under `lora: true` it is the same model with its
adapters disabled (no copy). TRL 1.16 has SimPO and ORPO only in its experimental, text-only CPO/ORPO
trainers, so they are refused here rather than run without images.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial

from mixtune.data.collate import PadCollator
from mixtune.data.dataset import ImagePrep
from mixtune.data.encode import IGNORE_INDEX, encode_with_processor
from mixtune.data.formats import get_reader
from mixtune.data.templates import make_renderer
from mixtune.errors import ConfigError
from mixtune.tasks import TaskData
from mixtune.tasks.chat import load  # noqa: F401  (a DPO run loads its checkpoint as chat SFT does)
from mixtune.tasks.samples import build_sample_split, eval_argument
from mixtune.tasks.trl_bridge import import_trl, mix_with, stand_in, trl_args

log = logging.getLogger("mixtune")

# DPOConfig.loss_type's values in TRL 1.16 (several may be combined, weighted by `loss_weights`)
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
TEXT_ONLY_IN_TRL = {"simpo": "CPOTrainer (loss_type simpo)", "cpo": "CPOTrainer", "orpo": "ORPOTrainer"}
# DPOConfig keys mixtune decides: its encoder drops over-long pairs whole (never cuts through image tokens)
MANAGED = {"max_length": None, "pad_to_multiple_of": None, "precompute_ref_log_probs": False}


def check_loss_types(options: dict) -> None:
    value = options.get("loss_type", "sigmoid")
    for name in value if isinstance(value, list) else [value]:
        if name in TEXT_ONLY_IN_TRL:
            raise ConfigError(f"'{name}': TRL has it only in its experimental {TEXT_ONLY_IN_TRL[name]}, which takes "
                              f"no images; for VLMs choose one of DPOTrainer's: {', '.join(LOSS_TYPES)}",
                              key="trl.loss_type")
        if name not in LOSS_TYPES:
            raise ConfigError(f"unknown loss_type '{name}'; TRL's DPOTrainer has {', '.join(LOSS_TYPES)}",
                              key="trl.loss_type")


@dataclass
class ReplyEncoding:
    """A prompt plus one reply, encoded as SFT encodes a conversation (labels on the reply and its end-of-turn
    marker only): what the preference tasks (dpo, kto) share."""
    family: object
    processor: object
    render: object
    images: ImagePrep

    def media(self, prompt) -> list:
        return [self.images.fit(m) for m in self.images.decode(prompt)]

    def encode(self, conversation, media: list):
        return (self.family.encode or encode_with_processor)(conversation, media, self.processor, self.render)


class PairEncoder(ReplyEncoding):
    """A preference pair -> {"chosen": Encoded, "rejected": Encoded}, the prompt's media decoded once."""

    def __call__(self, pair) -> dict:
        media = self.media(pair.prompt)
        return {side: self.encode(pair.conversation(getattr(pair, side)), media) for side in ("chosen", "rejected")}


def read_pairs(entry, bad, encoder: PairEncoder, max_length: int) -> list:
    """The entry's pairs, each encoded once up front: a pair whose longer side exceeds max_length is dropped
    whole and reported (as SFT drops over-long samples), a pair that fails to encode is a bad sample."""
    kept = []
    for pair in get_reader(entry.name)(entry, bad):
        with bad.catch():
            enc = encoder(pair)
            n = max(len(enc["chosen"]), len(enc["rejected"]))
            if n > max_length:
                bad.drop_too_long(pair.prompt.error(f"{n} tokens (image tokens included) > max_length {max_length}"))
            else:
                kept.append(pair)
    return kept


@dataclass
class PairCollator:
    """Pairs -> one batch of the chosen rows followed by the rejected rows (TRL's layout), with TRL's
    `completion_mask` where mixtune's encoder put labels."""
    pad: PadCollator

    def __call__(self, pairs: list[dict]) -> dict:
        batch = self.pad([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
        batch["completion_mask"] = (batch.pop("labels") != IGNORE_INDEX).long()
        return batch


def build_data(config, family, model, processor) -> TaskData:
    import_trl()
    options = dict(config.mix.trl)
    check_loss_types(options)
    if not family.uses_chat_template:
        raise ConfigError(f"the {family.name} family has no chat template to render preference pairs with",
                          key="task")
    render = make_renderer(processor, None, family.image_placeholder, family.default_chat_template)
    encoder = PairEncoder(family, processor, render, ImagePrep())
    read = partial(read_pairs, encoder=encoder, max_length=config.mix.max_length)
    train = build_sample_split(config, "train", read, encoder, "dpo", reads="preference")
    evals = build_sample_split(config, "eval", read, encoder, "dpo", reads="preference")
    if train is None:
        raise ConfigError("has no entries", key="dataset.train")
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = PairCollator(PadCollator(pad_id, family.collate_media))
    skipped = train.skipped + (evals.skipped if evals is not None else [])
    return TaskData(train=train, eval=eval_argument(evals), collator=collator, skipped=skipped,
                    trainer_class=dpo_trainer_class(options))


def reference_copy(model):
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref.eval()


def dpo_trainer_class(options: dict):
    trl = import_trl()
    from accelerate.utils import is_peft_model

    class DPOTaskTrainer(mix_with(trl.DPOTrainer)):
        def __init__(self, *, model, args, train_dataset, eval_dataset=None, data_collator=None,
                     processing_class=None, compute_metrics=None, callbacks=None):
            peft = is_peft_model(model)
            super().__init__(model=model, ref_model=None if peft else reference_copy(model),
                             args=trl_args(args, trl.DPOConfig, options, MANAGED), data_collator=data_collator,
                             train_dataset=stand_in({"images": [], "prompt": "", "chosen": "", "rejected": ""}),
                             eval_dataset=eval_dataset, processing_class=processing_class,
                             compute_metrics=compute_metrics, callbacks=callbacks)
            self.train_dataset = train_dataset
            if peft and "ref" in self.model.peft_config:
                # TRL copies the adapter as "ref" for a model that arrives wrapped; ours are fresh (zero B), so the
                # copy equals the disabled adapter, which TRL then uses instead: one adapter's memory saved
                self.model.delete_adapter("ref")
                self.model.set_adapter("default")

    return DPOTaskTrainer
