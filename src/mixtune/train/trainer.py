"""mixtune's Trainer: transformers' own, with seven changes.

1. Resume repair. transformers 5 saves checkpoints of several VLM families (Qwen2-VL among them) under their original
hub key names (`visual.*`, `model.layers.*`) while the live model uses `model.visual.*`,
`model.language_model.*`. The stock resume path loads the raw state dict non-strictly, so resuming
silently keeps the *untrained* weights. Loading through `from_pretrained` applies the key conversion;
we then copy the weights in strictly, so any mismatch is an error instead of lost training.
2. With several eval entries, the overall `eval_loss` beside each entry's.
3. `group_by_length` from the lengths our datasets measured before training.
4. Per-part learning rates (train/optim.py) when `part_rates` is set.
5. A finished run resumed (its final save was killed) trains nothing: transformers would run one step past
`max_steps` (with a zero learning rate) before checking it, and save checkpoint-(N+1).
6. Crash-safe checkpoints: the stock save runs into a staging folder (through `_get_output_dir`), which is then
fsynced, marked complete and renamed into place (train/checkpoints.py); rotation counts complete checkpoints
only and keeps the one just saved; a save that cannot be written (full disk, folder not writable) is one
OutputDirError naming the path, what was being written and the last complete checkpoint.
7. Throughput: the train batches carry the token counts of their samples (train/throughput.py), taken off
in `training_step` before the model sees them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mixtune.errors import MixtuneError
from mixtune.train.checkpoints import (clear, commit_checkpoint, is_write_failure, newest_complete_checkpoint,
                                       rotate_checkpoints, staging_dir, write_failure)

log = logging.getLogger("mixtune")


class MixTrainer(Trainer):
    _staging = False  # True while the stock _save_checkpoint runs: its run_dir is then the staging folder
    part_rates = None  # train.optim.PartRates: vision_lr / projector_lr / language_lr
    labelled_logits_only = False  # train/loss.py: logits and loss only where the next token has a label
    throughput = None  # train/throughput.py: the counts of the batches this process trained

    def get_train_dataloader(self):
        from mixtune.train.throughput import CountingCollator, Throughput, reset_peak_memory

        self.throughput = Throughput()
        reset_peak_memory()  # the GPU peak of training, not of loading
        capacity = getattr(self.train_dataset, "max_length", None)  # a MixToken PackedDataset's rows
        collate, self.data_collator = self.data_collator, CountingCollator(self.data_collator, capacity)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collate

    def training_step(self, model, inputs, num_items_in_batch=None):
        from mixtune.train.throughput import COUNT_KEY

        if self.throughput is not None:
            self.throughput.take(inputs)
        if isinstance(inputs, dict):
            inputs.pop(COUNT_KEY, None)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # not eval (it keeps the logits), nor a loss that reads full logits (label smoothing, compute_loss_func)
        if self.labelled_logits_only and not return_outputs and "labels" in inputs and \
                self.label_smoother is None and self.compute_loss_func is None:
            from mixtune.train.loss import keep_labelled_positions

            inputs = keep_labelled_positions(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.part_rates is not None:
            from mixtune.train.optim import create_part_optimizer

            self.optimizer = create_part_optimizer(self, self.model if model is None else model, self.part_rates)
        return super().create_optimizer(model)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        full_weights = os.path.isfile(os.path.join(resume_from_checkpoint, "config.json")) and any(
            f.startswith("model") and f.endswith(".safetensors") for f in os.listdir(resume_from_checkpoint))
        if not full_weights or self.is_fsdp_enabled or self.is_deepspeed_enabled or not hasattr(model,
                                                                                                  "from_pretrained"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """With several eval entries the Trainer reports `eval_<name>_loss` for each; add the overall
        `eval_loss`: the per-entry losses weighted by sample count, which is the mean the Trainer would
        report over all their batches (it weights each batch's loss by its size)."""
        datasets = eval_dataset if eval_dataset is not None else self.eval_dataset
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if isinstance(datasets, dict):
            sizes = {name: len(ds) for name, ds in datasets.items() if len(ds)}
            overall = sum(metrics[f"{metric_key_prefix}_{name}_loss"] * n for name, n in sizes.items())
            metrics[f"{metric_key_prefix}_loss"] = overall / max(sum(sizes.values()), 1)
            self.log({f"{metric_key_prefix}_loss": metrics[f"{metric_key_prefix}_loss"]})
        return metrics

    def _get_train_sampler(self, train_dataset=None):
        # group_by_length: take the lengths our datasets measured before training instead of the Trainer
        # encoding every sample again (which it cannot do for our Encoded samples anyway)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths())
        from mixtune.data.pack import PackedDataset

        if isinstance(dataset, PackedDataset) and self.args.train_sampling_strategy == "random":
            # MixToken rows: each step's rows balanced by token count across the data-parallel ranks
            from mixtune.data.balance import BalancedRowSampler

            return BalancedRowSampler(dataset, self.args.per_device_train_batch_size, max(1, self.args.world_size),
                                      self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def _run_epoch(self, *args, **kwargs):
        if self.state.max_steps > 0 and self.state.global_step >= self.state.max_steps:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return staging_dir(run_dir) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_dir(run_dir), name), os.path.join(run_dir, name)
        if self.args.should_save:
            clear(staged)  # what a killed save of this step left
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            with self.writing(f"{name}'s trainer state", staged):
                super()._save_checkpoint(model, trial)
            if self.state.best_model_checkpoint and os.path.abspath(self.state.best_model_checkpoint) == \
                    os.path.abspath(staged):  # the stock save named the staging path; it will live at `final`
                self.state.best_model_checkpoint = final
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                with self.writing(f"{name}'s completeness marker", staged):
                    commit_checkpoint(staged, final)
        except MixtuneError:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # frees the space a full disk needs back
            raise
        finally:
            self._staging = False
        if self.args.should_save:
            keep = {final, self.state.best_model_checkpoint}
            for path in rotate_checkpoints(run_dir, self.args.save_total_limit, keep):
                log.info("deleted %s (save_total_limit %d)", path, self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    # what each part of a save writes, so that a failed write says which part it was
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        with self.writing("the model weights, config and processor", output_dir or self.args.output_dir):
            super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        with self.writing("the optimizer and scheduler state", output_dir):
            super()._save_optimizer_and_scheduler(output_dir)

    def _save_rng_state(self, output_dir: str) -> None:
        with self.writing("the RNG state", output_dir):
            super()._save_rng_state(output_dir)

    @contextlib.contextmanager
    def writing(self, what: str, path: str):
        try:
            yield
        except MixtuneError:
            raise
        except Exception as e:
            if not is_write_failure(e, path):
                raise
            last = newest_complete_checkpoint(self.args.output_dir)[0] if os.path.isdir(self.args.output_dir) else None
            raise write_failure(what, path, e, last) from e

    def save_final(self, output_dir: str) -> list[str]:
        """The final model, processor and trainer state into output_dir, crash-safe (train/outdir.py); returns
        the names of the files written."""
        from mixtune.train.outdir import commit_final, final_staging

        staged = os.path.join(staging_dir(output_dir), "final")
        if self.args.should_save:
            with self.writing("the final model", staged):
                final_staging(output_dir)
        self.accelerator.wait_for_everyone()
        self.save_model(staged)
        names: list[str] = []
        if self.args.should_save:
            with self.writing("the final trainer state", staged):
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            with self.writing("the final model", output_dir):
                names = commit_final(staged, output_dir)
        self.accelerator.wait_for_everyone()
        return names
