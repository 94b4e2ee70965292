"""Logits and loss only at the positions that carry a label.

In VQA-style SFT most positions are prompt and image tokens: their logits (a (tokens, vocab) tensor, the
largest activation of a small model's step) are computed, kept for backward and then multiplied by zero in
the loss. transformers' conditional-generation classes take `logits_to_keep` as a boolean (B, L) mask and
project only those hidden states through `lm_head` (`slice_logits_to_keep`), and their causal-LM loss takes
`shift_labels`, the targets already shifted. Position t is kept when labels[t + 1] carries a label (the same
shift the loss applies), so the loss is the same mean over the same targets, and the gradients are the same.
Packed rows need nothing more: the collator already masks each sample's first label.
"""

from __future__ import annotations

import inspect
import sys

import torch

from mixtune.data.encode import IGNORE_INDEX


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` as a boolean mask (under a peft wrapper: the base
    model's): its module slices through transformers' `slice_logits_to_keep`, and that reads a 2-D bool mask
    (older transformers 5 releases sliced by an int or 1-D indices only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return False
    slicer = getattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep", None)
    if slicer is None:
        return False
    try:
        probe = slicer(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except Exception:
        return False
    return tuple(probe.shape) == (2, 1)


def keep_labelled_positions(inputs: dict) -> dict:
    """The batch with `logits_to_keep` (positions whose next token is a label) and `shift_labels` (those
    labels, flat) added; the model then returns logits of shape (kept, vocab) and the loss over them."""
    labels = inputs["labels"]
    shifted = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    keep = shifted != IGNORE_INDEX
    return {**inputs, "logits_to_keep": keep, "shift_labels": shifted[keep]}
