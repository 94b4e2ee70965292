"""What the TRL-backed tasks (dpo, kto, grpo) share: importing TRL with a one-line install hint, the config's `trl`
options checked against TRL's own config class, and a Trainer class that is both mixtune's (crash-safe saves,
per-part rates, resume repair) and TRL's (its loss, reference model, metrics).

TRL's trainers accept only a `datasets.Dataset` at construction (they inspect and may preprocess it); mixtune's
datasets are torch datasets mixed per epoch (data/mix.py). So TRL is built on a one-row stand-in of the same
columns and the real dataset is put in place right after, before any data loader exists.
"""

from __future__ import annotations

import dataclasses
import os

from mixtune.errors import ConfigError

INSTALL = "pip install 'mixtune[rl]'  (or: pip install 'trl>=1.16,<2')"


def import_trl():
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # TRL's trainers report usage to the hub otherwise
    try:
        import trl
    except ImportError:
        raise ConfigError(f"this task trains through TRL, which is not installed: {INSTALL}", key="task") from None
    return trl


def trl_args(training_args, config_class, options: dict, managed: dict):
    """TrainingArguments + the config's `trl` options -> TRL's config (DPOConfig, GRPOConfig). TRL's own defaults
    that differ from TrainingArguments' (bf16, gradient checkpointing, learning rate) do not apply: the user's
    TrainingArguments values are carried over as they are."""
    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(config_class) if f.init}
    base = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in options:
        if key not in fields or key in base:
            where = ("is a TrainingArguments key: set it at the top level of the config" if key in base
                     else f"is not an option of TRL's {config_class.__name__}")
            raise ConfigError(f"'{key}' {where}", key=f"trl.{key}")
        if key in managed:
            raise ConfigError(f"mixtune sets '{key}' itself ({managed[key]!r})", key=f"trl.{key}")
    values = {name: getattr(training_args, name) for name in base if not name.startswith("_")}
    values = {k: (v.value if hasattr(v, "value") and not isinstance(v, (int, float, str)) else v)
              for k, v in values.items()}
    values["accelerator_config"] = dataclasses.asdict(training_args.accelerator_config)
    try:
        return config_class(**{**values, **options, **managed})
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid TRL options: {e}", key="trl") from None


def stand_in(columns: dict):
    """A one-row `datasets.Dataset` with the columns TRL looks at when it is built (see the module note)."""
    import datasets

    return datasets.Dataset.from_list([columns])


def mix_with(trl_trainer_class):
    """mixtune's MixTrainer in front of a TRL trainer: MixTrainer's overrides (checkpoint staging, save_final,
    part rates, the length-grouped sampler) call on into TRL's, which calls on into transformers' Trainer."""
    from mixtune.train.trainer import MixTrainer

    return type(f"Mix{trl_trainer_class.__name__}", (MixTrainer, trl_trainer_class), {})
