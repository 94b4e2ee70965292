"""`eval_with_do_generation: true`: at each evaluation the eval set is also answered by generation.

A Trainer callback: after the Trainer's own (loss) evaluation of an eval entry it answers that entry's
prompts through `mixtune predict`'s path (same prompts, batched greedy generation) and adds the scores to the
evaluation's metrics as `eval_exact_match`, `eval_vqa_accuracy`, ... (`eval_<entry>_<metric>` with several
eval entries). They are added to the very dict the Trainer then reads for `metric_for_best_model`, so
`load_best_model_at_end` can pick a checkpoint by them, and to the log history (metrics.json, the metrics
panel of loss_curve.png). Each evaluation's predictions go to `output_dir/generation_eval/step-N/`.

With several processes (every rank runs this callback), the work is shared in one of two ways:
- parameters replicated (DDP, ZeRO-1/2): the prompts' batches (the very batches one process forms) are dealt
  out to the ranks, each generates its own with no collective, and the records are gathered;
- parameters sharded (ZeRO-3, FSDP, tensor parallel): each forward gathers weights from every rank, so a rank
  must never generate alone, stop early or skip a module another rank runs (prompts with and without images
  would do that). Every rank answers every batch in lockstep (the same inputs, `synced_gpus`), which costs
  time but cannot hang.
Either way every rank gets the same records and scores (so `metric_for_best_model` decides alike on every
rank) and only the main process writes files.
"""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from mixtune.data.dataset import DatasetEntry, unique_names
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.metrics import METRICS
from mixtune.infer.predict import answer_items, read_prompts, write_predictions
from mixtune.infer.metrics import score
from mixtune.train import distributed as D

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
        items = self.items[name]
        records = answer_on_every_rank(engine, items, self.options, self.batch_size)
        model.train(was_training)
        if D.is_main_process():
            summary = write_predictions(records, items, out)
        else:
            summary = {"metrics": score([r["prediction"] for r in records], [it.references for it in items])}
        scores = {f"{prefix}_{k}": v for k, v in summary["metrics"].items() if k in METRICS}
        metrics.update(scores)  # the dict the Trainer reads for metric_for_best_model
        if args.should_log:
            state.log_history.append({**scores, "epoch": state.epoch, "step": state.global_step})
        log.info("generation eval at step %d: %s", state.global_step,
                 ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))


def parameters_sharded(model) -> bool:
    """Whether the model's weights are split across processes, so that every forward is a collective."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if D.world_size() == 1:
        return False
    if is_deepspeed_zero3_enabled():
        return True
    from torch.distributed.tensor import DTensor  # FSDP2 shards and tensor-parallel weights

    return any(isinstance(p, DTensor) for p in model.parameters()) or type(model).__name__.startswith("FullySharded")


def batches_of_rank(n_batches: int, rank: int, world: int) -> list[int]:
    """The batch numbers one rank answers when batches are dealt out: rank r takes r, r + world, ..."""
    return list(range(rank, n_batches, world))


def answer_on_every_rank(engine: Engine, items: list, options: GenerationOptions, batch_size: int) -> list[dict]:
    """Every item's record, in order, on every rank (see the module's docstring for how the work is shared)."""
    world = D.world_size()
    if world == 1:
        return answer_items(engine, items, options, batch_size, progress=False)
    import torch.distributed as dist

    if parameters_sharded(engine.model):
        engine.synced_gpus = True
        # a batch whose inputs fail on one rank (an unreadable image) stops every rank before any forward
        return answer_items(engine, items, options, batch_size, progress=False, before_batch=D.agree)
    n_batches = -(-len(items) // batch_size)
    mine, error = [], None
    try:
        mine = answer_items(engine, items, options, batch_size, batches=batches_of_rank(n_batches, D.rank(), world),
                            progress=False)
    except Exception as e:  # reported to every rank by `agree`
        error = e
    D.agree(error)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    # rank r holds batches r, r + world, ...: interleave them back into one process's order
    per_rank = [[part[i: i + batch_size] for i in range(0, len(part), batch_size)] for part in gathered]
    return [record for number in range(n_batches) for record in per_rank[number % world][number // world]]


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
