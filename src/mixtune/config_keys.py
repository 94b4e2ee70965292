"""`mixtune keys`: every key a config accepts, with its type, default and meaning, read from the schema itself.

Four groups: mixtune's own keys (`MixtuneArgs`), transformers' `TrainingArguments` fields (with mixtune's
changed defaults and fixed values), the PaddleMIX / PaddleNLP names and what each becomes (paddle_compat.py),
and the keys of one dataset entry. Nothing here is a second copy of the schema: the names, types and
defaults come from the dataclasses and tables that `load_config` checks against, so the listing cannot
drift from what is accepted (tests/test_keys.py compares them).
"""

from __future__ import annotations

import dataclasses
import enum
import shutil
import textwrap
import types
import typing
from dataclasses import dataclass

MIXTUNE, TRAINING, PADDLE, ENTRY = ("mixtune's own keys", "training arguments (transformers' TrainingArguments)",
                                    "PaddleMIX / PaddleNLP names (read as the key they map to)",
                                    "dataset entry keys (each entry of dataset.train / dataset.eval)")
GROUPS = (MIXTUNE, TRAINING, PADDLE, ENTRY)

# What an alias's value becomes, where it is not simply copied (paddle_compat.ALIASES' transforms).
ALIAS_VALUES = {
    "warmup_ratio": "the same value: transformers 5 reads warmup_steps below 1 as a ratio of all steps",
    "use_flash_attention": "true -> attn_implementation: flash_attention_2; false -> the model's default",
    "group_by_modality_length": "true -> train_sampling_strategy: group_by_length; false -> random",
}
SCHEDULE_HELP = {
    "lr_scheduler_name": "PaddleMIX's 'CosineDecayWithWarmup' (BLIP-2) -> lr_scheduler_type "
                         "cosine_warmup_with_min_lr (defaults eta_min 1e-5, warmup_start_lr 1e-6)",
    "eta_min": "the cosine floor -> lr_scheduler_kwargs.min_lr (cosine_with_min_lr)",
    "warmup_start_lr": "where the warm-up starts -> lr_scheduler_kwargs.warmup_lr_rate = warmup_start_lr / "
                       "learning_rate",
}
ENTRY_HELP = {
    "data_files": "a path, a glob or a list of them, relative to the config file's folder",
    "chat_template": "a Jinja file, transformers' chat_template.json or PaddleMIX's chat_template.json",
    "ratio": "sampling weight relative to the entry's size, redrawn each epoch (0.5: half its samples)",
    "repeat": "each sample exactly this many times per epoch",
    "max_samples": "the entry's first N samples",
    "image_root": "folder for relative image paths (default: the data file's folder)",
    "prompt": "coco_caption: the user turn (default 'Describe the image briefly.'); vqa: a template with "
              "{question}; zero-shot eval: a template with {label}",
    "columns": "hf / hf_label: mixtune field -> column name",
    "min_pixels": "each image is resized (aspect kept) to at least this many pixels",
    "max_pixels": "each image is resized (aspect kept) to at most this many pixels",
    "truncation": "this entry's `truncation` (drop or downscale)",
    "on_bad_sample": "this entry's `on_bad_sample` (error or skip)",
    "strict_fields": "this entry's `strict_fields`",
    "max_sample_bytes": "this entry's `max_sample_bytes`",
    "fps": "video frames kept per second of video (default 2)",
    "min_frames": "fewest frames per video (default 2; a shorter video repeats frames)",
    "max_frames": "most frames per video (default 32), spread evenly",
    "video_max_pixels": "pixels per video frame (frames shrink, aspect kept)",
    "video_total_pixels": "pixels over all kept frames of one video",
    "max_audio_seconds": "a longer audio clip is a bad sample (default and ceiling: what the feature extractor "
                         "reads)",
}


@dataclass(frozen=True)
class KeyInfo:
    group: str
    key: str
    type: str
    default: str  # "" where the key has none worth showing (aliases)
    help: str

    def matches(self, word: str) -> bool:
        word = word.lower()
        return any(word in text.lower() for text in (self.key, self.help, self.type))


