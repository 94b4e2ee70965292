"""PaddleMIX / PaddleNLP compatibility: what a PaddleMIX config writes, read in mixtune's terms.

Three tables and the functions that apply them:
1. Config keys (`translate_keys`): renamed keys (ALIASES), keys whose job our stack does already
   (NO_OP_KEYS, accepted and logged), PaddleMIX's BLIP-2 schedule keys (`lr_scheduler_name`, `eta_min`,
   `warmup_start_lr`) mapped onto transformers' cosine schedules with a floor and a warm-up start, and a
   dataset entry's `splits` (PaddleNLP's split label of each data file).
2. Parameter and module names (`with_paddle_name_hint`): freeze globs and LoRA regexes written for PaddleMIX's
   models match nothing in transformers' models. When a known PaddleMIX naming explains the miss, the error
   gains the translated patterns, ready to paste. PADDLE_NAMES holds one small table per family.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from mixtune.errors import ConfigError

# PaddleNLP / PaddleMIX names -> (our key, value transform).
ALIASES: dict[str, tuple[str, Any]] = {
    "evaluation_strategy": ("eval_strategy", None),
    # transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is a ratio of all steps
    "warmup_ratio": ("warmup_steps", lambda v: warmup_ratio(v)),
    "recompute": ("activation_checkpointing", None),
    "use_flash_attention": ("attn_implementation", lambda v: "flash_attention_2" if v else None),
    "group_by_modality_length": ("train_sampling_strategy", lambda v: "group_by_length" if v else "random"),
    # PaddleMIX's LLaVA trainer: the projector's own learning rate
    "mm_projector_lr": ("projector_lr", None),
}

def warmup_ratio(value: Any) -> Any:
    """A ratio must stay below 1: transformers reads warmup_steps >= 1 as a step count."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not 0 <= value < 1:
        raise ConfigError(f"must be in [0, 1) (a fraction of all steps), got {value!r}; for a warm-up in steps "
                          "give warmup_steps", key="warmup_ratio")
    return value


# PaddleNLP / PaddleMIX keys whose job our stack already does, or that PaddleMIX itself never reads;
# accepted so PaddleMIX configs run, and logged.
NO_OP_KEYS = {
    "unified_checkpoint": "checkpoints are always saved in transformers' safetensors format",
    "amp_master_grad": "mixed precision always keeps fp32 master weights",
    "scale_loss": "fp16 loss scaling is dynamic (torch.amp.GradScaler)",
    "text_model_name_or_path": "the tokenizer is the one saved with model_name_or_path (transformers' BLIP-2 "
                               "checkpoints ship their OPT / Flan-T5 tokenizer in the processor)",
    "src_length": "PaddleMIX declares it but never reads it; max_length bounds a whole sample",
}

# PaddleMIX's BLIP-2 trainer defaults (paddlemix/trainer/argument.py), used when `lr_scheduler_name` is given.
PADDLE_SCHEDULER = "CosineDecayWithWarmup"
PADDLE_ETA_MIN, PADDLE_WARMUP_START_LR = 1e-5, 1e-6
COSINE_TYPES = (None, "cosine", "cosine_with_min_lr", "cosine_warmup_with_min_lr")
SCHEDULE_KEYS = ("lr_scheduler_name", "eta_min", "warmup_start_lr")  # read by map_paddle_schedule
EVAL_SPLITS = ("val", "validation", "eval", "dev", "test")


