"""`eval_with_do_generation: true`: at each evaluation the eval set is also answered by generation.

A Trainer callback: after the Trainer's own (loss) evaluation of an eval entry it answers that entry's
prompts through `mixtune predict`'s path (same prompts, batched greedy generation) and adds the scores to the
evaluation's metrics as `eval_exact_match`, `eval_vqa_accuracy`, ... (`eval_<entry>_<metric>` with several
eval entries). They are added to the very dict the Trainer then reads for `metric_for_best_model`, so
`load_best_model_at_end` can pick a checkpoint by them, and to the log history (metrics.json, the metrics
panel of loss_curve.png). Each evaluation's predictions go to `output_dir/generation_eval/step-N/`.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from mixtune.data.dataset import DatasetEntry, unique_names
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.metrics import METRICS
from mixtune.infer.predict import predict, read_prompts

log = logging.getLogger("mixtune")


class GenerationEvalCallback(TrainerCallback):
    def __init__(self, entries: list[DatasetEntry], family, processor, options: GenerationOptions,
                 batch_size: int, output_dir: str):
        names = unique_names([e.label() for e in entries])
        self.items = {name: read_prompts([entry]) for name, entry in zip(names, entries)}
        self.family, self.processor, self.options = family, processor, options
        self.batch_size, self.output_dir = batch_size, output_dir

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        prefix = loss_prefix(metrics or {})
        if prefix is None or model is None:
            return
        # one eval entry: prefix "eval"; several: the Trainer evaluates each as "eval_<name>"
        name = prefix[len("eval_"):] if prefix != "eval" else next(iter(self.items))
        if name not in self.items:
            return
        was_training = model.training
        engine = Engine(model, self.family, self.processor)
        out = os.path.join(self.output_dir, "generation_eval", f"step-{state.global_step}",
                           name if len(self.items) > 1 else "")
        summary = predict(engine, self.items[name], self.options, out, self.batch_size, progress=False)
        model.train(was_training)
        scores = {f"{prefix}_{k}": v for k, v in summary["metrics"].items() if k in METRICS}
        metrics.update(scores)  # the dict the Trainer reads for metric_for_best_model
        if args.should_log:
            state.log_history.append({**scores, "epoch": state.epoch, "step": state.global_step})
        log.info("generation eval at step %d: %s", state.global_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def loss_prefix(metrics: dict) -> str | None:
    """"eval" from eval_loss, "eval_val" from eval_val_loss: which evaluation this was."""
    keys = [k for k in metrics if k.endswith("_loss") and k.startswith("eval")]
    return keys[0][: -len("_loss")] if len(keys) == 1 else None


def generation_eval_callbacks(config, family, processor) -> list:
    """[the callback] when the config asks for generation eval, else []."""
    mix = config.mix
    if not mix.eval_with_do_generation:
        return []
    defaults = {"on_bad_sample": mix.on_bad_sample, "truncation": mix.truncation}
    entries = [DatasetEntry.from_config(raw, config.base_dir, f"dataset.eval[{i}]", defaults)
               for i, raw in enumerate(mix.dataset.get("eval") or [])]
    options = GenerationOptions(max_new_tokens=mix.generation_max_new_tokens).check()
    return [GenerationEvalCallback(entries, family, processor, options, config.training.per_device_eval_batch_size,
                                   config.training.output_dir)]