def type_name(annotation) -> str:
    """`list[str] | None` -> 'list[str] | None'; enums by their values ('linear | cosine | ...')."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " | ".join(dict.fromkeys(type_name(a) for a in typing.get_args(annotation)))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [str(e.value) for e in annotation]
        return " | ".join(values[:6]) + (" | ..." if len(values) > 6 else "")
    if typing.get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    return repr(getattr(value, "value", value))


def one_line(text: str) -> str:
    return " ".join(str(text or "").split())


def mixtune_keys() -> list[KeyInfo]:
    from mixtune.config import MixtuneArgs

    hints = typing.get_type_hints(MixtuneArgs)
    rows = [KeyInfo(MIXTUNE, f.name, type_name(hints[f.name]), default_text(f), one_line(f.metadata.get("help")))
            for f in dataclasses.fields(MixtuneArgs)]
    rows.append(KeyInfo(MIXTUNE, "overwrite_output_dir", "bool", "False",
                        "start a fresh run in a non-empty output_dir: the previous run's checkpoints, final model, "
                        "metrics and reports are deleted"))
    return rows


def training_keys() -> list[KeyInfo]:
    from mixtune.config import MANAGED, TRAINING_DEFAULTS, _training_fields

    rows = []
    for name, f in _training_fields().items():
        default = default_text(f)
        if name in MANAGED:
            default = f"{MANAGED[name]!r} (fixed by mixtune: its collator builds the model inputs)"
        elif name in TRAINING_DEFAULTS:
            default = f"{TRAINING_DEFAULTS[name]!r} (mixtune's; transformers' is {default})"
        rows.append(KeyInfo(TRAINING, name, type_name(f.type), default, one_line(f.metadata.get("help"))))
    return rows


def paddle_keys() -> list[KeyInfo]:
    from mixtune.paddle_compat import ALIASES, NO_OP_KEYS, SCHEDULE_KEYS

    rows = []
    for alias, (target, transform) in ALIASES.items():
        how = ALIAS_VALUES.get(alias, "the same value") if transform else "the same value"
        rows.append(KeyInfo(PADDLE, alias, f"-> {target}", "", f"read as `{target}`: {how}"))
    for key in SCHEDULE_KEYS:
        rows.append(KeyInfo(PADDLE, key, "-> lr_scheduler_type", "", SCHEDULE_HELP.get(key, "PaddleMIX's schedule")))
    for key, why in NO_OP_KEYS.items():
        rows.append(KeyInfo(PADDLE, key, "accepted, no effect", "", one_line(why)))
    return rows


def entry_keys() -> list[KeyInfo]:
    from mixtune.data.dataset import ENTRY_KEYS
    from mixtune.data.formats import READERS, _load_builtin_readers

    _load_builtin_readers()
    helps = {**ENTRY_HELP, "name": f"the reader, one of: {', '.join(sorted(READERS))}"}
    return [KeyInfo(ENTRY, key, "", "", helps.get(key, "see README.md, 'Dataset formats and mixing'"))
            for key in sorted(ENTRY_KEYS)]


def all_keys() -> list[KeyInfo]:
    return mixtune_keys() + training_keys() + paddle_keys() + entry_keys()


def format_keys(rows: list[KeyInfo], width: int | None = None) -> str:
    """Grouped, one key per entry: its name with type and default, then its meaning indented below."""
    width = width or min(shutil.get_terminal_size((100, 20)).columns, 120)
    out: list[str] = []
    for group in GROUPS:
        members = [r for r in rows if r.group == group]
        if not members:
            continue
        out.append(f"{group} ({len(members)}):")
        for r in members:
            details = ", ".join(x for x in (r.type, f"default {r.default}" if r.default else "") if x)
            out.append(f"  {r.key}" + (f"  ({details})" if details else ""))
            if r.help:
                out.extend(textwrap.wrap(r.help, width, initial_indent="      ", subsequent_indent="      "))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def listing(search: str | None = None) -> tuple[str, int]:
    """(text, number of keys shown) for `mixtune keys [--search WORD]`."""
    rows = all_keys()
    if search:
        rows = [r for r in rows if r.matches(search)]
    if not rows:
        return f"no config key matches {search!r}\n", 0
    return format_keys(rows), len(rows)
