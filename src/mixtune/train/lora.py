"""LoRA: turn the config's `lora*` keys into a peft model, resolving every target to exact module names.

`lora_target_modules` are regexes matched with `re.fullmatch` against full module names (PaddleMIX's
meaning: `".*attn.c_attn.*"` matches `transformer.h.0.attn.c_attn`), plus the shorthand `all-linear`: every
linear layer of the language model except the output head (the vision tower and projector are left alone;
add a regex for them). Without targets, the family's default applies: the language model's attention and
MLP projections. `lora_modules_to_save` names modules trained fully beside the adapters: regexes over full
module names, or the family part names `projector` / `vision`.

We resolve the names ourselves rather than handing peft the user's patterns, so that a pattern that
matches nothing is an error showing real names, modules LoRA cannot wrap (a whole attention block, a
norm) are skipped instead of failing inside peft, and the log can say exactly which modules got adapters.
peft then receives one regex that matches exactly the resolved set, and we check that it did.

Freezing under LoRA: peft freezes every base weight; adapters and `lora_modules_to_save` copies train.
`freeze_include` / `freeze_exclude` are applied afterwards over the same names as without LoRA, and can
only freeze more (e.g. adapters on the vision tower); they never unfreeze a base weight.
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from fnmatch import fnmatch

from torch import nn

from mixtune.errors import ConfigError
from mixtune.train.freeze import frozen_names

log = logging.getLogger("mixtune")

ALL_LINEAR = "all-linear"
PART_NAMES = ("projector", "vision")  # family parts usable in lora_modules_to_save
PEFT_PREFIX = "base_model.model."


def _wrappable_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    # the layer types peft's LoRA can replace (quantised Linear variants subclass nn.Linear)
    return nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D


def _sample_names(names: list[str], k: int = 8) -> str:
    """A few real names spread over the model: one per distinct structure, first layer only."""
    firsts = [n for n in names if all(p == "0" for p in n.split(".") if p.isdigit())] or names
    step = max(1, len(firsts) // k)
    return ", ".join(firsts[::step][:k])


def _as_list(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"'{pattern}' is not a valid regex: {e}", key=key) from None


def all_linear_language(model, family) -> list[str]:
    """Every linear layer of the language model (the family's `language` globs), the output head excepted."""
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head
            and any(fnmatch(f"{name}.weight", g) for g in family.language)]


def resolve_targets(model, family, patterns) -> list[str]:
    """The exact module names that get adapters, in model order."""
    key = "lora_target_modules"
    if not patterns:
        patterns, key = [family.lora_targets], f"family '{family.name}' default LoRA targets"
    modules = {name: module for name, module in model.named_modules() if name}
    wrappable = _wrappable_types()
    leaf_names = [n for n, m in modules.items() if isinstance(m, wrappable)]
    chosen: set[str] = set()
    for pattern in _as_list(patterns):
        if pattern == ALL_LINEAR:
            found = all_linear_language(model, family)
            if not found:
                raise ConfigError(f"'{ALL_LINEAR}' found no linear layer under the language model "
                                  f"({', '.join(family.language)})", key=key)
            chosen.update(found)
            continue
        rx = _compile(pattern, key)
        matched = [n for n in modules if rx.fullmatch(n)]
        usable = [n for n in matched if isinstance(modules[n], wrappable)]
        if not usable:
            what = (f"matches only modules LoRA cannot wrap ({_sample_names(matched, 4)})" if matched
                    else "matches no module")
            hint = ""
            if not matched and any(rx.search(n) for n in modules):
                hint = f"; patterns must match the whole name, e.g. '.*{pattern}'"
            raise ConfigError(f"pattern '{pattern}' {what}{hint}. Module names LoRA can wrap look like: "
                              f"{_sample_names(leaf_names)}", key=key)
        if len(usable) < len(matched):
            log.info("lora: '%s' also matches %d module(s) LoRA cannot wrap, skipped (e.g. %s)", pattern,
                     len(matched) - len(usable), _sample_names([n for n in matched if n not in usable], 3))
        chosen.update(usable)
    return [n for n in modules if n in chosen]


def resolve_modules_to_save(model, family, entries) -> list[str]:
    """Outermost modules named by `lora_modules_to_save` (regexes or family part names)."""
    if not entries:
        return []
    key = "lora_modules_to_save"
    names = [n for n, _ in model.named_modules() if n]
    params = [n for n, _ in model.named_parameters()]
    chosen: set[str] = set()
    for entry in _as_list(entries):
        if entry in family.named_parts():
            globs = family.named_parts()[entry]
            matched = [m for m in names
                       if (own := [p for p in params if p.startswith(m + ".")])
                       and all(any(fnmatch(p, g) for g in globs) for p in own)]
        else:
            rx = _compile(entry, key)
            matched = [n for n in names if rx.fullmatch(n)]
        if not matched:
            raise ConfigError(f"'{entry}' matches no module. Use a regex over full module names or one of "
                              f"{list(family.named_parts())}; module names look like: {_sample_names(names)}", key=key)
        chosen.update(matched)
    # a module inside another chosen module is saved with it
    return [n for n in names if n in chosen and not any(n.startswith(c + ".") for c in chosen)]


