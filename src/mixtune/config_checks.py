"""Every config value whose meaning is known, checked when the config is read, before any model loads.

`check_values` runs inside `build_config`: ranges of TrainingArguments values that transformers accepts
silently or fails on only later (a batch size of 0, a negative learning rate, `save_steps: -1`), the
dataset entries (keys, reader names, data files that exist and are files), the output folder, and the
`report_to` integrations. Each failure is one ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from mixtune.errors import ConfigError, MixtuneError

# TrainingArguments values -> (is it valid, what it must be). Checked on the value the run will use.
_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
RANGES: dict[str, tuple[Any, str]] = {
    "per_device_train_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "per_device_eval_batch_size": (lambda v: v >= 1, "must be >= 1"),
    "gradient_accumulation_steps": (lambda v: v >= 1, "must be >= 1"),
    "eval_accumulation_steps": (lambda v: v is None or v >= 1, "must be >= 1 when given"),
    "learning_rate": (lambda v: v >= 0, "must be >= 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "max_grad_norm": (lambda v: v is None or v >= 0, "must be >= 0 (0 turns gradient clipping off)"),
    "adam_beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_beta2": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "adam_epsilon": (lambda v: v >= 0, "must be >= 0"),
    "label_smoothing_factor": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "warmup_steps": (lambda v: v >= 0 and (v < 1 or float(v).is_integer()),
                     "must be a whole number of steps >= 1, or below 1 a ratio of all steps (transformers 5 "
                     "reads warmup_steps < 1 as a ratio)"),
    "dataloader_num_workers": (lambda v: v >= 0, "must be >= 0 (0 loads in the main process)"),
    "save_total_limit": (lambda v: v is None or v >= 1, "must be >= 1 when given (omit it to keep every "
                                                        "checkpoint)"),
    "eval_delay": (lambda v: v >= 0, "must be >= 0"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)"),
    "data_seed": (lambda v: v is None or 0 <= v < 2**32, "must be in [0, 2**32) (numpy's seed range)"),
    "neftune_noise_alpha": (lambda v: v is None or v > 0, "must be > 0 when given"),
    "ddp_timeout": (lambda v: v > 0, "must be > 0 seconds"),
}
# "<what>_steps" is read when "<what>_strategy" is "steps"
STEP_INTERVALS = {"save_steps": "save_strategy", "eval_steps": "eval_strategy", "logging_steps": "logging_strategy"}

# report_to name -> (transformers' availability check in integrations.integration_utils, the pip package)
INTEGRATIONS = {
    "wandb": ("is_wandb_available", "wandb"), "tensorboard": ("is_tensorboard_available", "tensorboard"),
    "mlflow": ("is_mlflow_available", "mlflow"), "comet_ml": ("is_comet_available", "comet_ml"),
    "neptune": ("is_neptune_available", "neptune"), "clearml": ("is_clearml_available", "clearml"),
    "dvclive": ("is_dvclive_available", "dvclive"), "codecarbon": ("is_codecarbon_available", "codecarbon"),
    "swanlab": ("is_swanlab_available", "swanlab"), "trackio": ("is_trackio_available", "trackio"),
    "azure_ml": ("is_azureml_available", "azureml-core"), "dagshub": ("is_dagshub_available", "dagshub"),
    "flyte": ("is_flytekit_available", "flytekit"), "kubeflow": ("is_kubeflow_available", "kubeflow"),
}

# optimizers whose package transformers imports only when the optimizer is built (after the model loaded):
# name prefix -> (module, pip package)
OPTIMIZER_PACKAGES = {
    ("adamw_bnb", "adamw_8bit", "ademamix", "lion_", "paged_", "rmsprop_bnb"): ("bitsandbytes", "bitsandbytes"),
    ("adamw_torch_4bit", "adamw_torch_8bit"): ("torchao", "torchao"),
    ("galore_",): ("galore_torch", "galore-torch"), ("apollo_",): ("apollo_torch", "apollo-torch"),
    ("lomo", "adalomo"): ("lomo_optim", "lomo-optim"), ("grokadamw",): ("grokadamw", "grokadamw"),
    ("schedule_free_",): ("schedulefree", "schedulefree"), ("stable_adamw",): ("optimi", "torch-optimi"),
    ("adamw_anyprecision",): ("torchdistx", "torchdistx"),
}
# TrainingArguments fields that take a dict or its JSON text; other text fails only when it is used
JSON_DICT_FIELDS = ("lr_scheduler_kwargs", "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")


def check_values(mix, train_kwargs: dict, base_dir: str, notes: list[str]) -> None:
    """All checks that need no model: the training values, the dataset block, output_dir, report_to."""
    from transformers import TrainingArguments

    defaults = {f.name: f.default for f in TrainingArguments.__dataclass_fields__.values()}
    value = lambda key: train_kwargs.get(key, defaults.get(key))  # noqa: E731
    check_training_ranges(value)
    check_run_length(value, train_kwargs)
    if mix.max_sample_bytes < 1:
        raise ConfigError(f"must be a positive number of bytes, got {mix.max_sample_bytes}", key="max_sample_bytes")
    if mix.lora and not mix.lora_alpha > 0:
        raise ConfigError(f"must be > 0, got {mix.lora_alpha}", key="lora_alpha")
    if value("dataloader_persistent_workers") and value("dataloader_num_workers") == 0:
        raise ConfigError("needs dataloader_num_workers > 0 (there are no workers to keep)",
                          key="dataloader_persistent_workers")
    check_optimizer(_strategy(value("optim")))
    for key in JSON_DICT_FIELDS:
        check_json_dict(train_kwargs.get(key), key)
    check_writable_folder(value("output_dir"), "output_dir")
    if train_kwargs.get("logging_dir"):
        check_writable_folder(train_kwargs["logging_dir"], "logging_dir")
    if mix.data_cache_dir:
        check_writable_folder(mix.data_cache_dir, "data_cache_dir")
    check_report_to(value("report_to"))
    check_dataset(mix, base_dir)
    check_evaluation(mix, value, train_kwargs, base_dir, notes)


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value))


def check_training_ranges(value) -> None:
    for key, (ok, requirement) in RANGES.items():
        v = value(key)
        if isinstance(v, bool) or not ok(v):
            raise ConfigError(f"{requirement}, got {v!r}", key=key)
    for key, strategy in STEP_INTERVALS.items():
        v = value(key)
        if _strategy(value(strategy)) == "steps" and v is not None and not v > 0:
            raise ConfigError(f"must be > 0 when {strategy} is 'steps' (a number of steps, or below 1 a ratio of "
                              f"all steps), got {v!r}", key=key)


def check_run_length(value, train_kwargs: dict) -> None:
    """A run that trains for no step would save the untrained model as its result."""
    if train_kwargs.get("do_train") is False:
        raise ConfigError("`mixtune train` always trains; an evaluation-only run (do_train: false) is not supported "
                          "yet: remove the key", key="do_train")
    max_steps = value("max_steps")
    if max_steps == 0 or max_steps < -1:
        raise ConfigError(f"must be > 0, or -1 (the default) to train for num_train_epochs; got {max_steps}",
                          key="max_steps")
    if max_steps == -1 and not value("num_train_epochs") > 0:
        raise ConfigError(f"must be > 0 (or give max_steps > 0), got {value('num_train_epochs')}",
                          key="num_train_epochs")


def check_optimizer(optim: str) -> None:
    import importlib.util

    for prefixes, (module, package) in OPTIMIZER_PACKAGES.items():
        if optim.startswith(prefixes) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"'{optim}' needs {module}: pip install {package} (or choose another optim)", key="optim")


def check_json_dict(value: Any, key: str) -> None:
    if isinstance(value, str):
        import json

        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ConfigError(f"expected a mapping (or its JSON text), got {value!r}", key=key)


def check_writable_folder(path: Any, key: str) -> None:
    """The folder exists and is writable, or it can be created: its nearest existing parent is a writable
    folder. Nothing is created here."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError("must name a folder", key=key)
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{path} is a file, not a folder", key=key)
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create {path}: {parent} is a file", key=key)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write into {parent} (permission denied or read-only file system)", key=key)


