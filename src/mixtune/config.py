"""The one config schema: PaddleMIX's keys, every `TrainingArguments` field, and PaddleNLP aliases.

`load_config(path, overrides)` reads JSON or YAML, applies `--key value` overrides, checks every key and
type, and returns a `Config` holding mixtune's own settings and a ready `TrainingArguments`. Unknown keys
fail with the closest valid name; keys for features mixtune has not built fail as "not supported yet".
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from mixtune.errors import ConfigError, NotSupportedYet
from mixtune.paddle_compat import ALIASES, NO_OP_KEYS, translate_keys, warmup_ratio  # noqa: F401 (re-exported)


@dataclass
class MixtuneArgs:
    """mixtune's own keys (PaddleMIX's config table, beside TrainingArguments)."""

    model_name_or_path: str = field(default="", metadata={"help": "local checkpoint folder or hub id"})
    dataset: dict = field(default_factory=dict, metadata={"help": '{"train": [entries], "eval": [entries]}'})
    freeze_include: list[str] | None = field(default=None, metadata={
        "help": "fnmatch globs of parameter names to freeze, e.g. ['*visual*']"})
    freeze_exclude: list[str] | None = field(default=None, metadata={
        "help": "globs kept trainable even when freeze_include matches them, e.g. ['*visual.merger*']"})
    freeze_vision: bool = field(default=False, metadata={
        "help": "freeze the family's vision tower (projector excluded); adds to freeze_include"})
    freeze_projector: bool = field(default=False, metadata={
        "help": "freeze the family's vision-to-language projector; adds to freeze_include"})
    freeze_language: bool = field(default=False, metadata={
        "help": "freeze the family's language model (embeddings and head included); adds to freeze_include"})
    freeze_text: bool = field(default=False, metadata={
        "help": "freeze the text tower (contrastive families: CLIP, SigLIP); adds to freeze_include"})
    freeze_backbone: bool = field(default=False, metadata={
        "help": "freeze everything but the classifier head (classification families: timm); adds to freeze_include"})
    freeze_head: bool = field(default=False, metadata={
        "help": "freeze the classifier head (classification families: timm); adds to freeze_include"})
    freeze_text_encoder: bool = field(default=False, metadata={
        "help": "freeze the text encoder (detection families: Grounding DINO's BERT); adds to freeze_include"})
    freeze_decoder: bool = field(default=False, metadata={
        "help": "freeze the caption decoder (CoCa); adds to freeze_include"})
    task: str | None = field(default=None, metadata={
        "help": "chat, contrastive, classification, dpo, kto, grpo, segmentation, detection or text_to_audio; "
                "default: the checkpoint's (a CLIPModel is "
                "contrastive)"})
    trl: dict = field(default_factory=dict, metadata={
        "help": "dpo / kto / grpo: options of TRL's DPOConfig / KTOConfig / GRPOConfig as TRL names them, e.g. "
                "{beta: 0.1, loss_type: ipo}"})
    reward_funcs: list[str] = field(default_factory=list, metadata={
        "help": "grpo: rewards by name (exact_match, format, boxed_accuracy) or a Python function as 'pkg.mod:fn'"})
    mixup_alpha: float = field(default=0.0, metadata={
        "help": "classification: timm's mixup alpha (0: off); soft targets replace the labels"})
    cutmix_alpha: float = field(default=0.0, metadata={
        "help": "classification: timm's cutmix alpha (0: off)"})
    augment: bool = field(default=False, metadata={
        "help": "classification: timm's training transform (random resized crop, flip, colour jitter)"})
    mixtoken: bool = field(default=False, metadata={"help": "pack samples into rows of max_length (MixToken)"})
    device: str | None = field(default=None, metadata={"help": "cpu, gpu or cuda; default: the GPU if present"})
    max_length: int = field(default=2048, metadata={"help": "longest sample in tokens, image tokens included"})
    labelled_logits_only: bool = field(default=True, metadata={
        "help": "compute logits and loss only at positions whose next token carries a label (same loss, "
                "less memory and time); false computes them everywhere"})
    recompute_vision: bool | None = field(default=None, metadata={
        "help": "activation checkpointing of the vision tower, apart from the language model's (`recompute`); "
                "default: as `recompute`"})
    quantization: str | None = field(default=None, metadata={
        "help": "QLoRA: 4bit or 8bit bitsandbytes weights for the language model under LoRA adapters (GPU only)"})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 or fp4 (double quantisation on)"})
    benchmark: bool = field(default=False, metadata={
        "help": "also log the Trainer's samples/s and steps/s at the end of training (real tokens/s, token and "
                "packing fill, peak memory and, on a GPU, MFU are always in the summary and metrics.json)"})
    fp16_opt_level: str = field(default="O1", metadata={
        "help": "O1 or O2; mixtune always runs autocast with fp32 master weights (O1 semantics)"})
    eval_with_do_generation: bool = field(default=False, metadata={
        "help": "at each evaluation also answer the eval set by generation and log its metrics (exact match, "
                "VQA accuracy, BLEU-4, ROUGE-L, CIDEr), usable as metric_for_best_model"})
    generation_max_new_tokens: int = field(default=64, metadata={
        "help": "longest generated answer in generation eval (eval_with_do_generation)"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa or flash_attention_2; default: the model's own choice"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters instead of full weights"})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | str | None = field(default=None, metadata={
        "help": "regexes fullmatched against module names, or 'all-linear' (the language model's linear "
                "layers); default: the family's language-model attention and MLP projections"})
    lora_modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained fully beside the adapters: regexes over module names, or 'projector' / 'vision'"})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA (peft's use_dora)"})
    use_rslora: bool = field(default=False, metadata={
        "help": "rsLoRA: scale adapters by alpha/sqrt(r) (peft's use_rslora)"})
    tensor_parallel_degree: int = field(default=1, metadata={
        "help": "tensor parallel size: the language model split across this many processes (transformers' tp_plan)"})
    pipeline_parallel_degree: int = field(default=1, metadata={"help": "pipeline parallel size (only 1: use sharding)"})
    sharding_parallel_degree: int = field(default=1, metadata={
        "help": "ranks per sharding group; 1 / -1 / the world size: shard across all ranks, fewer: hybrid sharding"})
    sharding: list[str] | str = field(default="", metadata={
        "help": "ZeRO stage: stage1, stage2 or stage3, optionally with offload (\"stage3 offload\")"})
    sharding_engine: str = field(default="deepspeed", metadata={
        "help": "what runs `sharding`: deepspeed (ZeRO) or fsdp (FSDP2, GPUs only)"})
    on_bad_sample: str = field(default="error", metadata={
        "help": "default for dataset entries: 'error' stops at the first bad sample, 'skip' drops and reports it"})
    strict_fields: bool = field(default=False, metadata={
        "help": "default for dataset entries: a record key the reader does not read is an error, not a warning"})
    truncation: str = field(default="drop", metadata={
        "help": "default for dataset entries: over-long samples are 'drop'ped, or 'downscale' shrinks their images"})
    data_cache_dir: str | None = field(default=None, metadata={
        "help": "where per-sample token lengths are cached; default $MIXTUNE_CACHE_DIR or ~/.cache/mixtune"})
    vision_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the vision tower's parameters (LoRA adapters on it included); default learning_rate"})
    projector_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the projector's parameters; default learning_rate (PaddleMIX: mm_projector_lr)"})
    language_lr: float | None = field(default=None, metadata={
        "help": "learning rate of the language model's parameters (head included); default learning_rate"})
    max_sample_bytes: int = field(default=16 * 1024 * 1024, metadata={
        "help": "default for dataset entries: a bigger JSON record or JSONL line is a bad sample, never parsed"})


# TrainingArguments fields mixtune sets itself.
MANAGED = {"remove_unused_columns": False}
TRAINING_DEFAULTS = {"report_to": "none", "logging_steps": 10, "save_strategy": "epoch",
                     "output_dir": "output", "save_only_model": False}


@dataclass
class Config:
    mix: MixtuneArgs
    training: Any  # transformers.TrainingArguments
    overwrite_output_dir: bool = False
    base_dir: str = "."  # the config file's folder: relative data paths resolve against it
    notes: list[str] = field(default_factory=list)  # what was mapped or has no effect, for the log


def _training_fields() -> dict[str, dataclasses.Field]:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def valid_keys() -> set[str]:
    return ({f.name for f in dataclasses.fields(MixtuneArgs)} | set(_training_fields()) | set(ALIASES)
            | set(NO_OP_KEYS) | {"overwrite_output_dir"})


def read_config_file(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a folder; give the config file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: malformed YAML: {getattr(e, 'problem', e)}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {e.lineno} column {e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    return data


def parse_overrides(args: list[str]) -> dict:
    """`--key value` pairs from the command line; values parse as JSON when they can (1e-4, true, [..])."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': overrides look like --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                value = "true"  # a bare flag
            else:
                i += 1
                value = args[i]
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
        i += 1
    return out


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's type annotation; convert only where it is lossless."""
    members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError("must not be null", key=key)
    enums = [m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)]
    if enums and isinstance(value, str):  # "str | SomeEnum" still means one of the enum's values
        choices = [e.value for m in enums for e in m]
        if value not in choices:
            raise ConfigError(f"expected one of {choices}, got {value!r}", key=key)
        return value
    errors = []
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            continue
        if origin is bool:
            if isinstance(value, bool):
                return value
        elif origin is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif origin is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif origin is str:
            if isinstance(value, str):
                return value
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            choices = [e.value for e in origin]
            if isinstance(value, str) and value in choices:
                return value
            if isinstance(value, origin):
                return value
            errors.append(f"one of {choices}")
            continue
        elif origin is list:
            if isinstance(value, list):
                return value
        elif origin is dict:
            if isinstance(value, dict):
                return value
        elif origin is typing.Any:
            return value
        errors.append(getattr(origin, "__name__", str(origin)))
    raise ConfigError(f"expected {' or '.join(dict.fromkeys(errors))}, got {value!r} ({type(value).__name__})",
                      key=key)