def exact_regex(chosen: list[str], all_names: list[str]) -> str:
    """One regex that fullmatches exactly `chosen` among `all_names`: layer indices folded to \\d+ when exact."""
    templates = dict.fromkeys(r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in n.split("."))
                              for n in chosen)
    regex = "|".join(templates)
    if {n for n in all_names if re.fullmatch(regex, n)} != set(chosen):  # e.g. only some layers chosen
        regex = "|".join(re.escape(n) for n in chosen)
    return regex


def compact_names(names: list[str]) -> list[str]:
    """`layers.0.q_proj`, `layers.1.q_proj` -> `layers.{0-1}.q_proj`: every name, shorter, nothing lost."""
    groups: dict[tuple, list[tuple]] = defaultdict(list)
    for name in names:
        parts = name.split(".")
        groups[tuple(None if p.isdigit() else p for p in parts)].append(tuple(int(p) for p in parts if p.isdigit()))
    lines = []
    for template, indices in groups.items():
        values = [sorted({ix[i] for ix in indices}) for i in range(len(indices[0]))]
        if math.prod(len(v) for v in values) == len(set(indices)):  # a full grid: one line says it all
            lines.append(_fill(template, [_ranges(v) for v in values]))
        else:
            lines.extend(_fill(template, [str(i) for i in ix]) for ix in indices)
    return lines


def _fill(template: tuple, slots: list[str]) -> str:
    it = iter(slots)
    return ".".join(next(it) if p is None else p for p in template)


def _ranges(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    runs = [[values[0], values[0]]]
    for v in values[1:]:
        if v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return "{" + ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) + "}"


def build_lora_config(mix, targets: list[str], modules_to_save: list[str], all_names: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=mix.lora_rank, lora_alpha=mix.lora_alpha, lora_dropout=mix.lora_dropout,
                      target_modules=exact_regex(targets, all_names), modules_to_save=modules_to_save or None,
                      use_dora=mix.use_dora, use_rslora=mix.use_rslora)


def adapter_modules(peft_model) -> list[str]:
    """Module names (base model naming) that carry a LoRA layer after peft's injection."""
    from peft.tuners.lora import LoraLayer

    return [n for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)]


def apply_lora(model, family, mix):
    """Wrap `model` with LoRA adapters as the config says; returns the peft model."""
    from peft import get_peft_model

    all_names = [n for n, _ in model.named_modules() if n]
    to_save = resolve_modules_to_save(model, family, mix.lora_modules_to_save)
    targets = resolve_targets(model, family, mix.lora_target_modules)
    inside = [t for t in targets if any(t == s or t.startswith(s + ".") for s in to_save)]
    if inside:
        log.warning("lora: %d target module(s) lie inside lora_modules_to_save and are trained fully instead: %s",
                    len(inside), ", ".join(compact_names(inside)))
        targets = [t for t in targets if t not in inside]
        if not targets:
            raise ConfigError("every LoRA target lies inside lora_modules_to_save; nothing gets an adapter",
                              key="lora_target_modules")
    peft_model = get_peft_model(model, build_lora_config(mix, targets, to_save, all_names))
    got = adapter_modules(peft_model)
    if set(got) != set(targets):  # our resolution and peft's matching must agree exactly
        raise RuntimeError(f"peft put adapters on {sorted(set(got) ^ set(targets))} differently from the plan")
    kind = "DoRA" if mix.use_dora else "LoRA"
    log.info("lora: %s adapters (r=%d, alpha=%g, dropout=%g%s) on %d modules:\n  %s", kind, mix.lora_rank,
             mix.lora_alpha, mix.lora_dropout, ", rsLoRA scaling" if mix.use_rslora else "", len(got),
             "\n  ".join(compact_names(got)))
    if to_save:
        log.info("lora: trained fully beside the adapters: %s", ", ".join(to_save))
    apply_freeze_under_lora(peft_model, mix.freeze_include, mix.freeze_exclude)
    return peft_model


def original_name(peft_name: str) -> str:
    """A parameter's name as the user's freeze globs know it: peft's wrapper segments removed."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    return re.sub(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)", "", name)


def apply_freeze_under_lora(peft_model, include, exclude) -> None:
    """freeze_include / freeze_exclude after peft: they can freeze adapters, never unfreeze base weights.

    Globs see the original parameter names; adapter weights are named `<module>.lora_A.<adapter>.weight`."""
    if not include and not exclude:
        return
    params = [(original_name(n), n, p) for n, p in peft_model.named_parameters()]
    frozen = frozen_names(list(dict.fromkeys(n for n, _, _ in params)), include, exclude)
    for name, _, param in params:
        if name in frozen:
            param.requires_grad_(False)
    kept = [name for name, peft_name, param in params
            if exclude and not param.requires_grad and ".lora_" not in peft_name
            and ".modules_to_save." not in peft_name and ".original_module." not in peft_name
            and any(fnmatch(name, g) for g in exclude)]
    if kept:
        log.warning("lora: freeze_exclude matches %d base weight(s) (e.g. %s) that LoRA keeps frozen; list their "
                    "module in lora_modules_to_save to train it fully", len(kept), kept[0])
