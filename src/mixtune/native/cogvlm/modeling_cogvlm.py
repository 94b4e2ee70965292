"""CogVLM and CogAgent (`CogVLMForCausalLM` / `CogAgentForCausalLM`) in plain PyTorch, with the published
checkpoints' module names (THUDM/cogvlm-chat-hf, THUDM/cogagent-chat-hf; PaddleMIX's paddlemix/models/cogvlm
keeps them too).

A Vicuna (Llama) language model, `model.embed_tokens`, `model.layers.N`, `model.norm`, `lm_head`, in which every
layer has a visual expert: image positions go through `self_attn.vision_expert_query_key_value` /
`vision_expert_dense` and `mlp.vision_mlp`, text positions through the `language_expert_*` / `language_mlp`
twins. Which is which comes from `token_type_ids` (0 text, 1 image), as published: a token takes the vision
expert when it and the next token are image tokens, so an image's last position (its eoi vector) takes the
language expert. The image is encoded by EVA2-CLIP (`model.vision`: `patch_embedding`, post-norm
`transformer.layers.N`, the `linear_proj` GLU adapter, and the learned `boi` / `eoi` vectors around the
patches), whose vectors replace the inputs at the image positions. Positions follow the published
`build_position_ids`: an image's boi, first patch and eoi advance the position by one each, the other patches
share the first one's.

CogAgent adds a high-resolution branch: `model.cross_vision` (EVA-CLIP-L at `cross_image_size`, rotary 2-D
positions, SwiGLU blocks; its last block is skipped, as published) read by a `cross_attn` in every layer
(`query`, `key_value`, `dense`, width `cross_compute_hidden_size`) after its own RMSNorm
(`post_cross_attention_layernorm`); its low-resolution tower adds `model.vision.pos_embed` to the patches.

Unlike the published code, `position_ids` may be given (packed rows restart them per sample; a row's samples
are told apart where positions return to 0, which under CogVLM's rule only a sample's first token has).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.deprecation import deprecate_kwarg

from mixtune.native.cogvlm.configuration_cogvlm import CogAgentConfig, CogVLMConfig

LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE = 0, 1


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over (B, heads, L, D), the softmax in fp32."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    if mask is not None:
        scores = scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def run_attention(module, q, k, v, scale: float, mask: torch.Tensor | None, dropout: float = 0.0):
    """(B, heads, L, D) attention by the model's implementation: the eager formula, or transformers' attention
    interface (SDPA; mixtune's packed SDPA, which finds no packed layout without position ids and runs SDPA)
    with the mask built here, which already keeps packed samples apart. Returns (B, heads, L, D)."""
    implementation = getattr(module.config, "_attn_implementation", "eager") or "eager"
    if implementation == "eager":
        out = full_attention(q, k, v, scale, mask)
        return F.dropout(out, p=dropout) if dropout else out
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
    out, _ = attention(module, q, k, v, mask, dropout=dropout, scaling=scale, is_causal=False)
    return out.transpose(1, 2)


# ---------------------------------------------------------------- EVA2-CLIP (model.vision)


class PatchEmbedding(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.proj = nn.Conv2d(vc["in_channels"], vc["hidden_size"], kernel_size=vc["patch_size"],
                              stride=vc["patch_size"])
        self.cls_embedding = nn.Parameter(torch.zeros(1, vc["hidden_size"]))
        self.position_embedding = nn.Embedding(vc["num_positions"], vc["hidden_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_embedding.expand(x.shape[0], -1, -1), x), dim=1)
        return x + self.position_embedding.weight.unsqueeze(0)


class TransformerAttention(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.num_heads = vc["num_heads"]
        self.scale = (vc["hidden_size"] // vc["num_heads"]) ** -0.5
        self.query_key_value = nn.Linear(vc["hidden_size"], vc["hidden_size"] * 3)
        self.dense = nn.Linear(vc["hidden_size"], vc["hidden_size"])
        self.output_dropout = nn.Dropout(vc.get("dropout_prob", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.query_key_value(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = full_attention(q, k, v, self.scale).transpose(1, 2).reshape(batch, length, -1)
        return self.output_dropout(self.dense(out))


class TransformerMLP(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.activation_fn = ACT2FN[vc.get("hidden_act", "gelu")]
        self.fc1 = nn.Linear(vc["hidden_size"], vc["intermediate_size"])
        self.fc2 = nn.Linear(vc["intermediate_size"], vc["hidden_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class TransformerLayer(GradientCheckpointingLayer):
    """Post-norm, as published: the norms apply to each branch's output, before the residual sum."""

    def __init__(self, vc: dict):
        super().__init__()
        eps = vc.get("layer_norm_eps", 1e-6)
        self.input_layernorm = nn.LayerNorm(vc["hidden_size"], eps=eps)
        self.attention = TransformerAttention(vc)
        self.mlp = TransformerMLP(vc)
        self.post_attention_layernorm = nn.LayerNorm(vc["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, vc: dict):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(vc) for _ in range(vc["num_hidden_layers"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class GLU(nn.Module):
    """`linear_proj`: the vision-language adapter (projection, LayerNorm, GELU, then a SiLU-gated MLP)."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class EVA2CLIPModel(nn.Module):
    """(B, 3, S, S) pixels -> (B, patches + 2, hidden): boi, the adapted patches, eoi."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vc = config.vision_config
        self.patch_embedding = PatchEmbedding(vc)
        self.transformer = Transformer(vc)
        self.linear_proj = GLU(config, in_features=vc["hidden_size"])
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        if config.model_type == "cogagent":  # CogAgent's tower adds a learned table to the patches
            grid = vc["image_size"] // vc["patch_size"]
            self.pos_embed = nn.Parameter(torch.zeros(grid * grid, vc["hidden_size"]))
        else:
            self.pos_embed = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images.to(self.boi.dtype)))[:, 1:]
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0)
        x = self.linear_proj(x)
        return torch.cat((self.boi.expand(x.shape[0], -1, -1), x, self.eoi.expand(x.shape[0], -1, -1)), dim=1)


