"""InternViT (`InternVisionModel`) in plain PyTorch, with the published module names.

`embeddings.{class_embedding, patch_embedding, position_embedding}`, then `encoder.layers.N.{norm1, attn.qkv,
attn.q_norm, attn.k_norm, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2}`: pre-norm blocks whose two branches are
scaled per channel by the layer scales `ls1` / `ls2`; RMSNorm or LayerNorm by `norm_type`; the qk-norm variant
(InternViT-6B) normalises queries and keys over all heads together, as published. The position table is resized
bicubically when tiles are not `image_size` square.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from mixtune.native.internvl_chat.configuration_internvl_chat import InternVisionConfig


class InternRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def make_norm(config: InternVisionConfig, dim: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(dim, config.layer_norm_eps)
    return nn.LayerNorm(dim, eps=config.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim, self.image_size, self.patch_size = config.hidden_size, config.image_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, self.embed_dim))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        table = self.position_embedding[:, 1:]
        grid = self.image_size // self.patch_size
        if (height, width) == (grid, grid):
            return table
        table = table.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False)
        return table.reshape(1, -1, height * width).transpose(1, 2).to(self.position_embedding.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (B, D, h, w)
        batch, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        embeddings = torch.cat([self.class_embedding.expand(batch, 1, -1).to(dtype), patches], dim=1)
        positions = torch.cat([self.position_embedding[:, :1], self._patch_positions(height, width)], dim=1)
        return embeddings + positions.to(dtype)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"InternViT: hidden_size {self.embed_dim} must split into {self.num_heads} heads")
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attention_dropout = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, width).unbind(2)
        if self.qk_normalization:  # over all heads together, before the split
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, length, width)))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a sample's whole branch with probability p (the rest scaled up)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternVisionConfig, drop_path_rate: float):
        super().__init__()
        dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1, self.norm2 = make_norm(config, dim), make_norm(config, dim)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(dim))
        self.drop_path1, self.drop_path2 = DropPath(drop_path_rate), DropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path1(self.attn(self.norm1(hidden_states)) * self.ls1)
        return hidden_states + self.drop_path2(self.mlp(self.norm2(hidden_states)) * self.ls2)


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear, 0 to drop_path_rate
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config, rates[i]) for i in range(n))
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor, output_hidden_states: bool = False):
        states = [hidden_states] if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states)
            if states is not None:
                states.append(hidden_states)
        return hidden_states, states


class InternVisionPreTrainedModel(PreTrainedModel):
    config_class = InternVisionConfig
    config: InternVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = "vision_model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, InternVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=std)
            nn.init.normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            nn.init.constant_(module.ls1, self.config.initializer_factor)
            nn.init.constant_(module.ls2, self.config.initializer_factor)
        elif isinstance(module, InternRMSNorm):
            nn.init.ones_(module.weight)


class InternVisionModel(InternVisionPreTrainedModel):
    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False,
                **kwargs) -> BaseModelOutputWithPooling:
        if pixel_values.ndim != 4:
            raise ValueError(f"InternViT takes (tiles, 3, H, W) pixel values, got shape {tuple(pixel_values.shape)}")
        last, states = self.encoder(self.embeddings(pixel_values), output_hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=last[:, 0],
                                          hidden_states=tuple(states) if states is not None else None)
