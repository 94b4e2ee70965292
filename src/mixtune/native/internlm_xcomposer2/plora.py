"""Partial LoRA (PLoRA), InternLM-XComposer2's linear layer: a plain linear everywhere, plus a rank-r update
`Plora_B(Plora_A(x)) * alpha / r` added only at image-token positions (`im_mask`).

Called as published, `layer(x, im_mask)`; InternLM2's decoder (mixtune.native.internlm2) passes its
`linear_kwargs` ({"im_mask": mask}) to every projection it builds with `InternLM2Model.linear_class`, so this
class slots in there. peft's LoRA calls its base layer with the same arguments, so a peft LoRA on `wqkv` wraps
this layer and both updates apply. Parameter names are the published ones: `weight` (and `bias`),
`Plora_A.weight`, `Plora_B.weight`. Rank 256, alpha 256 and dropout 0.05 are what the published model builds.
"""

from __future__ import annotations

import torch
from torch import nn

PLORA_R, PLORA_ALPHA, PLORA_DROPOUT = 256, 256, 0.05


class PLoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, lora_r: int = PLORA_R,
                 lora_alpha: float = PLORA_ALPHA, lora_dropout: float = PLORA_DROPOUT):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_r, self.lora_alpha = lora_r, lora_alpha
        self.lora_scaling = lora_alpha / lora_r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.Plora_A = nn.Linear(in_features, lora_r, bias=False)
        self.Plora_B = nn.Linear(lora_r, out_features, bias=False)

    def partial_update(self, x: torch.Tensor) -> torch.Tensor:
        return self.Plora_B(self.Plora_A(self.lora_dropout(x))) * self.lora_scaling

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if im_mask is None:
            return out
        if im_mask.shape != x.shape[:-1]:
            raise ValueError(f"PLoRA: im_mask has shape {tuple(im_mask.shape)} but the input has "
                             f"{tuple(x.shape[:-1])} tokens")
        im_mask = im_mask.bool()
        if bool(im_mask.any()):
            return out.index_put((im_mask,), self.partial_update(x[im_mask]).to(out.dtype), accumulate=True)
        if self.training and torch.is_grad_enabled():
            # as published: a batch without images still involves Plora_A / Plora_B (times 0), so every process
            # of a distributed run produces gradients for the same parameters
            return out + self.partial_update(x[..., :1, :]).sum().to(out.dtype) * 0
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", lora_r={self.lora_r}, lora_alpha={self.lora_alpha}"
