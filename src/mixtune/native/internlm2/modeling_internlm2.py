"""InternLM2 (`InternLM2ForCausalLM`) in plain PyTorch, with the published checkpoint's module names.

`model.tok_embeddings`, `model.layers.N.{attention_norm, attention.wqkv, attention.wo, ffn_norm,
feed_forward.w1, feed_forward.w3, feed_forward.w2}`, `model.norm`, `output`. The fused `wqkv` is laid out per
key-value head as [its query heads | key | value] (published order), which is what makes grouped-query attention
one matmul. RoPE as published, with its optional `rope_scaling` (linear, or dynamic NTK past
`max_position_embeddings`).

The projections are built by `InternLM2Model.linear_class(in_features, out_features, bias=...)` and called as
`linear(x, **linear_kwargs)`, where `linear_kwargs` is the model's forward argument of that name: a subclass can
swap in its own linear (InternLM-XComposer2's Partial LoRA reads an image mask that way) without copying the
model. `position_ids` are honoured (packed rows restart positions and are kept apart).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils.deprecation import deprecate_kwarg

from mixtune.native.internlm2.configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class InternLM2RotaryEmbedding(nn.Module):
    """cos/sin at the given positions. `rope_scaling` as published: "linear" divides positions by the factor;
    "dynamic" stretches the base once the sequence (cache included) is longer than `max_position_embeddings`.
    (The published code keeps the stretched table for later calls; here it follows the current length.)"""

    def __init__(self, config: InternLM2Config):
        super().__init__()
        self.dim, self.base = config.head_dim, float(config.rope_theta)
        self.max_positions = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.kind, self.factor = scaling.get("type"), float(scaling.get("factor", 1.0))

    def forward(self, position_ids: torch.Tensor, seq_len: int, dtype: torch.dtype):
        base, positions = self.base, position_ids.float()
        if self.kind == "dynamic" and seq_len > self.max_positions:
            stretch = self.factor * seq_len / self.max_positions - (self.factor - 1)
            base = base * stretch ** (self.dim / (self.dim - 2))
        elif self.kind == "linear":
            positions = positions / self.factor
        inv_freq = 1.0 / base ** (torch.arange(0, self.dim, 2, dtype=torch.float32,
                                               device=position_ids.device) / self.dim)
        freqs = positions[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class InternLM2Attention(nn.Module):
    def __init__(self, config: InternLM2Config, layer_idx: int, linear_class=nn.Linear):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        if self.head_dim * self.num_heads != config.hidden_size or self.num_heads % self.num_key_value_heads:
            raise ValueError(f"InternLM2: hidden_size {config.hidden_size} must split into {self.num_heads} heads, "
                             f"and those into {self.num_key_value_heads} key-value groups")
        self.wqkv = linear_class(config.hidden_size, (self.num_heads + 2 * self.num_key_value_heads) * self.head_dim,
                                 bias=config.bias)
        self.wo = linear_class(self.num_heads * self.head_dim, config.hidden_size, bias=config.bias)
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True

    def forward(self, hidden_states, position_embeddings, attention_mask=None, cache=None, linear_kwargs=None,
                **kwargs):
        batch, length, _ = hidden_states.shape
        linear_kwargs = linear_kwargs or {}
        groups = self.num_key_value_groups
        qkv = self.wqkv(hidden_states, **linear_kwargs).view(batch, length, self.num_key_value_heads, groups + 2,
                                                             self.head_dim)
        q = qkv[..., :groups, :].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        cos, sin = position_embeddings
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out, _ = attention(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.wo(out.reshape(batch, length, -1), **linear_kwargs)


class InternLM2MLP(nn.Module):
    def __init__(self, config: InternLM2Config, linear_class=nn.Linear):
        super().__init__()
        self.w1 = linear_class(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = linear_class(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = linear_class(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor, linear_kwargs=None) -> torch.Tensor:
        linear_kwargs = linear_kwargs or {}
        return self.w2(self.act_fn(self.w1(x, **linear_kwargs)) * self.w3(x, **linear_kwargs), **linear_kwargs)


class InternLM2DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: InternLM2Config, layer_idx: int, linear_class=nn.Linear):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx, linear_class)
        self.feed_forward = InternLM2MLP(config, linear_class)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, linear_kwargs=None,
                **kwargs):
        hidden_states = hidden_states + self.attention(self.attention_norm(hidden_states), position_embeddings,
                                                       attention_mask, cache, linear_kwargs, **kwargs)
        return hidden_states + self.feed_forward(self.ffn_norm(hidden_states), linear_kwargs)


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    config: InternLM2Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternLM2DecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, InternLM2RMSNorm):
            nn.init.ones_(module.weight)


class InternLM2Model(InternLM2PreTrainedModel):
    # The class of every attention and MLP projection (wqkv, wo, w1, w2, w3), called as
    # linear_class(in_features, out_features, bias=...). Subclasses swap in their own here.
    linear_class = nn.Linear

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i, type(self).linear_class)
                                    for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = InternLM2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, use_cache=None, linear_kwargs: dict | None = None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        cos_sin = self.rotary_emb(position_ids, past + length, inputs_embeds.dtype)
        hidden = inputs_embeds
        for layer in self.layers:
            # position_ids reach the attention function: packed rows are cut where they restart
            hidden = layer(hidden, position_embeddings=cos_sin, attention_mask=mask, cache=cache,
                           linear_kwargs=linear_kwargs, position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"output.weight": "model.tok_embeddings.weight"}
    # The language model class built under `model` (a subclass with its own `linear_class` goes here).
    model_class = InternLM2Model

    def __init__(self, config: InternLM2Config):
        super().__init__(config)
        self.model = type(self).model_class(config)
        self.vocab_size = config.vocab_size
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def set_input_embeddings(self, value):
        self.model.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, new_embeddings):
        self.output = new_embeddings

    def get_decoder(self):
        return self.model

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                linear_kwargs: dict | None = None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, linear_kwargs=linear_kwargs, **kwargs)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["InternLM2ForCausalLM", "InternLM2Model", "InternLM2PreTrainedModel"]
