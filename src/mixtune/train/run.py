"""`mixtune train`: config -> model, processor, datasets -> transformers' Trainer -> saved checkpoint."""

from __future__ import annotations

import contextlib
import logging
import os

from mixtune.config import Config
from mixtune.data.badsamples import summary as skip_summary
from mixtune.data.badsamples import write_report
from mixtune.data.mix import check_persistent_workers, epoch_callback
from mixtune.errors import ConfigError
from mixtune.paddle_compat import read_as_paddlemix, with_paddle_name_hint
from mixtune.train.checkpoints import STAGING, incomplete_reason, newest_complete_checkpoint, recover_staged
from mixtune.train.distributed import is_main_process, join_deepspeed, main_process_first, split_parameters
from mixtune.train.freeze import apply_freeze, requested_parts, trainable_summary
from mixtune.train.lock import LOCK_NAME, OutputLock
from mixtune.train.loss import accepts_logits_to_keep as labelled_logits_supported
from mixtune.train.optim import PartRates
from mixtune.train.qlora import quantization_kwargs
from mixtune.train.recompute import apply_recompute
from mixtune.train.outdir import mark_final_complete, start_fresh
from mixtune.train.report import plot_loss, write_metrics
from mixtune.train.throughput import describe, flops_per_token, throughput_metrics
from mixtune.train.seed import seed_everything

log = logging.getLogger("mixtune")


def check_output_dir(config: Config) -> None:
    out = config.training.output_dir
    resume = config.training.resume_from_checkpoint
    if config.overwrite_output_dir and resume and (resume in ("true", "True", True) or os.path.abspath(
            resume).startswith(os.path.abspath(out) + os.sep)):
        raise ConfigError("overwrite_output_dir: true starts a fresh run and deletes the checkpoints in "
                          f"{out}; resume_from_checkpoint continues one of them: set only one", key="output_dir")
    ours = {LOCK_NAME, STAGING}  # this run's lock; unfinished saves, cleaned at the start
    used = os.path.isdir(out) and set(os.listdir(out)) - ours
    if used and not config.overwrite_output_dir and not resume:
        raise ConfigError(f"output folder {out} is not empty; set overwrite_output_dir: true to write into it, "
                          "or resume_from_checkpoint to continue a run", key="output_dir")


def prepare_output_dir(config: Config) -> None:
    """Main process, lock held: a fresh start for overwrite_output_dir; checkpoints a kill left staged."""
    out = config.training.output_dir
    if config.overwrite_output_dir:
        start_fresh(out)
    recover_staged(out)


def resolve_resume(config: Config) -> str | None:
    """The checkpoint to resume from: the newest *complete* one for `true` (naming those skipped and why), or
    the given folder if complete; never a half-written one."""
    resume, out = config.training.resume_from_checkpoint, config.training.output_dir
    if resume in ("true", "True", True):
        last, skipped = newest_complete_checkpoint(out)
        for path, reason in skipped:
            log.warning("not resuming from %s: %s", path, reason)
        if last is None:
            why = f" (skipped as incomplete: {', '.join(os.path.basename(p) for p, _ in skipped)})" if skipped else ""
            raise ConfigError(f"no complete checkpoint-* folder in {out} to resume from{why}; start a new run "
                              "without resume_from_checkpoint", key="resume_from_checkpoint")
        log.info("resuming from %s, the newest complete checkpoint", last)
        return last
    if resume and not os.path.isdir(resume):
        raise ConfigError(f"checkpoint folder not found: {resume}", key="resume_from_checkpoint")
    if resume:
        reason = incomplete_reason(resume)
        if reason is not None:
            raise ConfigError(f"checkpoint {resume} is incomplete ({reason}); resume from a complete one, e.g. "
                              "resume_from_checkpoint: true picks the newest", key="resume_from_checkpoint")
        log.info("resuming from %s", resume)
    return resume or None