# ---------------------------------------------------------------- EVA-CLIP-L, high resolution (model.cross_vision)


def interleaved_rotate_half(x: torch.Tensor) -> torch.Tensor:
    """EVA's rotation pairs neighbouring channels (2i, 2i+1)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def eva_rope_tables(head_dim: int, pt_seq_len: int, grid: int, theta: float = 10000.0):
    """cos/sin (grid*grid, head_dim) of EVA-02's 2-D rotary embedding (VisionRotaryEmbeddingFast with
    intp_freq: positions stretched from `pt_seq_len` to the patch grid); half the channels rotate with the row,
    half with the column."""
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    t = torch.arange(grid, dtype=torch.float32) / grid * pt_seq_len
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)  # (grid, dim)
    freqs = torch.cat((freqs[:, None, :].expand(grid, grid, -1), freqs[None, :, :].expand(grid, grid, -1)), dim=-1)
    return freqs.cos().reshape(grid * grid, -1), freqs.sin().reshape(grid * grid, -1)


class EvaAttention(nn.Module):
    """EVA-02 attention (sub-LN, separate q/k/v projections, biases on q and v only, rotary 2-D positions on the
    patches, not on the class token)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.inner_attn_ln = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape

        def heads(t):
            return t.view(batch, length, self.num_heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(self.k_proj(x))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        cos, sin = (t.to(q.dtype) for t in rope)
        q = torch.cat((q[:, :, :1], q[:, :, 1:] * cos + interleaved_rotate_half(q[:, :, 1:]) * sin), dim=2)
        k = torch.cat((k[:, :, :1], k[:, :, 1:] * cos + interleaved_rotate_half(k[:, :, 1:]) * sin), dim=2)
        out = full_attention(q, k, v, self.scale).transpose(1, 2).reshape(batch, length, -1)
        return self.proj(self.inner_attn_ln(out))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=1e-6)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class Block(GradientCheckpointingLayer):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class EVAVisionTransformer(nn.Module):
    def __init__(self, image_size: int, dim: int, cvc: dict, out_dim: int = 768):
        super().__init__()
        patch = cvc["patch_size"]
        self.grid, self.pt_hw_seq_len = image_size // patch, cvc["pt_hw_seq_len"]
        self.head_dim = cvc["head_width"]
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, dim // cvc["head_width"], cvc["mlp_ratio"])
                                    for _ in range(cvc["layers"]))
        # kept so that the published weights load; CogAgent reads the second-to-last block's output
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        rope = tuple(t.to(x.device) for t in eva_rope_tables(self.head_dim // 2 * 2, self.pt_hw_seq_len, self.grid))
        for block in self.blocks[:-1]:  # as published: the last block is skipped
            x = block(x, rope)
        return x


class Eva2LargeEncoder(nn.Module):
    def __init__(self, image_size: int, dim: int, cvc: dict):
        super().__init__()
        self.model = EVAVisionTransformer(image_size, dim, cvc)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)[:, 1:]


class CrossVisionModel(nn.Module):
    def __init__(self, config: CogAgentConfig):
        super().__init__()
        cvc = config.cross_vision_config
        self.vit = Eva2LargeEncoder(config.cross_image_size, config.cross_hidden_size, cvc)
        grid = config.cross_image_size // cvc["patch_size"]
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, config.cross_hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit(images.to(self.pos_embed.dtype)) + self.pos_embed.unsqueeze(0)


# ---------------------------------------------------------------- language model with the visual expert


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, dim: int, base: float, dtype: torch.dtype):
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim)
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, L, dim)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def expert_mask(token_type_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """True where the vision expert applies: this token and the next are image tokens (published rule), the
    next one in the same sample (a packed row's next sample starts at position 0)."""
    mask = torch.zeros_like(token_type_ids, dtype=torch.bool)
    if token_type_ids.shape[1] > 1:
        mask[:, :-1] = (token_type_ids[:, :-1] == VISION_TOKEN_TYPE) & (token_type_ids[:, 1:] == VISION_TOKEN_TYPE)
        if position_ids is not None and position_ids.shape == token_type_ids.shape:
            mask[:, :-1] &= position_ids[:, 1:] != 0
    return mask


def routed(vision: nn.Module, language: nn.Module, x: torch.Tensor, mask: torch.Tensor, out_features: int):
    """vision(x) at the masked positions, language(x) elsewhere: each token through its own expert only."""
    if not bool(mask.any()):
        return language(x)
    out = x.new_empty(*x.shape[:-1], out_features)
    out[mask] = vision(x[mask]).to(out.dtype)
    out[~mask] = language(x[~mask]).to(out.dtype)
    return out


def build_position_ids(token_type_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CogVLM's positions (the published `build_position_ids`): every text token and an image's boi, first patch
    and eoi advance the position by one; the image's other patches share the first patch's; padding does not
    advance it."""
    tmp = token_type_ids.clone()
    if attention_mask is not None:
        tmp[~attention_mask.bool()] = -1
    is_boi_eoi = torch.zeros_like(tmp, dtype=torch.bool)
    is_boi_eoi[:, 1:] |= (tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, 0] |= tmp[:, 0] == VISION_TOKEN_TYPE
    is_boi_eoi[:, :-1] |= (tmp[:, :-1] == VISION_TOKEN_TYPE) & (tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
    is_boi_eoi[:, -1] |= tmp[:, -1] == VISION_TOKEN_TYPE
    tmp[is_boi_eoi] = LANGUAGE_TOKEN_TYPE
    y = torch.zeros_like(tmp, dtype=torch.long)
    y[:, 1:] = ((tmp[:, 1:] == LANGUAGE_TOKEN_TYPE)
                | ((tmp[:, 1:] == VISION_TOKEN_TYPE) & (tmp[:, :-1] == LANGUAGE_TOKEN_TYPE))).long()
    return y.cumsum(dim=-1)


def decoder_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor, length: int, past: int,
                 dtype: torch.dtype, device) -> torch.Tensor:
    """(B, 1, L, past + L) additive mask: causal, padding masked, and within a packed row each sample sees only
    itself (samples start where positions return to 0; only without a cache)."""
    batch = position_ids.shape[0]
    q = torch.arange(length, device=device)[:, None] + past
    k = torch.arange(past + length, device=device)[None, :]
    allowed = (k <= q)[None].expand(batch, -1, -1)
    if past == 0 and position_ids.shape[-1] == length:
        starts = position_ids == 0
        starts[:, 0] = True
        segment = starts.long().cumsum(-1)  # (B, L)
        allowed = allowed & (segment[:, :, None] == segment[:, None, :])
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, -(past + length):].bool()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class MLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class VisionExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.language_mlp = MLP(config)
        self.vision_mlp = MLP(config)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        return routed(self.vision_mlp, self.language_mlp, x, vision_mask, self.hidden_size)


class VisionExpertAttention(nn.Module):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        h = self.hidden_size
        self.vision_expert_query_key_value = nn.Linear(h, h * 3, bias=False)
        self.vision_expert_dense = nn.Linear(h, h, bias=False)
        self.language_expert_query_key_value = nn.Linear(h, h * 3, bias=False)
        self.language_expert_dense = nn.Linear(h, h, bias=False)

    def forward(self, x, vision_mask, cos_sin, mask, cache=None):
        batch, length, _ = x.shape
        qkv = routed(self.vision_expert_query_key_value, self.language_expert_query_key_value, x, vision_mask,
                     3 * self.hidden_size)
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2) for t in qkv.chunk(3, -1))
        cos, sin = cos_sin
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = run_attention(self, q, k, v, self.head_dim ** -0.5, mask)
        out = out.transpose(1, 2).reshape(batch, length, self.hidden_size)
        return routed(self.vision_expert_dense, self.language_expert_dense, out, vision_mask, self.hidden_size)


class CrossAttention(nn.Module):
    """CogAgent: text and image positions attend to the high-resolution image's EVA-CLIP-L features."""

    def __init__(self, config: CogAgentConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.compute = config.cross_compute_hidden_size
        self.head_dim = self.compute // self.num_heads
        self.query = nn.Linear(config.hidden_size, self.compute, bias=False)
        self.key_value = nn.Linear(config.cross_hidden_size, self.compute * 2, bias=False)
        self.dense = nn.Linear(self.compute, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, encoder_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.query(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = encoder_kv
        # the published cross-attention mask is all ones, added to the scores: a constant, which softmax ignores
        out = run_attention(self, q, k, v, self.head_dim ** -0.5, None)
        return self.dense(out.transpose(1, 2).reshape(batch, length, self.compute))

    def encoder_kv(self, encoder_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n, _ = encoder_outputs.shape
        k, v = self.key_value(encoder_outputs).chunk(2, dim=-1)
        return tuple(t.view(batch, n, self.num_heads, self.head_dim).transpose(1, 2) for t in (k, v))


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CogVLMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = VisionExpertAttention(config, layer_idx)
        if config.model_type == "cogagent":
            self.cross_attn = CrossAttention(config, layer_idx)
            self.post_cross_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = VisionExpertMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, vision_mask=None, cos_sin=None, mask=None, cache=None, cross_kv=None, **kwargs):
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), vision_mask, cos_sin, mask, cache)
        if cross_kv is not None:
            hidden = hidden + self.cross_attn(self.post_cross_attention_layernorm(hidden), cross_kv)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), vision_mask)


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    config: CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "TransformerLayer", "Block"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # rotary tables that the published code keeps as buffers: computed here, nothing to load
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"rope\.freqs_(cos|sin)"]

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, EVA2CLIPModel):
            for p in (module.boi, module.eoi) + ((module.pos_embed,) if module.pos_embed is not None else ()):
                nn.init.normal_(p, std=std)
        elif isinstance(module, PatchEmbedding):
            nn.init.normal_(module.cls_embedding, std=std)
        elif isinstance(module, EVAVisionTransformer):
            nn.init.normal_(module.cls_token, std=std)
            nn.init.normal_(module.pos_embed, std=std)
        elif isinstance(module, EvaAttention):
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)
        elif isinstance(module, CrossVisionModel):
            nn.init.normal_(module.pos_embed, std=std)


