"""The task layer: what a run trains a model for. One module per task (`chat`, `contrastive`,
`classification`), each exposing

    load(mix, family) -> (model, processor)      the checkpoint in its own library
    build_data(config, family, model, processor) -> TaskData
                                                 datasets (mixed by data/mix.py), collator, the Trainer
                                                 subclass that knows the task's loss, metrics and save format

Config, dataset entries and mixing, bad-sample handling, freezing, LoRA, resume, metrics.json and the loss
figure are shared: train/run.py does them once for every task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from mixtune.errors import ConfigError

TASKS = ("chat", "contrastive", "classification", "dpo", "grpo", "kto", "segmentation", "detection", "text_to_audio")
# config keys only some tasks read: set under any other task they would be silently ignored, so they are refused
TASK_KEYS = {"trl": ("dpo", "kto", "grpo"), "reward_funcs": ("grpo",)}


@dataclass
class TaskData:
    train: Any  # a MixDataset (or a PackedDataset for chat with MixToken): what set_epoch redraws
    eval: Any  # None, a dataset, or {entry name: dataset}
    collator: Any
    trainer_class: type | None = None  # default: train/trainer.py's MixTrainer
    compute_metrics: Any = None
    callbacks: list = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    trainer_attrs: dict = field(default_factory=dict)  # set on the Trainer after it is built


def task_name(mix, family) -> str:
    """The config's `task`, else the family's own (a CLIPModel is contrastive, a timm model classifies)."""
    name = mix.task or family.task
    if name not in TASKS:
        raise ConfigError(f"unknown task '{name}'; known: {', '.join(TASKS)}", key="task")
    if name not in family.task_choices:
        choices = " or ".join(f"'{t}'" for t in family.task_choices)
        raise ConfigError(f"a {family.name} checkpoint trains for {choices}, not '{name}'", key="task")
    check_task_keys(mix, name)
    return name


def check_task_keys(mix, name: str) -> None:
    for key, tasks in TASK_KEYS.items():
        if getattr(mix, key) and name not in tasks:
            takes = ", ".join(tasks)
            raise ConfigError(f"is read only by task {takes}; this run's task is '{name}', which would ignore it",
                              key=key)


def get_task(name: str):
    return importlib.import_module(f"mixtune.tasks.{name}")
