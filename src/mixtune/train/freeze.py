"""`freeze_include` / `freeze_exclude`: fnmatch globs over parameter names (PaddleMIX's meaning).

A parameter is frozen when its name matches at least one `freeze_include` glob and no `freeze_exclude`
glob. So `freeze_include: ["*visual*"], freeze_exclude: ["*visual.merger*"]` freezes the vision tower but
keeps its merger (the projector) trainable. `freeze_exclude` alone freezes nothing. Globs use Python's
`fnmatch`: `*` matches any characters, dots included.

`freeze_vision`, `freeze_projector`, `freeze_language` freeze whole parts of the model by the family's
globs. They add to `freeze_include` (a parameter is frozen if a shortcut or an include glob selects it),
and `freeze_exclude` still keeps matching parameters trainable, so `freeze_language: true` with
`freeze_exclude: ["lm_head.*"]` trains the vision side and the output head. Each parameter belongs to
exactly one part: the projector's globs win over the vision tower's, because some projectors live inside
the vision tower's module (Qwen-VL's `model.visual.merger`), so `freeze_vision` leaves such a projector
trainable.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from fnmatch import fnmatch

from mixtune.errors import ConfigError

log = logging.getLogger("mixtune")


def frozen_names(names: list[str], include: list[str] | None, exclude: list[str] | None) -> set[str]:
    include, exclude = include or [], exclude or []
    for key, globs in (("freeze_include", include), ("freeze_exclude", exclude)):
        for glob in globs:
            if not any(fnmatch(n, glob) for n in names):
                sample = ", ".join(names[:3] + names[-2:])
                raise ConfigError(f"glob '{glob}' matches no parameter; parameter names look like: {sample}",
                                  key=key)
    return {n for n in names
            if any(fnmatch(n, g) for g in include) and not any(fnmatch(n, g) for g in exclude)}


PARTS = ("vision", "projector", "language")  # the chat families' parts
# every `freeze_<part>` key of the config; which parts a model has is its family's `named_parts`
FREEZE_SHORTCUTS = PARTS + ("text", "backbone", "head", "text_encoder")


def part_of(name: str, family) -> str | None:
    """Which named part of the family's model a parameter belongs to: the first part whose globs match (for
    the chat families the projector's globs win over the vision tower's)."""
    for part, globs in family.named_parts().items():
        if any(fnmatch(name, g) for g in globs):
            return part
    return None


def requested_parts(mix, family) -> tuple[str, ...]:
    """The parts named by true `freeze_<part>` keys; a part the family does not have is a config error."""
    asked = tuple(k.removeprefix("freeze_") for k, v in vars(mix).items() if k.startswith("freeze_") and v is True)
    parts = family.named_parts()
    for part in asked:
        if part not in parts:
            raise ConfigError(f"the {family.name} family has no '{part}' part; its parts: {', '.join(parts)}",
                              key=f"freeze_{part}")
    return asked


def apply_freeze(model, include: list[str] | None, exclude: list[str] | None, family=None,
                 parts: tuple[str, ...] = ()) -> None:
    """Freeze by globs and by whole named parts of the family's model (`Family.named_parts`)."""
    if exclude and not include and not parts:
        log.warning("freeze_exclude without freeze_include freezes nothing")
    names = [n for n, _ in model.named_parameters()]
    frozen = frozen_names(names, include, exclude)
    if parts:
        by_part = {n for n in names if part_of(n, family) in parts}
        if not by_part:
            raise ConfigError(f"freeze_{'/'.join(parts)} selects no parameter of this {family.name} model",
                              key=f"freeze_{parts[0]}")
        frozen |= {n for n in by_part if not any(fnmatch(n, g) for g in exclude or [])}
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


def trainable_summary(model, depth: int = 2) -> str:
    """'trainable 1.2M of 3.4M parameters (35.3%)' plus a line per module group of `depth` name parts."""
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        key = ".".join(name.split(".")[:depth])
        numel = getattr(param, "ds_numel", None) or param.numel()  # ZeRO-3 leaves each rank a shard
        groups[key][1] += numel
        if param.requires_grad:
            groups[key][0] += numel
    trainable = sum(g[0] for g in groups.values())
    total = sum(g[1] for g in groups.values())
    lines = [f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.1f}%)"]
    for key, (t, n) in groups.items():
        lines.append(f"  {key}: {t:,} / {n:,} trainable")
    return "\n".join(lines)