class CogVLMModel(CogVLMPreTrainedModel):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision = EVA2CLIPModel(config)
        self.cross_vision = CrossVisionModel(config) if config.model_type == "cogagent" else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def insert_images(self, embeds: torch.Tensor, token_type_ids: torch.Tensor, pixel_values) -> torch.Tensor:
        """The image vectors replace the inputs at the image positions, image after image in reading order."""
        n_tokens = int((token_type_ids == VISION_TOKEN_TYPE).sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_tokens:
                raise ValueError(f"token_type_ids mark {n_tokens} image positions but no pixel_values were given")
            if self.training and torch.is_grad_enabled():
                # a text-only batch still runs the tower on a blank image (times 0), so that every process of a
                # distributed run produces gradients for the same parameters
                vc = self.config.vision_config
                blank = torch.zeros(1, 3, vc["image_size"], vc["image_size"], device=embeds.device, dtype=embeds.dtype)
                embeds = embeds + self.vision(blank).mean() * 0
            return embeds
        per_image = self.config.vision_tokens
        if n_tokens != len(pixel_values) * per_image:
            raise ValueError(f"token_type_ids mark {n_tokens} image positions; {len(pixel_values)} images take "
                             f"{len(pixel_values) * per_image} ({per_image} each)")
        features = self.vision(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter((token_type_ids == VISION_TOKEN_TYPE)[..., None].expand_as(embeds),
                                     features.reshape(-1, features.shape[-1]))

    def cross_keys_values(self, cross_pixel_values, batch: int, cache):
        """CogAgent: each layer's keys and values over the high-resolution image, one image per row; computed at
        the prompt and kept on the cache for the generated tokens."""
        if self.cross_vision is None:
            return [None] * len(self.layers)
        if cross_pixel_values is None:
            return getattr(cache, "cogagent_cross_kv", None) or [None] * len(self.layers)
        if len(cross_pixel_values) != batch:
            raise ValueError(f"CogAgent reads one high-resolution image per row: {len(cross_pixel_values)} "
                             f"cross_pixel_values for {batch} rows")
        encoded = self.cross_vision(cross_pixel_values)
        kv = [layer.cross_attn.encoder_kv(encoded.to(self.embed_tokens.weight.dtype)) for layer in self.layers]
        if cache is not None:
            cache.cogagent_cross_kv = kv
        return kv

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, cross_pixel_values=None, token_type_ids=None, use_cache=None,
                **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if token_type_ids is None:
            token_type_ids = torch.full((batch, length), LANGUAGE_TOKEN_TYPE, dtype=torch.long,
                                        device=inputs_embeds.device)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        hidden = inputs_embeds
        if past == 0:
            hidden = self.insert_images(hidden, token_type_ids, pixel_values)
        if position_ids is None:
            if past:
                raise ValueError("after the prompt, CogVLM needs position_ids (generate() builds them)")
            mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids = build_position_ids(token_type_ids, mask2d)
        position_ids = position_ids.reshape(batch, length)
        mask = decoder_mask(attention_mask, position_ids, length, past, hidden.dtype, hidden.device)
        cos_sin = rope_cos_sin(position_ids, self.config.hidden_size // self.config.num_attention_heads,
                               self.config.rope_theta, hidden.dtype)
        vision_mask = expert_mask(token_type_ids, position_ids if past == 0 else None)
        cross_kv = self.cross_keys_values(cross_pixel_values if past == 0 else None, batch, cache)
        for layer, kv in zip(self.layers, cross_kv):
            hidden = layer(hidden, vision_mask=vision_mask, cos_sin=cos_sin, mask=mask, cache=cache, cross_kv=kv)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden), cache=cache)


