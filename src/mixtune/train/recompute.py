"""Activation checkpointing per part: `recompute` (transformers' `activation_checkpointing`) and
`recompute_vision`.

transformers' `activation_checkpointing_enable` switches on every module that has a `gradient_checkpointing`
flag, the vision tower's blocks included. `recompute_vision` decides the vision tower on its own: with
`recompute: true, recompute_vision: false` only the language model recomputes (a vision tower whose
activations are small next to the language model's is then not run twice); `recompute: false,
recompute_vision: true` recomputes only the vision tower (high-resolution images, many patches).
Unset, `recompute_vision` follows `recompute`, as transformers does.
"""

from __future__ import annotations

import functools

import torch
from transformers import TrainerCallback

from mixtune.train.freeze import part_of


def is_vision_module(name: str, family) -> bool:
    return part_of(f"{name}.weight", family) in ("vision", "projector")


def set_part_checkpointing(model, family, *, language: bool, vision: bool) -> list[str]:
    """Switch each module's checkpointing flag by the part it lies in; returns the modules switched on.
    Checkpointing is torch's non-reentrant kind (transformers' default), which needs no input that requires
    grad, so frozen parts stay free of autograd."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    default = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    on = []
    for name, module in base.named_modules():
        if not hasattr(module, "gradient_checkpointing"):
            continue
        enable = vision if is_vision_module(name, family) else language
        if enable and getattr(module, "_gradient_checkpointing_func", None) is None:
            module._gradient_checkpointing_func = default
        module.gradient_checkpointing = enable
        if enable:
            on.append(name)
    return on


class PartCheckpointing(TrainerCallback):
    """Applies `recompute_vision` after the Trainer has run transformers' activation_checkpointing_enable."""

    def __init__(self, family, language: bool, vision: bool):
        self.family, self.language, self.vision = family, language, vision

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        set_part_checkpointing(model, self.family, language=self.language, vision=self.vision)


def keep_frozen_vision_out_of_autograd(model, family) -> None:
    """With activation checkpointing, transformers makes the output of *every* input embedding it finds
    require grad (`enable_input_require_grads`, for reentrant checkpointing under LoRA), the vision tower's
    patch embedding included. A frozen vision tower then records autograd through all its blocks and backward
    runs through them for nothing. This drops that hook from the vision tower when none of its parameters
    (projector aside: it lies after the blocks) trains at the time checkpointing is switched on."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = getattr(base, "enable_input_require_grads", None)
    if original is None or not getattr(family, "vision", None):  # not a transformers model, or no vision part
        return

    def enable_input_require_grads():
        original()
        named = list(base.named_parameters())
        if any(p.requires_grad and part_of(n, family) == "vision" for n, p in named):
            return
        vision = [m for n, m in base.named_modules() if part_of(f"{n}.weight", family) == "vision"]
        kept = []
        for handle in getattr(base, "_require_grads_hooks", []):
            if any(handle.id in m._forward_hooks for m in vision):
                handle.remove()
            else:
                kept.append(handle)
        base._require_grads_hooks = kept

    base.enable_input_require_grads = enable_input_require_grads


def apply_recompute(trainer, family, recompute_vision: bool | None) -> None:
    """Called once on a built trainer: frozen vision stays out of autograd under checkpointing, and
    `recompute_vision`, when set, decides the vision tower's checkpointing apart from the language model's."""
    keep_frozen_vision_out_of_autograd(trainer.model, family)
    if recompute_vision is not None:
        trainer.add_callback(PartCheckpointing(family, language=bool(trainer.args.activation_checkpointing),
                                               vision=recompute_vision))
