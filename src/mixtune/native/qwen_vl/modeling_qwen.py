"""Qwen-VL (`QWenLMHeadModel`) in plain PyTorch, with the published checkpoint's module names.

A Qwen-7B language model (`transformer.wte`, `transformer.h.N.{ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.w1, mlp.w2, mlp.c_proj}`, `transformer.ln_f`, `lm_head`) reading a ViT (`transformer.visual`: `conv1`,
`positional_embedding`, `ln_pre`, `transformer.resblocks`, then the `attn_pool` cross-attention resampler
to `n_queries` vectors, `ln_post` and `proj`). An image is written in the text as `<img>` + n_queries
tokens + `</img>`; the language model's inputs at those n_queries positions are replaced by the image's
vectors (whatever tokens sit there). Names are kept so that PaddleMIX's configs (LoRA `.*attn.c_attn.*`,
freeze `*visual.attn_pool*`) select the same modules as on the original.

Unlike the published remote code, images come in as `pixel_values` (the processor reads them), never as
file paths decoded from token ids, and `position_ids` are honoured (so packed rows restart positions).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from mixtune.native.qwen_vl.configuration_qwen import QWenConfig

# ---------------------------------------------------------------- vision tower


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
    """(grid*grid, embed_dim) fixed 2-D sine-cosine table: half the channels encode the row, half the column."""
    def one_axis(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float32) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(embed_dim // 2, w), one_axis(embed_dim // 2, h)], axis=1)


def resize_positions(table: torch.Tensor, tokens: int) -> torch.Tensor:
    """A square (n, D) position table resized bicubically to `tokens` (a square number) rows."""
    src, tgt = int(math.sqrt(table.shape[0])), int(math.sqrt(tokens))
    if src == tgt:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(table.dtype)


class VisualAttention(nn.Module):
    """Self-attention over (seq, batch, width) with one fused `in_proj` laid out per head as [q | k | v]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq, batch, width = x.shape
        q, k, v = self.in_proj(x).view(seq, batch * self.heads, 3 * self.head_dim).transpose(0, 1).chunk(3, dim=-1)
        weights = torch.softmax((q / math.sqrt(self.head_dim)) @ k.transpose(1, 2), dim=-1)
        out = (weights @ v).view(batch, self.heads, seq, self.head_dim).permute(2, 0, 1, 3).reshape(seq, batch, width)
        return self.out_proj(out)


class VisualAttentionBlock(GradientCheckpointingLayer):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-6)
        self.ln_2 = nn.LayerNorm(width, eps=1e-6)
        self.attn = VisualAttention(width, heads)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(VisualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class Resampler(nn.Module):
    """`n_queries` learned queries (plus a fixed 2-D sin-cos position table) cross-attending to the ViT's patches
    (plus the same table resized to the patch grid): the vision-language adapter."""

    def __init__(self, grid: int, embed_dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(embed_dim, grid)).float(), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid * grid, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = resize_positions(self.pos_embed, x.shape[1])
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # (patches, batch, D)
        batch = x.shape[1]
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)
        out = self.attn(q + self.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x, need_weights=False)[0]
        return out.permute(1, 0, 2)


