"""Per-part learning rates: `vision_lr`, `projector_lr`, `language_lr` (PaddleMIX's `mm_projector_lr`).

Each trainable parameter belongs to at most one part of the family's model (train/freeze.py `part_of`; LoRA
adapters and `lora_modules_to_save` copies belong to the part of the module they wrap). The Trainer's two
weight-decay groups are split further by part: a part with its own rate gets parameter groups carrying that
`lr`; everything else keeps `learning_rate`. The scheduler scales every group's rate by the same factor, so
each part follows the configured schedule at its own height (a `cosine_with_min_lr` floor is the same
fraction of each part's rate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mixtune.errors import ConfigError
from mixtune.train.freeze import PARTS, part_of

log = logging.getLogger("mixtune")


@dataclass
class PartRates:
    rates: dict[str, float]  # part -> learning rate, only the parts the config gives
    family: object
    lora: bool = False

    @classmethod
    def from_config(cls, mix, family) -> PartRates | None:
        rates = {p: getattr(mix, f"{p}_lr") for p in PARTS if getattr(mix, f"{p}_lr", None) is not None}
        return cls(rates, family, mix.lora) if rates else None

    def part(self, name: str) -> str | None:
        if self.lora:
            from mixtune.train.lora import original_name

            name = original_name(name)
        part = part_of(name, self.family)
        return part if part in self.rates else None


def part_param_groups(model, decay_names: set[str], weight_decay: float, rates: PartRates) -> list[dict]:
    """The Trainer's decay / no-decay groups, split by part; groups of a part carry its `lr` and `part` name."""
    groups: dict[tuple[str | None, bool], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((rates.part(name), name in decay_names), []).append(param)
    out = []
    for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] or "", not kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if part is not None:
            group.update(lr=rates.rates[part], part=part)
        out.append(group)
    return out


def create_part_optimizer(trainer, model, rates: PartRates):
    """What `Trainer.create_optimizer` builds, with the groups split by part."""
    from transformers.trainer import is_optimizer_factory

    groups = part_param_groups(model, set(trainer.get_decay_parameter_names(model)), trainer.args.weight_decay,
                               rates)
    if trainer.optimizer_cls_and_kwargs is not None:
        optimizer_cls, kwargs = trainer.optimizer_cls_and_kwargs
    else:
        optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
        raise ConfigError(f"optim '{trainer.args.optim}' builds its own parameter groups, so per-part learning "
                          f"rates ({', '.join(f'{p}_lr' for p in rates.rates)}) cannot be applied; remove them or "
                          "choose another optim", key="optim")
    log_groups(groups, rates, trainer.args.learning_rate)
    return optimizer_cls(groups, **kwargs)


def log_groups(groups: list[dict], rates: PartRates, default_lr: float) -> None:
    counts: dict[str | None, int] = {}
    for g in groups:
        counts[g.get("part")] = counts.get(g.get("part"), 0) + sum(p.numel() for p in g["params"])
    lines = [f"  {part}: lr {rates.rates[part]:g}, {counts[part]:,} trainable parameters"
             for part in rates.rates if part in counts]
    if None in counts:
        lines.append(f"  everything else: lr {default_lr:g}, {counts[None]:,} trainable parameters")
    log.info("learning rates per part:\n%s", "\n".join(lines))
    for part in rates.rates:
        if part not in counts:
            log.warning("'%s_lr' has no effect: no trainable parameter belongs to the %s%s", part, part,
                        " (with lora: true, list it in lora_modules_to_save or target its modules)"
                        if rates.lora else "")