def check_report_to(report_to: Any) -> None:
    """Each named integration is one transformers knows, and its package is installed (the Trainer would
    otherwise fail only after the model loaded)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    names = [n for n in names if n not in ("none", "all")]
    if not names:
        return
    from transformers.integrations import integration_utils

    known = sorted(getattr(integration_utils, "INTEGRATION_TO_CALLBACK", INTEGRATIONS))
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(f"unknown integration {name!r}; {hint}known: {known}, or 'none'", key="report_to")
        check, package = INTEGRATIONS.get(name, (None, None))
        available = getattr(integration_utils, check, None) if check else None
        if available is not None and not available():
            raise ConfigError(f"'{name}' is not installed: pip install {package} (or set report_to: none)",
                              key="report_to")


def check_dataset(mix, base_dir: str) -> None:
    """Entry keys and values, reader names and data files, without reading any sample."""
    from mixtune.data.dataset import ENTRY_DEFAULT_KEYS, parse_entries

    defaults = {k: getattr(mix, k) for k in ENTRY_DEFAULT_KEYS}
    if not mix.dataset.get("train"):
        raise ConfigError("has no entries", key="dataset.train")
    for split in ("train", "eval"):
        raw = mix.dataset.get(split)
        if raw is None or raw == []:
            continue
        for i, entry in enumerate(parse_entries(raw, split, base_dir, defaults)):
            check_entry_files(entry, f"dataset.{split}[{i}]")


def check_entry_files(entry, where: str) -> None:
    from mixtune.data.formats import READERS, _load_builtin_readers, expand_data_files

    _load_builtin_readers()
    reader = READERS.get(entry.name)
    if reader is None:
        close = difflib.get_close_matches(str(entry.name), sorted(READERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown dataset name {entry.name!r}; {hint}known: {sorted(READERS)}", key=f"{where}.name")
    patterns = entry.data_files if isinstance(entry.data_files, list) else [entry.data_files]
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"expected a path, a glob or a non-empty list of them, got {entry.data_files!r}",
                          key=f"{where}.data_files")
    try:
        files = expand_data_files(entry.data_files, entry.base_dir)
    except MixtuneError as e:
        raise ConfigError(getattr(e, "reason", str(e)), key=f"{where}.data_files") from None
    for path in files:
        if os.path.isdir(path):
            if not reader.reads_folders:
                raise ConfigError(f"{path} is a folder; '{entry.name}' reads files: point data_files at the files "
                                  f"inside it (a glob such as {os.path.join(path, '*.json')} works)",
                                  key=f"{where}.data_files")
            if entry.name == "hf" and not os.path.exists(os.path.join(path, "state.json")):
                hint = ("it holds several splits: point data_files at one split's folder" if
                        os.path.exists(os.path.join(path, "dataset_dict.json")) else "no state.json in it")
                raise ConfigError(f"{path} is not a `datasets` save_to_disk folder of one split ({hint})",
                                  key=f"{where}.data_files")
        elif not os.path.isfile(path):
            raise ConfigError(f"{path} is not a regular file", key=f"{where}.data_files")
        elif not os.access(path, os.R_OK):
            raise ConfigError(f"cannot read {path} (permission denied)", key=f"{where}.data_files")
    if entry.chat_template and not os.path.isfile(entry.chat_template):
        raise ConfigError(f"chat template file not found: {entry.chat_template}", key=f"{where}.chat_template")
    if entry.image_root and not os.path.isdir(entry.image_root):
        raise ConfigError(f"image folder not found: {entry.image_root}", key=f"{where}.image_root")
    if entry.name in ("coco_vqa", "vqa") and entry.prompt is not None and "{question}" not in entry.prompt:
        raise ConfigError("a VQA prompt must contain '{question}'", key=f"{where}.prompt")
    if entry.name == "hf" and entry.columns:
        from mixtune.data.formats.hf import FIELDS

        unknown = sorted(set(entry.columns) - set(FIELDS))
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown}; map any of {list(FIELDS)} to column names",
                              key=f"{where}.columns")


def check_evaluation(mix, value, train_kwargs: dict, base_dir: str, notes: list[str]) -> None:
    """Evaluation settings against the eval entries: both are known before any file is read."""
    has_eval = bool(mix.dataset.get("eval"))
    strategy = _strategy(value("eval_strategy"))
    if strategy != "no" and not has_eval:
        raise ConfigError(f"is '{strategy}' but dataset.eval is empty: add eval entries or set eval_strategy: no",
                          key="eval_strategy")
    if train_kwargs.get("do_eval") and not has_eval:
        notes.append("'do_eval' has no effect without dataset.eval entries")
    metric = value("metric_for_best_model")
    if metric and (value("load_best_model_at_end") or _strategy(value("save_strategy")) == "best"):
        allowed = eval_metric_names(mix, base_dir)
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        if name not in allowed:
            raise ConfigError(f"{metric!r} is no metric of this run (mixtune evaluates losses, and generation "
                              "scores with eval_with_do_generation); choose one of "
                              f"{sorted(allowed)}", key="metric_for_best_model")


def eval_metric_names(mix, base_dir: str) -> set[str]:
    """The metrics an evaluation of this config reports: eval_loss, one eval_<entry>_loss per eval entry when
    there are several, the Trainer's timing figures, and with eval_with_do_generation the generation scores."""
    from mixtune.data.dataset import parse_entries, unique_names

    entries = parse_entries(mix.dataset.get("eval") or [], "eval", base_dir)
    names = {"eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}
    prefixes = [f"eval_{n}" for n in unique_names([e.label() for e in entries])] if len(entries) > 1 else ["eval"]
    if len(entries) > 1:
        names |= {f"{p}_loss" for p in prefixes}
    if mix.eval_with_do_generation:  # generation eval's scores, per entry as the losses are
        from mixtune.infer.metrics import METRICS

        names |= {f"{p}_{m}" for p in prefixes for m in METRICS}
    return names
