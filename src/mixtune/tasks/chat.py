"""The chat task (supervised fine-tuning of chat VLMs): conversations rendered with the family's template,
labels on the assistant replies, padded or MixToken-packed batches, the model's own LM loss."""

from __future__ import annotations

import logging

import torch

from mixtune.data.collate import PadCollator
from mixtune.data.dataset import ENTRY_DEFAULT_KEYS, build_split
from mixtune.data.pack import pack_for_training
from mixtune.data.templates import save_with_model, training_chat_template
from mixtune.errors import ConfigError
from mixtune.tasks import TaskData

log = logging.getLogger("mixtune")


def load(mix, family, quantization=None):
    from mixtune.models.loading import load_model_and_processor

    _, model, processor = load_model_and_processor(mix.model_name_or_path, mix.attn_implementation,
                                                   tp_size=mix.tensor_parallel_degree, quantization=quantization)
    return model, processor


def save_training_template(processor, parts) -> None:
    """The chat template training rendered with is the one saved with the model (a dataset entry's
    `chat_template` replaces the checkpoint's)."""
    template = training_chat_template(parts)
    if template is not None and template != getattr(processor, "chat_template", None):
        save_with_model(processor, template)
        log.info("the model is saved with the chat template training used")


def data_options(config) -> dict:
    mix, args = config.mix, config.training
    seed = args.data_seed if args.data_seed is not None else args.seed
    return dict(seed=seed, cache_dir=mix.data_cache_dir, num_workers=args.dataloader_num_workers,
                defaults={k: getattr(mix, k) for k in ENTRY_DEFAULT_KEYS})


def build_data(config, family, model, processor) -> TaskData:
    from mixtune.infer.generate_eval import generation_eval_callbacks

    from mixtune.data.dataset import parse_entries
    from mixtune.tasks.samples import reader_task

    mix, args = config.mix, config.training
    data_opts = data_options(config)
    for split in ("train", "eval"):
        for i, entry in enumerate(parse_entries(mix.dataset.get(split) or [], split, config.base_dir)):
            if reader_task(entry.name) != "chat":
                raise ConfigError(f"'{entry.name}' data is for the {reader_task(entry.name)} task, not chat",
                                  key=f"dataset.{split}[{i}].name")
    train_set = build_split(mix.dataset.get("train"), "train", processor, family, mix.max_length, config.base_dir,
                            **data_opts)
    eval_set = build_split(mix.dataset.get("eval"), "eval", processor, family, mix.max_length, config.base_dir,
                           **data_opts)
    if train_set is None:
        raise ConfigError("has no entries", key="dataset.train")
    save_training_template(processor, train_set.parts + (eval_set.parts if eval_set is not None else []))
    log.info("train samples per epoch: %d, eval samples: %d", len(train_set), len(eval_set) if eval_set else 0)
    skipped = train_set.skipped + (eval_set.skipped if eval_set is not None else [])
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    collator = PadCollator(pad_id, family.collate_media)
    if mix.mixtoken:  # eval batches stay padded (the PadCollator above); train batches are packed rows
        train_set, collator = pack_for_training(train_set, family, model, pad_id, mix.max_length, data_opts["seed"],
                                                on_gpu=torch.cuda.is_available() and not args.use_cpu,
                                                unpacked=collator)
    # several eval entries: the Trainer reports eval_<name>_loss for each, MixTrainer adds the overall eval_loss
    eval_arg = eval_set.by_entry() if eval_set is not None and len(eval_set.parts) > 1 else eval_set
    return TaskData(train=train_set, eval=eval_arg, collator=collator, skipped=skipped,
                    callbacks=generation_eval_callbacks(config, family, processor))