def translate_keys(raw: dict, notes: list[str]) -> dict:
    """A config's PaddleMIX / PaddleNLP keys rewritten as mixtune keys; each rewrite is added to `notes`."""
    raw = dict(raw)
    projector_under_lora(raw, notes)
    for old, (new, transform) in ALIASES.items():
        if old in raw:
            value = raw.pop(old)
            if new in raw:
                raise ConfigError(f"given together with its alias '{old}'; keep one", key=new)
            raw[new] = transform(value) if transform else value
            notes.append(f"'{old}' read as '{new}' = {raw[new]!r}")
    for key, why in NO_OP_KEYS.items():
        if key in raw:
            raw.pop(key)
            notes.append(f"'{key}' has no effect: {why}")
    map_paddle_schedule(raw, notes)
    if isinstance(raw.get("dataset"), dict):
        raw["dataset"] = {split: [entry_without_splits(e, split, f"dataset.{split}[{i}]", notes)
                                  for i, e in enumerate(entries)] if isinstance(entries, list) else entries
                          for split, entries in raw["dataset"].items()}
    return raw


def projector_under_lora(raw: dict, notes: list[str]) -> None:
    """PaddleMIX's LLaVA trainer trains the projector fully in LoRA runs (at `mm_projector_lr`); here that is
    `projector` in lora_modules_to_save."""
    if raw.get("mm_projector_lr") is None or raw.get("lora") is not True:
        return
    to_save = raw.get("lora_modules_to_save")
    if to_save is None or isinstance(to_save, list) and "projector" not in to_save:
        raw["lora_modules_to_save"] = [*(to_save or []), "projector"]
        notes.append("'mm_projector_lr' with lora: the projector trains fully beside the adapters, as in "
                     "PaddleMIX's LLaVA trainer (lora_modules_to_save gains 'projector')")


def map_paddle_schedule(raw: dict, notes: list[str]) -> None:
    """PaddleMIX's CosineDecayWithWarmup (BLIP-2): cosine down to `eta_min` after a linear warm-up from
    `warmup_start_lr` -> transformers' `cosine_warmup_with_min_lr` (or `cosine_with_min_lr` without a warm-up
    start), whose floor and warm-up start are ratios of learning_rate applied to every parameter group."""
    given = [k for k in SCHEDULE_KEYS if k in raw]
    if not given:
        return
    name = raw.pop("lr_scheduler_name", None)
    if name not in (None, PADDLE_SCHEDULER):
        raise ConfigError(f"PaddleMIX scheduler {name!r} has no equivalent here; PaddleMIX's only one is "
                          f"'{PADDLE_SCHEDULER}'. Use lr_scheduler_type (linear, cosine, cosine_with_min_lr, ...)",
                          key="lr_scheduler_name")
    kind = raw.get("lr_scheduler_type")
    if kind not in COSINE_TYPES:
        raise ConfigError(f"{', '.join(given)} describe(s) PaddleMIX's cosine schedule, but lr_scheduler_type is "
                          f"{kind!r}; use lr_scheduler_type 'cosine' or remove {', '.join(given)}", key=given[0])
    eta_min = raw.pop("eta_min", PADDLE_ETA_MIN if name else 0.0)
    start = raw.pop("warmup_start_lr", PADDLE_WARMUP_START_LR if name else None)
    for key, value in (("eta_min", eta_min), ("warmup_start_lr", start)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"expected a number >= 0, got {value!r}", key=key)
    lr = raw.get("learning_rate", 5e-5)  # transformers' default learning_rate
    kwargs = dict(raw.get("lr_scheduler_kwargs") or {})
    if "min_lr" in kwargs or "min_lr_rate" in kwargs:
        raise ConfigError("lr_scheduler_kwargs sets the floor already; remove eta_min or the kwarg", key="eta_min")
    kwargs["min_lr"] = float(eta_min)
    if start is not None:
        if not isinstance(lr, (int, float)) or lr <= 0:
            raise ConfigError("needs a positive learning_rate (it is a ratio of it)", key="warmup_start_lr")
        kwargs["warmup_lr_rate"] = start / lr
        raw["lr_scheduler_type"] = "cosine_warmup_with_min_lr"
    else:
        raw["lr_scheduler_type"] = "cosine_with_min_lr"
    raw["lr_scheduler_kwargs"] = kwargs
    notes.append(f"{', '.join(given)} read as lr_scheduler_type '{raw['lr_scheduler_type']}' with "
                 f"lr_scheduler_kwargs {kwargs} (PaddleMIX's {PADDLE_SCHEDULER})")


