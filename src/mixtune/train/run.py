"""`mixtune train`: config -> model, processor, datasets -> transformers' Trainer -> saved checkpoint."""

from __future__ import annotations

import logging
import os

import torch

from mixtune.config import Config
from mixtune.data.collate import PadCollator
from mixtune.data.badsamples import summary as skip_summary
from mixtune.data.badsamples import write_report
from mixtune.data.dataset import ENTRY_DEFAULT_KEYS, build_split
from mixtune.data.mix import epoch_callback
from mixtune.data.pack import pack_for_training
from mixtune.data.templates import save_with_model, training_chat_template
from mixtune.errors import ConfigError
from mixtune.infer.generate_eval import generation_eval_callbacks
from mixtune.models.loading import load_model_and_processor
from mixtune.train.distributed import is_main_process, join_deepspeed, main_process_first
from mixtune.paddle_compat import with_paddle_name_hint
from mixtune.train.freeze import PARTS, apply_freeze, trainable_summary
from mixtune.train.optim import PartRates
from mixtune.train.report import plot_loss, write_metrics

log = logging.getLogger("mixtune")


def check_output_dir(config: Config) -> None:
    out = config.training.output_dir
    resuming = bool(config.training.resume_from_checkpoint)
    if os.path.isdir(out) and os.listdir(out) and not config.overwrite_output_dir and not resuming:
        raise ConfigError(f"output folder {out} is not empty; set overwrite_output_dir: true to write into it, "
                          "or resume_from_checkpoint to continue a run", key="output_dir")


def resolve_resume(config: Config) -> str | bool | None:
    resume = config.training.resume_from_checkpoint
    if resume in ("true", "True", True):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(config.training.output_dir) if os.path.isdir(config.training.output_dir) else None
        if last is None:
            raise ConfigError(f"no checkpoint-* folder in {config.training.output_dir} to resume from",
                              key="resume_from_checkpoint")
        return last
    if resume and not os.path.isdir(resume):
        raise ConfigError(f"checkpoint folder not found: {resume}", key="resume_from_checkpoint")
    return resume or None


def save_training_template(processor, parts) -> None:
    """The chat template training rendered with is the one saved with the model (a dataset entry's
    `chat_template` replaces the checkpoint's)."""
    template = training_chat_template(parts)
    if template is not None and template != getattr(processor, "chat_template", None):
        save_with_model(processor, template)
        log.info("the model is saved with the chat template training used")


def build_trainer(config: Config):
    from mixtune.train.trainer import MixTrainer

    mix, args = config.mix, config.training
    join_deepspeed(args)  # before loading: ZeRO-3 partitions the weights as they load
    family, model, processor = load_model_and_processor(mix.model_name_or_path, mix.attn_implementation,
                                                        tp_size=mix.tensor_parallel_degree)
    for note in config.notes:
        log.info("config: %s", note)
    try:
        if mix.lora:  # peft freezes the base; the freeze globs then apply over the same names (train/lora.py)
            from transformers import set_seed

            from mixtune.train.lora import apply_lora

            set_seed(args.seed)  # the adapters' random init: the same in every run and on every rank
            model = apply_lora(model, family, mix)
        else:
            parts = tuple(p for p in PARTS if getattr(mix, f"freeze_{p}"))
            apply_freeze(model, mix.freeze_include, mix.freeze_exclude, family, parts)
    except ConfigError as e:  # a pattern written for PaddleMIX's module names: add the translation
        raise with_paddle_name_hint(e, model, family, mix) from None
    summary = trainable_summary(model.get_base_model() if mix.lora else model)
    log.info("model family %s (%s)\n%s", family.name, model.config.model_type, summary)
    seed = args.data_seed if args.data_seed is not None else args.seed
    data_opts = dict(seed=seed, cache_dir=mix.data_cache_dir,
                     num_workers=args.dataloader_num_workers,
                     defaults={k: getattr(mix, k) for k in ENTRY_DEFAULT_KEYS})
    with main_process_first():  # the main process scans and caches lengths; the others read its cache
        train_set = build_split(mix.dataset.get("train"), "train", processor, family, mix.max_length,
                                config.base_dir, **data_opts)
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
        train_set, collator = pack_for_training(train_set, family, model, pad_id, mix.max_length, seed,
                                                on_gpu=torch.cuda.is_available() and not args.use_cpu,
                                                unpacked=collator)
    # several eval entries: the Trainer reports eval_<name>_loss for each, MixTrainer adds the overall eval_loss
    eval_arg = eval_set.by_entry() if eval_set is not None and len(eval_set.parts) > 1 else eval_set
    # each epoch redraws a ratio mixture and, with MixToken, re-packs it (both through set_epoch)
    trainer = MixTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_arg,
                         data_collator=collator, processing_class=processor,
                         callbacks=[epoch_callback(train_set), *generation_eval_callbacks(config, family, processor)])
    trainer.skipped_samples = skipped
    trainer.part_rates = PartRates.from_config(mix, family)
    return trainer


def train(config: Config) -> dict:
    check_output_dir(config)
    resume = resolve_resume(config)
    trainer = build_trainer(config)
    out = config.training.output_dir
    skipped_path = write_report(trainer.skipped_samples, out) if is_main_process() else None
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(out)  # model + processor (tokenizer, chat template) in plain transformers form
    trainer.save_state()
    final = dict(result.metrics)
    if config.mix.benchmark:
        log.info("benchmark: %.2f samples/s, %.2f steps/s, %.1f s", final.get("train_samples_per_second", 0),
                 final.get("train_steps_per_second", 0), final.get("train_runtime", 0))
    if trainer.eval_dataset is not None:
        final.update(trainer.evaluate())
    history = trainer.state.log_history
    if not is_main_process():  # the main process writes metrics and the report for every rank
        return final
    write_metrics(out, history, final)
    plot_loss(out, history)
    if trainer.skipped_samples:
        log.warning("%s\nthe full list: %s", skip_summary(trainer.skipped_samples), skipped_path)
    log.info("saved model, processor and metrics to %s", out)
    return final