def build_trainer(config: Config):
    """Shared by every task (mixtune/tasks/): load, freeze or LoRA, the task's data, the Trainer."""
    from mixtune.models.registry import family_for_checkpoint
    from mixtune.tasks import get_task, task_name
    from mixtune.train.trainer import MixTrainer

    mix, args = config.mix, config.training
    family = family_for_checkpoint(mix.model_name_or_path)
    task = get_task(task_name(mix, family))
    seed_everything(args)  # before loading and LoRA create anything random (the Trainer seeds only later)
    join_deepspeed(args)  # before loading: ZeRO-3 partitions the weights as they load
    model, processor = task.load(mix, family, **quantization_kwargs(mix, args, task))
    if mix.tensor_parallel_degree > 1:
        log.info("tensor parallel: %d of %d weight tensors split across %d ranks", *split_parameters(model),
                 mix.tensor_parallel_degree)
    for note in config.notes + read_as_paddlemix(model, family, mix):
        log.info("config: %s", note)
    try:
        if mix.lora:  # peft freezes the base; the freeze globs then apply over the same names (train/lora.py)
            from mixtune.train.lora import apply_lora

            # again: loading may have drawn random numbers (missing weights, ZeRO-3 init), and the adapters'
            # init must be the same in every run and on every rank
            seed_everything(args)
            model = apply_lora(model, family, mix)
        else:
            apply_freeze(model, mix.freeze_include, mix.freeze_exclude, family, requested_parts(mix, family))
    except ConfigError as e:  # a pattern written for PaddleMIX's module names: add the translation
        raise with_paddle_name_hint(e, model, family, mix) from None
    summary = trainable_summary(model.get_base_model() if mix.lora else model)
    log.info("model family %s (%s), task %s\n%s", family.name, getattr(getattr(model, "config", None), "model_type",
             family.name), task.__name__.rsplit(".", 1)[-1], summary)
    with main_process_first():  # the main process scans and caches lengths; the others read its cache
        data = task.build_data(config, family, model, processor)
    check_persistent_workers(args, data.train)
    # each epoch redraws a ratio mixture and, with MixToken, re-packs it (both through set_epoch)
    trainer = (data.trainer_class or MixTrainer)(
        model=model, args=args, train_dataset=data.train, eval_dataset=data.eval, data_collator=data.collator,
        processing_class=processor, compute_metrics=data.compute_metrics,
        callbacks=[epoch_callback(data.train), *data.callbacks])
    trainer.skipped_samples = data.skipped
    trainer.part_rates = PartRates.from_config(mix, family)
    for key, value in data.trainer_attrs.items():
        setattr(trainer, key, value)
    trainer.labelled_logits_only = mix.labelled_logits_only and labelled_logits_supported(model) and \
        not args.use_liger_kernel  # Liger's fused loss never materialises the logits (train/liger.py)
    trainer.flops_per_token = flops_per_token(model) if task.__name__.endswith(".chat") else None  # for MFU
    apply_recompute(trainer, family, mix.recompute_vision)
    return trainer


def train(config: Config) -> dict:
    main = is_main_process()
    with OutputLock(config.training.output_dir) if main else contextlib.nullcontext():  # released on errors too
        check_output_dir(config)  # after the lock: a folder in use is refused as such, not as "not empty"
        if main:
            prepare_output_dir(config)
        return train_in_output_dir(config, main)


def train_in_output_dir(config: Config, main: bool) -> dict:
    resume = resolve_resume(config) if main else None
    trainer = build_trainer(config)
    trainer.accelerator.wait_for_everyone()  # the main process has put staged checkpoints in place
    if not main:
        resume = resolve_resume(config)
    out = config.training.output_dir
    skipped_path = write_report(trainer.skipped_samples, out) if is_main_process() else None
    result = trainer.train(resume_from_checkpoint=resume)
    saved = trainer.save_final(out)  # model + processor (tokenizer, chat template) in plain transformers form
    final = dict(result.metrics)
    mfu_flops = getattr(trainer, "flops_per_token", None)
    final.update(throughput_metrics(trainer, final.get("train_runtime", 0), mfu_flops,
                                    config.training.bf16 or config.training.fp16))
    if config.mix.benchmark:
        log.info("benchmark: %.2f samples/s, %.2f steps/s, %.1f s", final.get("train_samples_per_second", 0),
                 final.get("train_steps_per_second", 0), final.get("train_runtime", 0))
    log.info("throughput: %s", describe(final))
    if trainer.eval_dataset is not None:
        final.update(trainer.evaluate())
    history = trainer.state.log_history
    if not is_main_process():  # the main process writes metrics and the report for every rank
        return final
    with trainer.writing("metrics.json and loss_curve.png", out):
        write_metrics(out, history, final)
        plot_loss(out, history)
        mark_final_complete(out, saved + ["metrics.json", "loss_curve.png"])  # last: all of it is in place
    if trainer.skipped_samples:
        log.warning("%s\nthe full list: %s", skip_summary(trainer.skipped_samples), skipped_path)
    log.info("saved model, processor and metrics to %s", out)
    return final