def entry_without_splits(entry: Any, split: str, where: str, notes: list[str]) -> Any:
    """PaddleNLP's `splits` labels each data file with its split. mixtune takes the split from where the entry
    sits (dataset.train / dataset.eval), so a label that agrees is dropped and one that disagrees is refused;
    without `data_files` it asked PaddleMIX to download a built-in dataset, which mixtune does not do."""
    if not isinstance(entry, dict) or "splits" not in entry:
        return entry
    splits = entry["splits"]
    labels = [splits] if isinstance(splits, str) else splits
    if not (isinstance(labels, list) and labels and all(isinstance(s, str) for s in labels)):
        raise ConfigError(f"'splits' must be a split name or a list of them, got {splits!r}", key=where)
    if "data_files" not in entry:
        raise ConfigError(f"'splits: {splits!r}' without 'data_files' asks PaddleMIX to download its built-in "
                          f"'{entry.get('name')}' data; mixtune reads local files only: download them and give "
                          "'data_files' (then 'splits' may label each file)", key=where)
    files = entry["data_files"]
    if isinstance(files, list) and len(labels) not in (1, len(files)):
        raise ConfigError(f"{len(labels)} 'splits' for {len(files)} data_files; give one split per file",
                          key=where)
    expected = ("train",) if split == "train" else EVAL_SPLITS
    wrong = [s for s in labels if s not in expected]
    if wrong:
        raise ConfigError(f"'splits' {wrong} disagree with the entry's place in dataset.{split} (expected "
                          f"{' / '.join(expected)}); move the entry or fix the label", key=where)
    notes.append(f"{where}: 'splits' {labels} agrees with dataset.{split}; the data_files are read as they are")
    return {k: v for k, v in entry.items() if k != "splits"}


# ---- parameter and module names ----

@dataclass(frozen=True)
class PaddleNaming:
    """How one PaddleMIX model names what a transformers family names otherwise: (PaddleMIX fragment,
    replacement fragments), applied in order to a pattern that matches nothing. Several replacements mean the
    PaddleMIX module is split in transformers (Qwen-VL's fused `c_attn` is q/k/v_proj)."""
    model: str
    renames: tuple[tuple[str, tuple[str, ...]], ...]


