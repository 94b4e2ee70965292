"""Liger kernels: transformers' own `use_liger_kernel` (TrainingArguments), checked before anything loads.

The Trainer patches the model with Liger's Triton kernels when training starts (RMSNorm, RoPE, SwiGLU and a
fused linear + cross-entropy, so the (tokens, vocab) logits are never materialised). Those kernels run only
on a CUDA GPU, and only for the model types Liger has patches for (its `MODEL_TYPE_TO_APPLY_LIGER_FN`); for
any other model transformers would warn and train unpatched. mixtune says so in one line instead, when the
config is read. With Liger the fused loss already skips the logits, so `labelled_logits_only` stands aside
(the Trainer passes Liger's forward no `logits_to_keep` mask).
"""

from __future__ import annotations

import importlib.util

import torch

from mixtune.errors import ConfigError

INSTALL = "pip install 'mixtune[liger]'"


def liger_model_types() -> set[str]:
    """The model types Liger patches, from the installed liger-kernel."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return set(MODEL_TYPE_TO_APPLY_LIGER_FN)


def check_liger(use_liger_kernel: bool, use_cpu: bool, model_name_or_path: str) -> None:
    """One clear line for `use_liger_kernel: true` where it cannot run: no CUDA GPU, liger-kernel not installed,
    or a model family Liger has no kernels for."""
    if not use_liger_kernel:
        return
    if use_cpu or not torch.cuda.is_available():
        raise ConfigError("needs a CUDA GPU (Liger's kernels are Triton GPU kernels); set it to false to train on "
                          "the CPU", key="use_liger_kernel")
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"needs liger-kernel, which is not installed: {INSTALL}", key="use_liger_kernel")
    from mixtune.models.registry import family_for_checkpoint

    check_family(family_for_checkpoint(model_name_or_path))


def check_family(family) -> None:
    supported = liger_model_types()
    if not set(family.model_types) & supported:
        raise ConfigError(f"Liger has no kernels for the {family.name} family (model type "
                          f"{', '.join(family.model_types)}); set it to false", key="use_liger_kernel")