def suggest(key: str) -> str:
    close = difflib.get_close_matches(key, sorted(valid_keys()), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def build_config(raw: dict, base_dir: str = ".") -> Config:
    notes: list[str] = []
    raw = translate_keys(raw, notes)  # PaddleMIX / PaddleNLP names (paddle_compat.py)
    if raw.get("resume_from_checkpoint") is True:  # PaddleMIX's spelling of "the latest checkpoint"
        raw["resume_from_checkpoint"] = "true"
    elif raw.get("resume_from_checkpoint") is False:
        raw["resume_from_checkpoint"] = None
    overwrite = raw.pop("overwrite_output_dir", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"expected bool, got {overwrite!r}", key="overwrite_output_dir")

    mix_types = typing.get_type_hints(MixtuneArgs)
    train_fields = _training_fields()
    mix_kwargs, train_kwargs = {}, dict(TRAINING_DEFAULTS)
    for key, value in raw.items():
        if key in mix_types:
            mix_kwargs[key] = coerce(value, mix_types[key], key)
        elif key in train_fields:
            if key in MANAGED and value != MANAGED[key]:
                raise NotSupportedYet(key, f"{key}={value!r} (mixtune's collator builds the model inputs itself)")
            train_kwargs[key] = coerce(value, train_fields[key].type, key)
        else:
            raise ConfigError(f"unknown key '{key}'{suggest(key)}", key=key)
    mix = MixtuneArgs(**mix_kwargs)
    check_mixtune_args(mix, notes)
    train_kwargs.update(MANAGED)
    import torch

    if mix.device in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"'{mix.device}' requested but torch sees no GPU", key="device")
    if mix.device == "cpu" or (not torch.cuda.is_available() and mix.device != "npu"):
        train_kwargs.setdefault("use_cpu", True)  # lets bf16 run on CPU instead of failing the GPU check
    from mixtune.train.qlora import check_quantization

    check_quantization(mix, bool(train_kwargs.get("use_cpu")))
    from mixtune.train.liger import check_liger

    check_liger(bool(train_kwargs.get("use_liger_kernel")), bool(train_kwargs.get("use_cpu")), mix.model_name_or_path)
    if mix.mixtoken and train_kwargs.get("train_sampling_strategy") == "group_by_length":
        # packs already group samples by length; the length-grouped sampler cannot read packs
        train_kwargs["train_sampling_strategy"] = "random"
        notes.append("group_by_length has no effect with mixtoken: packs are shuffled instead")
    if mix.fp16_opt_level == "O2" and (train_kwargs.get("bf16") or train_kwargs.get("fp16")):
        notes.append("fp16_opt_level O2: mixtune keeps fp32 master weights and autocasts (O1 semantics)")
    from mixtune.train.distributed import apply_parallelism

    apply_parallelism(mix, train_kwargs, notes)  # sharding / fsdp / parallel degrees -> TrainingArguments
    from mixtune.data.workers import apply_loader_default

    apply_loader_default(train_kwargs, notes)  # loader workers overlap data preparation with compute
    for key in ("output_dir", "logging_dir"):
        if train_kwargs.get(key) and not os.path.isabs(train_kwargs[key]):
            train_kwargs[key] = os.path.normpath(os.path.join(os.getcwd(), train_kwargs[key]))
    from mixtune.config_checks import check_values
    from transformers import TrainingArguments

    check_values(mix, train_kwargs, base_dir, notes)
    try:
        training = TrainingArguments(**train_kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid training arguments: {e}") from None
    return Config(mix=mix, training=training, overwrite_output_dir=overwrite, base_dir=base_dir, notes=notes)


def check_mixtune_args(mix: MixtuneArgs, notes: list[str]) -> None:
    if not mix.model_name_or_path:
        raise ConfigError("is required: a checkpoint folder or hub id", key="model_name_or_path")
    if not isinstance(mix.dataset, dict) or "train" not in mix.dataset:
        raise ConfigError('must look like {"train": [entries], "eval": [entries]}', key="dataset")
    unknown = set(mix.dataset) - {"train", "eval"}
    if unknown:
        raise ConfigError(f"unknown part(s) {sorted(unknown)}; expected 'train' and 'eval'", key="dataset")
    if mix.max_length < 1:
        raise ConfigError("must be positive", key="max_length")
    for key in ("vision_lr", "projector_lr", "language_lr"):
        if getattr(mix, key) is not None and getattr(mix, key) < 0:
            raise ConfigError("must be >= 0", key=key)
    from mixtune.data.badsamples import POLICIES
    from mixtune.data.dataset import TRUNCATION
    from mixtune.train.freeze import FREEZE_SHORTCUTS

    if mix.on_bad_sample not in POLICIES:
        raise ConfigError(f"must be one of {POLICIES}, got {mix.on_bad_sample!r}", key="on_bad_sample")
    if mix.truncation not in TRUNCATION:
        raise ConfigError(f"must be one of {TRUNCATION}, got {mix.truncation!r}", key="truncation")
    if mix.fp16_opt_level not in ("O1", "O2"):
        raise ConfigError(f"must be 'O1' or 'O2', got {mix.fp16_opt_level!r}", key="fp16_opt_level")
    if mix.device not in (None, "cpu", "gpu", "cuda", "npu"):
        raise ConfigError(f"must be cpu, gpu, cuda or npu, got {mix.device!r}", key="device")
    if mix.eval_with_do_generation and not mix.dataset.get("eval"):
        raise ConfigError("needs dataset.eval entries to answer", key="eval_with_do_generation")
    if mix.generation_max_new_tokens < 1:
        raise ConfigError("must be at least 1", key="generation_max_new_tokens")
    if mix.mixtoken:
        check_mixtoken(mix)
    if mix.lora:
        if mix.lora_rank < 1:
            raise ConfigError("must be >= 1", key="lora_rank")
        if not 0 <= mix.lora_dropout < 1:
            raise ConfigError("must be in [0, 1)", key="lora_dropout")
        for part in FREEZE_SHORTCUTS:
            if getattr(mix, f"freeze_{part}"):
                raise ConfigError("has no meaning with lora: true (every base weight is frozen already); choose "
                                  "what trains with lora_target_modules and lora_modules_to_save",
                                  key=f"freeze_{part}")
    else:
        for key in ("lora_target_modules", "lora_modules_to_save", "use_dora", "use_rslora"):
            if getattr(mix, key):
                notes.append(f"'{key}' has no effect without 'lora: true'")
    if mix.attn_implementation not in (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3",
                                       "flex_attention"):
        raise ConfigError(f"unknown attention implementation {mix.attn_implementation!r}", key="attn_implementation")


def check_mixtoken(mix: MixtuneArgs) -> None:
    """Refuse packing up front for a family that cannot keep packed samples apart exactly."""
    from mixtune.models.registry import family_for_checkpoint

    family = family_for_checkpoint(mix.model_name_or_path)
    if family.pack_positions is None and family.no_packing_reason:
        raise ConfigError(f"the {family.name} family cannot pack samples: {family.no_packing_reason}; "
                          "set mixtoken: false", key="mixtoken")
    if family.pack_positions is None:
        raise ConfigError(f"the {family.name} family cannot pack samples with exact attention isolation yet "
                          "(it has no `pack_positions` hook); set mixtoken: false", key="mixtoken")


def load_config(path: str, overrides: dict | None = None) -> Config:
    raw = read_config_file(path)
    raw.update(overrides or {})
    return build_config(raw, base_dir=os.path.dirname(os.path.abspath(path)))