QWEN_VL = PaddleNaming("Qwen-VL", (
    ("visual.attn_pool", ("visual.merger",)),  # Qwen-VL's resampler; Qwen2-VL's merger does that job
    ("attn.c_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attn.c_proj", ("self_attn.o_proj",)),
    ("mlp.w1", ("mlp.up_proj",)),  # Qwen's MLP: c_proj(w1(x) * silu(w2(x)))
    ("mlp.w2", ("mlp.gate_proj",)),
    ("mlp.c_proj", ("mlp.down_proj",)),
    ("transformer.h.", ("model.language_model.layers.",)),
))
LLAVA = PaddleNaming("LLaVA", (
    ("llama.mm_projector", ("model.multi_modal_projector",)),
    ("llama.vision_tower", ("model.vision_tower",)),
    ("llama.layer", ("model.language_model.layer",)),
    ("llama.embed_tokens", ("model.language_model.embed_tokens",)),
    ("llama.norm", ("model.language_model.norm",)),
    ("llama", ("model",)),  # PaddleMIX's LLaVA keeps vision tower, projector and language model under `llama`
))
XCOMPOSER2 = PaddleNaming("InternLM-XComposer2", (
    ("vision_proj", ("model.multi_modal_projector",)),
    ("vit", ("vision_tower",)),
    ("attention.wqkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attention.wo", ("self_attn.o_proj",)),
    ("feed_forward.w1", ("mlp.gate_proj",)),
    ("feed_forward.w3", ("mlp.up_proj",)),
    ("feed_forward.w2", ("mlp.down_proj",)),
))
INTERNVL2 = PaddleNaming("InternVL2", (
    ("mlp1", ("model.multi_modal_projector",)),
    ("vision_model", ("model.vision_tower",)),
    ("language_model.model.", ("model.language_model.",)),
    ("attention.wqkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("attention.wo", ("self_attn.o_proj",)),
    ("feed_forward.w1", ("mlp.gate_proj",)),
    ("feed_forward.w3", ("mlp.up_proj",)),
    ("feed_forward.w2", ("mlp.down_proj",)),
))
BLIP2 = PaddleNaming("BLIP-2", (
    ("language_model.opt.", ("language_model.model.",)),  # PaddleNLP's OPTForCausalLM keeps its decoder in `opt`
    ("visual_encoder", ("vision_model",)),
    ("Qformer", ("qformer",)),
))
VISUALGLM = PaddleNaming("VisualGLM", (  # BLIP-2's vision side with ChatGLM-6B as the language model
    ("query_key_value", ("language_model.*self_attn.q_proj", "language_model.*self_attn.k_proj",
                         "language_model.*self_attn.v_proj")),
    ("dense_h_to_4h", ("language_model.*fc1",)),
    ("dense_4h_to_h", ("language_model.*fc2",)),
))

# family name -> the PaddleMIX namings that a config for that family may use
PADDLE_NAMES: dict[str, tuple[PaddleNaming, ...]] = {
    "qwen2_vl": (QWEN_VL,), "qwen2_5_vl": (QWEN_VL,),
    "llava": (LLAVA, XCOMPOSER2), "llava_next": (LLAVA, XCOMPOSER2), "llava_onevision": (LLAVA, XCOMPOSER2),
    "internvl": (INTERNVL2,),
    "blip-2": (BLIP2, VISUALGLM),
}

FREEZE_KEYS = ("freeze_include", "freeze_exclude")
EXCLUDE_ONLY = ("in PaddleMIX, freeze_exclude alone makes trainable what the model froze when it loaded (e.g. "
                "InternLM-XComposer2's ViT); transformers models load fully trainable, so here it freezes nothing "
                "and everything trains, as it did there")
REGEX_KEYS = ("lora_target_modules",)


def renamed(pattern: str, naming: PaddleNaming, regex: bool) -> list[str]:
    """`pattern` with the naming's fragments replaced; a split module becomes a regex alternation, or
    several globs."""
    out = [pattern]
    for old, new in naming.renames:
        if old not in out[0]:
            continue
        if regex:
            out = [p.replace(old, alternation(new), 1) for p in out]
        else:
            out = [p.replace(old, n, 1) for p in out for n in new]
    return out if out != [pattern] else []


def alternation(names: tuple[str, ...]) -> str:
    """("self_attn.q_proj", "self_attn.k_proj") -> "self_attn.(q_proj|k_proj)"."""
    if len(names) == 1:
        return names[0]
    common = os.path.commonprefix(list(names))
    common = common[: common.rfind(".") + 1]
    return common + "(" + "|".join(n[len(common):] for n in names) + ")"


def _matches(pattern: str, names: list[str], regex: bool) -> bool:
    if regex:
        try:
            rx = re.compile(pattern)
        except re.error:
            return False
        return any(rx.fullmatch(n) for n in names)
    return any(fnmatch(n, pattern) for n in names)


def translate_pattern(pattern: str, names: list[str], namings: tuple[PaddleNaming, ...], regex: bool,
                      aliases: dict[str, str] | None = None) -> tuple[list[str], str] | None:
    """(patterns to write instead, why) for a pattern that matches none of `names`; None when no known naming
    explains the miss. `aliases` maps tied parameter names (a head tied to the embeddings) to the one name the
    model reports for that tensor."""
    for naming in namings:
        new = renamed(pattern, naming, regex)
        if new and all(_matches(p, names, regex) for p in new):
            return new, f"PaddleMIX's {naming.model} naming"
    tied = sorted({real for alias, real in (aliases or {}).items() if fnmatch(alias, pattern)})
    if tied and not regex:
        return tied, "a tied weight: one tensor, reported under its first name"
    return None


def tied_aliases(model) -> dict[str, str]:
    """Parameter names that `named_parameters()` hides because the tensor is shared (tied) -> the name it shows."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(param), name)
    return {name: first[id(param)] for name, param in model.named_parameters(remove_duplicate=False)
            if first[id(param)] != name}


def paddle_name_hint(model, family, mix, key: str) -> str:
    """The corrected key(s), ready to paste, when PaddleMIX naming explains why `key`'s patterns match nothing;
    "" otherwise. Freeze globs are answered for both freeze keys at once."""
    from mixtune.train.lora import original_name

    namings = PADDLE_NAMES.get(family.name, ())
    keys = FREEZE_KEYS if key in FREEZE_KEYS else (key,) if key in REGEX_KEYS else ()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = list(dict.fromkeys(original_name(n) for n, _ in base.named_parameters()))
    modules = [original_name(n + ".x")[:-2] for n, _ in base.named_modules() if n]
    aliases = tied_aliases(base)
    fixes, reasons = {}, []
    for k in keys:
        value = getattr(mix, k, None)
        patterns = [value] if isinstance(value, str) else list(value or [])
        regex = k in REGEX_KEYS
        names = modules if regex else params
        fixed, changed = [], False
        for pattern in patterns:
            found = None if _matches(pattern, names, regex) else translate_pattern(pattern, names, namings, regex,
                                                                                     aliases)
            if found:
                fixed.extend(found[0])
                reasons.append(f"'{pattern}' is {found[1]}")
                changed = True
            else:
                fixed.append(pattern)
        if changed:
            fixes[k] = fixed
    if not fixes:
        return ""
    paste = ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in fixes.items())
    if "freeze_exclude" in fixes and not mix.freeze_include:
        reasons.append(EXCLUDE_ONLY)
    return f"\n{'; '.join(reasons)}. For this {family.name} model write:\n  {paste}"


def with_paddle_name_hint(error: ConfigError, model, family, mix) -> ConfigError:
    """`error` unchanged, plus the translated patterns when PaddleMIX naming explains it."""
    hint = paddle_name_hint(model, family, mix, error.key or "")
    if not hint:
        return error
    message = str(error).removeprefix(f"config key '{error.key}': ")
    return ConfigError(message + hint, key=error.key)


def read_as_paddlemix(model, family, mix) -> list[str]:
    """For a native port that keeps the published names where PaddleMIX renamed (`Family.paddle_names`): each
    freeze glob and LoRA regex that selects something among PaddleMIX's names, and not the same thing among ours, is
    replaced by exactly what it selects there, so a PaddleMIX config trains the same modules. Notes for the log."""
    from mixtune.train.lora import exact_regex

    if family.paddle_names is None:
        return []
    params = [n for n, _ in model.named_parameters()]
    modules = [n for n, m in model.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    notes = []
    for key in (*FREEZE_KEYS, *REGEX_KEYS):
        value = getattr(mix, key, None)
        patterns = [value] if isinstance(value, str) else list(value or [])
        regex = key in REGEX_KEYS
        names = modules if regex else params
        out, changed = [], False
        for pattern in patterns:
            if regex and (pattern == "all-linear" or pattern in family.named_parts()):
                out.append(pattern)
                continue
            ours = [n for n in names if _matches(pattern, [n], regex)]
            theirs = [n for n in names if any(_matches(pattern, [p], regex) for p in family.paddle_names(n))]
            if not theirs or theirs == ours:
                out.append(pattern)
                continue
            out.extend([exact_regex(theirs, names)] if regex else theirs)
            changed = True
            notes.append(f"{key} '{pattern}' read with PaddleMIX's {family.name} names: {len(theirs)} "
                         f"{'modules' if regex else 'parameters'} (with the published names it would select "
                         f"{len(ours)})")
        if changed:
            setattr(mix, key, out)
    return notes