class VisionTransformer(nn.Module):
    """`transformer.visual`: (B, 3, S, S) pixels -> (B, n_queries, output_dim) vectors for the language model."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int, n_queries: int = 256, **_published_extras):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(256, width))  # 256: as published
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = TransformerBlock(width, layers, heads, mlp_ratio)
        # one head per 128 channels, as published (so output_dim must be at least 128)
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(output_dim ** -0.5 * torch.randn(output_dim, output_dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # (B, patches, width)
        x = self.ln_pre(x + resize_positions(self.positional_embedding, x.shape[1]))
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(self.attn_pool(x)) @ self.proj


# ---------------------------------------------------------------- language model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin for the first `dim` channels of each head at the given positions; `ntk_alpha` > 1 stretches the
    base (Qwen's dynamic NTK for prompts longer than `seq_length`)."""

    def __init__(self, dim: int, base: float):
        super().__init__()
        self.dim, self.base = dim, base

    def forward(self, position_ids: torch.Tensor, ntk_alpha: float, dtype: torch.dtype):
        base = self.base * ntk_alpha ** (self.dim / (self.dim - 2))
        inv_freq = 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                               device=position_ids.device) / self.dim)
        freqs = position_ids.float()[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.heads, self.head_dim = config.num_attention_heads, config.kv_channels
        projection = self.heads * self.head_dim
        self.c_attn = nn.Linear(config.hidden_size, 3 * projection, bias=True)
        self.c_proj = nn.Linear(projection, config.hidden_size, bias=not config.no_bias)
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.num_key_value_groups = 1

    def forward(self, hidden_states, position_embeddings, logn, attention_mask=None, cache=None, **kwargs):
        batch, length, _ = hidden_states.shape
        q, k, v = (t.view(batch, length, self.heads, self.head_dim).transpose(1, 2)
                   for t in self.c_attn(hidden_states).chunk(3, dim=-1))
        cos, sin = position_embeddings
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if logn is not None:  # Qwen's log-n scaling of queries past `seq_length` (inference only)
            q = q * logn
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                           dropout=self.config.attn_dropout_prob if self.training else 0.0, **kwargs)
        return self.c_proj(out.reshape(batch, length, -1))


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig):
        super().__init__()
        inner = config.intermediate_size // 2  # as published: the config states twice the width used
        self.w1 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, inner, bias=not config.no_bias)
        self.c_proj = nn.Linear(inner, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(GradientCheckpointingLayer):
    def __init__(self, config: QWenConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, hidden_states, position_embeddings=None, logn=None, attention_mask=None, cache=None,
                **kwargs):
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states), position_embeddings, logn,
                                                  attention_mask, cache, **kwargs)
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    config: QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualAttentionBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # older exports carry rotary tables and masks as buffers: nothing to load
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"attn\.masked_bias", r"attn\.bias"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Resampler):
            nn.init.normal_(module.query, std=std)
            with torch.no_grad():
                grid = int(math.sqrt(module.query.shape[0]))
                module.pos_embed.copy_(torch.from_numpy(sincos_2d(module.query.shape[1], grid)))
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=std)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, VisionTransformer):
            nn.init.normal_(module.positional_embedding, std=std)
            nn.init.normal_(module.proj, std=std)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.rotary_emb = RotaryEmbedding(int(config.kv_channels * config.rotary_pct), config.rotary_emb_base)
        self.visual = VisionTransformer(**config.visual)
        self._ntk_alpha = 1.0
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def _ntk(self, kv_length: int, prefill: bool) -> float:
        """Qwen's dynamic NTK: at inference, a prompt longer than `seq_length` stretches the RoPE base; the
        value chosen at the prompt is kept while its continuation is generated."""
        if self.training or not self.config.use_dynamic_ntk:
            return 1.0
        if prefill:
            context = math.log(kv_length / self.config.seq_length, 2) + 1
            self._ntk_alpha = max(2 ** math.ceil(context) - 1, 1)
        return self._ntk_alpha

    def _logn(self, position_ids: torch.Tensor, dtype) -> torch.Tensor | None:
        if self.training or not self.config.use_logn_attn:
            return None
        n, seq = (position_ids + 1).float(), self.config.seq_length
        if not bool((n > seq).any()):
            return None
        return torch.where(n > seq, torch.log(n) / math.log(seq), torch.ones_like(n))[:, None, :, None].to(dtype)

    def insert_images(self, hidden: torch.Tensor, input_ids: torch.Tensor | None,
                      pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Put each image's n_queries vectors at the positions between its `<img>` and `</img>`."""
        start_id = self.config.image_start_id
        starts = (input_ids == start_id).nonzero() if input_ids is not None else input_ids
        if starts is None or len(starts) == 0:
            if pixel_values is not None and len(pixel_values):
                raise ValueError(f"pixel_values were given but the input has no <img> (id {start_id}) span")
            if self.training and torch.is_grad_enabled():
                # as published: a text-only batch still runs the tower on a blank image (times 0), so that
                # every process of a distributed run produces gradients for the same parameters
                size = 2 * self.visual.patch_size
                blank = torch.zeros(1, 3, size, size, device=hidden.device, dtype=hidden.dtype)
                hidden = hidden + self.visual(blank).mean() * 0
            return hidden
        ends = (input_ids == start_id + 1).nonzero()
        n = self.config.n_queries
        if pixel_values is None:
            raise ValueError("the input has <img> spans but no pixel_values: pass the images through the processor")
        if ends.shape != starts.shape or not bool((ends[:, 0] == starts[:, 0]).all()) or \
                not bool((ends[:, 1] - starts[:, 1] - 1 == n).all()):
            raise ValueError(f"each <img> must be followed by exactly {n} image tokens and </img>")
        if len(starts) != len(pixel_values):
            raise ValueError(f"{len(starts)} <img> spans but {len(pixel_values)} images")
        features = self.visual(pixel_values).to(hidden.dtype)
        rows = starts[:, 0].repeat_interleave(n)
        cols = (starts[:, 1:2] + 1 + torch.arange(n, device=hidden.device)).flatten()
        return hidden.index_put((rows, cols), features.reshape(-1, features.shape[-1]))

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past)[None]
        hidden = self.drop(inputs_embeds)
        if past == 0:
            hidden = self.insert_images(hidden, input_ids, pixel_values)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        cos_sin = self.rotary_emb(position_ids, self._ntk(past + length, past == 0), hidden.dtype)
        logn = self._logn(position_ids, hidden.dtype)
        for block in self.h:
            # position_ids reach the attention function: packed rows are cut where they restart
            hidden = block(hidden, position_embeddings=cos_sin, logn=logn, attention_mask=mask, cache=cache,
                           position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.ln_f(hidden), cache=cache)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: QWenConfig):
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.loss_type = "ForCausalLM"  # the published class name does not say so; transformers reads the name

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
                               use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