class CogVLMForCausalLM(CogVLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        self.loss_type = "ForCausalLM"

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, cross_pixel_values=None, token_type_ids=None, labels=None,
                use_cache=None, logits_to_keep: int = 0, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                         inputs_embeds=inputs_embeds, pixel_values=pixel_values, cross_pixel_values=cross_pixel_values,
                         token_type_ids=token_type_ids, use_cache=use_cache)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, **kwargs):
        # CogVLM's positions come from the token types of the whole sequence so far (new tokens are text)
        token_type_ids = kwargs.get("token_type_ids")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if token_type_ids.shape[-1] < input_ids.shape[-1]:
            pad = input_ids.shape[-1] - token_type_ids.shape[-1]
            token_type_ids = torch.cat([token_type_ids, token_type_ids.new_zeros(input_ids.shape[0], pad)], dim=-1)
        kwargs["token_type_ids"] = token_type_ids
        # always CogVLM's own rule (generate() may have filled in plain 0..L-1 positions)
        mask2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        kwargs["position_ids"] = build_position_ids(token_type_ids, mask2d)
        inputs = super().prepare_inputs_for_generation(input_ids, cache=cache, attention_mask=attention_mask, **kwargs)
        if cache is not None and cache.get_seq_length() > 0:  # the images were read at the prompt
            inputs.pop("pixel_values", None)
            inputs.pop("cross_pixel_values", None)
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False,
                                            num_new_tokens: int = 1):
        model_kwargs.pop("position_ids", None)  # rebuilt from the token types each step
        token_type_ids = model_kwargs.pop("token_type_ids", None)
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        if token_type_ids is not None:  # generated tokens are text (the default repeats the last type)
            model_kwargs["token_type_ids"] = torch.cat(
                [token_type_ids, token_type_ids.new_zeros(token_type_ids.shape[0], num_new_tokens)], dim=-1)
        return model_kwargs


class CogAgentForCausalLM(CogVLMForCausalLM):
    config_class = CogAgentConfig
    config: CogAgentConfig
