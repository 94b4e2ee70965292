"""MiniMonkey's Scale Compression Mechanism (SCM), a generation-time option: before generating, the image tokens of
the first `cols x rows` tiles (the detail grid's count) are ranked by the attention the tokens after them pay them
in the language model's second layer, and only the better half is kept. As PaddleMIX's `MiniMonkeyChatModel.generate`
with `use_scm=True` (paddlemix/models/internvl2/internvl_chat/modeling_minimonkey_chat.py), which
tests/test_minimonkey_scm.py checks against its generated tokens; one sample at a time, an InternLM2 language model.
"""

from __future__ import annotations

import torch

from mixtune.native.internlm2.modeling_internlm2 import rotate_half


def causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 -> (B, 1, L, L) additive: each position sees the unpadded positions up to itself."""
    length = attention_mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def second_layer_attention(lm, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, L) attention probabilities of the language model's layer 1 (layer 0 run in full first), as an
    eager softmax in float32 (what PaddleMIX's `output_attentions=True` returns). `lm` is an InternLM2ForCausalLM."""
    model = lm.model
    length = embeds.shape[1]
    positions = torch.arange(length, device=embeds.device)[None]
    cos, sin = model.rotary_emb(positions, length, embeds.dtype)
    mask = causal_mask(attention_mask, embeds.dtype)
    hidden = model.layers[0](embeds, position_embeddings=(cos, sin), attention_mask=mask)
    attn = model.layers[1].attention
    x = model.layers[1].attention_norm(hidden)
    batch, groups = x.shape[0], attn.num_key_value_groups
    qkv = attn.wqkv(x).view(batch, length, attn.num_key_value_heads, groups + 2, attn.head_dim)
    q = qkv[..., :groups, :].reshape(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = qkv[..., -2, :].transpose(1, 2).repeat_interleave(groups, dim=1)  # query head h reads kv head h // groups
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling + mask.float()
    return scores.softmax(-1)


def kept_positions(probs: torch.Tensor, first_image: int, high_tokens: int) -> torch.Tensor:
    """The positions SCM keeps, as PaddleMIX computes them for one sample: everything before the first image token,
    the top half of `high_tokens` image tokens (by the attention all later tokens pay them, averaged over those
    tokens and over heads), in order, then everything from `first_image + high_tokens + 1` on. (PaddleMIX's `+ 1`
    also drops the token right after the ranked span: kept here, as the published model was run that way.)"""
    length = probs.shape[-1]
    paid = probs[:, :, first_image + high_tokens:, first_image:first_image + high_tokens].mean(2).mean(1)
    top = paid.topk(int(high_tokens * 0.5), dim=-1).indices[0] + first_image
    device = probs.device
    return torch.cat([torch.arange(first_image, device=device), top.sort().values,
                      torch.arange(first_image + high_tokens + 1, length, device=device)])
