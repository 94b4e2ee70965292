"""VisualGLM-6B (`ChatGLMForConditionalGenerationWithImage`) in plain PyTorch, with the published checkpoint's names.

Language model: ChatGLM-6B (`transformer.word_embeddings`, `transformer.layers.N.{input_layernorm,
attention.query_key_value, attention.dense, post_attention_layernorm, mlp.dense_h_to_4h, mlp.dense_4h_to_h}`,
`transformer.final_layernorm`, `lm_head` tied to the embeddings). A GLM block is post-LN with the "alpha" residual:
h = LN1(x) * sqrt(2 * layers) + attn(LN1(x)); out = LN2(h) * sqrt(2 * layers) + mlp(LN2(h)). Its rotary positions
are 2-D: half of each head's channels rotate by the token's position, half by its block position. A GLM sequence is
prompt + [gMASK] + <sop> + reply: tokens before <sop> (the context) see each other both ways; from <sop> on, the
position stays at the [gMASK]'s index and the block position counts 1, 2, ... while attention is causal.

Image part (`image_encoder`, BLIP-2 style, SwissArmyTransformer module names): `vit` (EVA ViT: a class token as
`transformer.word_embeddings`, `transformer.position_embeddings`, pre-LN layers, `mixins.patch_embedding.proj`,
`mixins.cls.ln_vision`), `qformer` (32 learned queries as `transformer.word_embeddings`, post-LN layers with a
cross-attention to the ViT on the layers `is_decoder` marks, `transformer.final_layernorm`) and `glm_proj`. An
image's `image_length` vectors replace the language model's inputs at its `image_length` placeholder positions.

Unlike the published remote code, images come in as `pixel_values` at the placeholder positions (no
`pre_image_length` argument), and `position_ids` may be given as (2, batch, length) (position, block position) per
token: MixToken's packed rows restart them per sample, and the attention mask is derived from them (sample
boundaries where both restart at 0; the context is where the block position is 0), so packing is exact.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from mixtune.native.visualglm.configuration_chatglm import ChatGLMConfig


def attend(q, k, v, mask):
    """q, k, v: (B, heads, L, d); mask: bool (B, 1, Lq, Lk), True = may attend (or None)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# ---------------------------------------------------------------- image encoder (SwissArmyTransformer layout)


class SatSelfAttention(nn.Module):
    """SwissArmyTransformer's attention: one `query_key_value` laid out [q | k | v] (thirds), then `dense`."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.query_key_value(x).chunk(3, dim=-1))
        return self.dense(attend(q, k, v, None).transpose(1, 2).reshape(b, n, h))


class SatCrossAttention(nn.Module):
    """`query` from the Q-Former, `key_value` ([k | v] halves) from the ViT's output, then `dense`."""

    def __init__(self, hidden: int, heads: int, encoder_hidden: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(encoder_hidden, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, encoder: torch.Tensor) -> torch.Tensor:
        b, n, h = x.shape
        q = self.query(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = (t.view(b, encoder.shape[1], self.heads, -1).transpose(1, 2)
                for t in self.key_value(encoder).chunk(2, dim=-1))
        return self.dense(attend(q, k, v, None).transpose(1, 2).reshape(b, n, h))


class SatMLP(nn.Module):
    def __init__(self, hidden: int, inner: int, act):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(hidden, inner)
        self.dense_4h_to_h = nn.Linear(inner, hidden)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class SatLayer(GradientCheckpointingLayer):
    """One SwissArmyTransformer layer: pre-LN (the ViT) or post-LN with an optional cross-attention (the Q-Former)."""

    def __init__(self, hidden: int, heads: int, inner: int, eps: float, act, post_ln: bool,
                 cross_hidden: int | None = None):
        super().__init__()
        self.post_ln = post_ln
        self.input_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.attention = SatSelfAttention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        if cross_hidden is not None:
            self.cross_attention = SatCrossAttention(hidden, heads, cross_hidden)
            self.post_cross_attention_layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SatMLP(hidden, inner, act)

    def forward(self, x: torch.Tensor, encoder: torch.Tensor | None = None) -> torch.Tensor:
        if not self.post_ln:
            x = x + self.attention(self.input_layernorm(x))
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.input_layernorm(x)
        x = self.post_attention_layernorm(x + self.attention(x))
        if hasattr(self, "cross_attention"):
            x = self.post_cross_attention_layernorm(x + self.cross_attention(x, encoder))
        return x + self.mlp(x)


class SatTransformer(nn.Module):
    def __init__(self, args: dict, act, positions: bool, cross_hidden: int | None = None):
        super().__init__()
        hidden, eps = args["hidden_size"], args["layernorm_epsilon"]
        inner = args.get("inner_hidden_size") or 4 * hidden
        post = args.get("layernorm_order", "pre") == "post"
        decoder = args.get("is_decoder", False)
        decoder = decoder if isinstance(decoder, list) else [decoder] * args["num_layers"]
        self.word_embeddings = nn.Embedding(args["vocab_size"], hidden)
        if positions:
            self.position_embeddings = nn.Embedding(args["max_sequence_length"], hidden)
        self.layers = nn.ModuleList(
            SatLayer(hidden, args["num_attention_heads"], inner, eps, act, post, cross_hidden if decoder[i] else None)
            for i in range(args["num_layers"]))
        if args.get("use_final_layernorm", True):
            self.final_layernorm = nn.LayerNorm(hidden, eps=eps)

    def run(self, x: torch.Tensor, encoder: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, encoder)
        return self.final_layernorm(x) if hasattr(self, "final_layernorm") else x


class PatchEmbedding(nn.Module):
    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)


class LNFinal(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.ln_vision = nn.LayerNorm(hidden, eps=eps)


class EVAViT(nn.Module):
    """(B, 3, S, S) -> (B, 1 + patches, hidden): class token + patches, positions added, pre-LN layers, ln_vision."""

    def __init__(self, args: dict):
        super().__init__()
        hidden = args["hidden_size"]
        self.transformer = SatTransformer(args, ACT2FN[args.get("hidden_act", "gelu_pytorch_tanh")], positions=True)
        self.mixins = nn.ModuleDict({"patch_embedding": PatchEmbedding(args.get("in_channels", 3), hidden,
                                                                       args["patch_size"]),
                                     "cls": LNFinal(hidden, args.get("ln_vision_eps", 1e-5))})

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        proj = self.mixins["patch_embedding"].proj
        patches = proj(pixel_values.to(proj.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.transformer.word_embeddings.weight[:1].unsqueeze(0).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        x = x + self.transformer.position_embeddings.weight[: x.shape[1]].unsqueeze(0)
        return self.mixins["cls"].ln_vision(self.transformer.run(x))


class QFormer(nn.Module):
    """`vocab_size` learned queries (the embedding table) cross-attending to the ViT: (B, N, D) -> (B, queries, h)."""

    def __init__(self, args: dict):
        super().__init__()
        self.transformer = SatTransformer(args, F.gelu, positions=False, cross_hidden=args["cross_attn_hidden_size"])

    def forward(self, encoder: torch.Tensor) -> torch.Tensor:
        queries = self.transformer.word_embeddings.weight.unsqueeze(0).expand(encoder.shape[0], -1, -1)
        return self.transformer.run(queries, encoder)


class BLIP2(nn.Module):
    def __init__(self, eva_args: dict, qformer_args: dict, lm_hidden: int):
        super().__init__()
        self.vit = EVAViT(eva_args)
        self.qformer = QFormer(qformer_args)
        self.glm_proj = nn.Linear(qformer_args["hidden_size"], lm_hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.glm_proj(self.qformer(self.vit(pixel_values)))


# ---------------------------------------------------------------- ChatGLM-6B


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """x: (B, heads, L, d); positions: (B, L). Rotary embedding over all d channels at the given positions."""
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return (x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype))


class GLMAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.two_d = config.position_encoding_2d
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, positions, mask, cache):
        b, n, _ = x.shape
        # per head [q | k | v], as published
        q, k, v = (t.transpose(1, 2) for t in self.query_key_value(x).view(b, n, self.heads, 3 * self.head_dim)
                   .chunk(3, dim=-1))
        if self.two_d:  # first half of each head: position; second half: block position
            q = torch.cat([rotary(q1, positions[0]) if i == 0 else rotary(q1, positions[1])
                           for i, q1 in enumerate(q.chunk(2, dim=-1))], dim=-1)
            k = torch.cat([rotary(k1, positions[0]) if i == 0 else rotary(k1, positions[1])
                           for i, k1 in enumerate(k.chunk(2, dim=-1))], dim=-1)
        else:
            q, k = rotary(q, positions[0]), rotary(k, positions[0])
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = attend(q, k, v, mask)
        return self.dense(out.transpose(1, 2).reshape(b, n, -1))


class GLU(nn.Module):
    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu_tanh(self.dense_h_to_4h(x)))


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = (2 * config.num_layers) ** 0.5
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(self, x, positions=None, mask=None, cache=None):
        attention_input = self.input_layernorm(x)
        h = attention_input * self.alpha + self.attention(attention_input, positions, mask, cache)
        mlp_input = self.post_attention_layernorm(h)
        return mlp_input * self.alpha + self.mlp(mlp_input)


def first_index(row: torch.Tensor, token_id: int) -> int | None:
    hits = (row == token_id).nonzero()
    return int(hits[0]) if len(hits) else None


def glm_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: ChatGLMConfig):
    """(2, B, L) position and block position of each token, counted from the row's first real token (left
    padding keeps the published positions): before <sop> both are (index, 0); from <sop> on (index of [gMASK],
    or [MASK] when there is no [gMASK]; index - <sop>'s index + 1). Also returns (first, context, mask index)
    per row, which generation continues from."""
    rows, length = input_ids.shape
    pos = torch.zeros(2, rows, length, dtype=torch.long, device=input_ids.device)
    state = []
    for r in range(rows):
        first = int(attention_mask[r].argmax()) if attention_mask is not None else 0
        row = input_ids[r, first:]
        context = first_index(row, config.bos_token_id)
        masked = first_index(row, config.gmask_token_id)
        masked = first_index(row, config.mask_token_id) if masked is None else masked
        if context is None or masked is None:
            raise ValueError("a ChatGLM sequence needs [gMASK] (or [MASK]) and <sop> (bos): the prompt ends with "
                             "[gMASK]<sop>, which the tokenizer's build_inputs_with_special_tokens appends")
        idx = torch.arange(length - first, device=input_ids.device)
        pos[0, r, first:] = torch.where(idx < context, idx, torch.full_like(idx, masked))
        pos[1, r, first:] = torch.where(idx < context, torch.zeros_like(idx), idx - context + 1)
        state.append((first, context, masked))
    return pos, state


def glm_mask(positions: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend, from (2, B, L) positions: a sample starts where both positions are 0;
    within a sample a token sees every earlier token and the whole context (block position 0)."""
    pos, block = positions[0], positions[1]
    starts = (pos == 0) & (block == 0)
    segment = starts.long().cumsum(-1)
    length = pos.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=pos.device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & (causal[None] | (block == 0)[:, None, :])
    if attention_mask is not None:
        valid = attention_mask.bool()
        allowed = allowed & (valid[:, None, :] | torch.eye(length, dtype=torch.bool, device=pos.device)[None])
    return allowed[:, None]


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    config: ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock", "SatLayer"]
    _supports_sdpa = True
    # published ChatGLM-6B files carry each layer's rotary table as a buffer: nothing to load
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(self, inputs_embeds, positions, mask, cache=None) -> torch.Tensor:
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, positions=positions, mask=mask, cache=cache)
        return self.final_layernorm(hidden)


class ChatGLMForConditionalGenerationWithImage(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.image_encoder = BLIP2(config.eva_config, config.qformer_config, config.hidden_size)
        self._generation_state = None
        self.post_init()
        self.loss_type = "ForCausalLM"

    def get_input_embeddings(self):
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value):
        self.transformer.word_embeddings = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def insert_images(self, hidden: torch.Tensor, input_ids: torch.Tensor | None,
                      pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Each image's `image_length` vectors go to the next run of `image_length` placeholder tokens."""
        n, token = self.config.image_length, self.config.image_token_id
        spots = (input_ids == token).nonzero() if input_ids is not None else None
        count = 0 if spots is None else len(spots)
        if count == 0:
            if pixel_values is not None and len(pixel_values):
                raise ValueError(f"pixel_values were given but the input has no image placeholders (id {token})")
            if self.training and torch.is_grad_enabled():
                # a text-only batch still runs the image encoder (times 0), so that every process of a distributed
                # run produces gradients for the same parameters
                size = self.config.eva_config["patch_size"]  # one patch: the class token and one position
                blank = torch.zeros(1, 3, size, size, device=hidden.device, dtype=hidden.dtype)
                hidden = hidden + self.image_encoder(blank).mean() * 0
            return hidden
        if pixel_values is None:
            raise ValueError("the input has image placeholders but no pixel_values: pass the images through the "
                             "processor")
        if count % n or count // n != len(pixel_values):
            raise ValueError(f"{count} image placeholder tokens for {len(pixel_values)} images; each image takes "
                             f"exactly {n}")
        groups = spots.view(-1, n, 2)
        if not bool((groups[:, :, 0] == groups[:, :1, 0]).all()) or \
                not bool((groups[:, :, 1] - groups[:, :1, 1] == torch.arange(n, device=spots.device)).all()):
            raise ValueError(f"each image's {n} placeholder tokens must stand together")
        features = self.image_encoder(pixel_values).to(hidden.dtype)
        return hidden.index_put((spots[:, 0], spots[:, 1]), features.reshape(-1, features.shape[-1]))

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        inputs.pop("position_ids", None)  # GenerationMixin's 1-D positions are not GLM's; forward makes them
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            inputs.pop("pixel_values", None)
        return inputs

    def _decode_positions(self, past: int, length: int, device) -> torch.Tensor:
        if self._generation_state is None:
            raise ValueError("a cached continuation needs the prompt's forward first (it sets the GLM positions)")
        pos = torch.zeros(2, len(self._generation_state), length, dtype=torch.long, device=device)
        for r, (first, context, masked) in enumerate(self._generation_state):
            idx = past + torch.arange(length, device=device) - first
            pos[0, r] = masked
            pos[1, r] = idx - context + 1
        return pos

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache: Cache | None = None,
                inputs_embeds=None, pixel_values=None, labels=None, use_cache=None, logits_to_keep: int = 0,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.training:
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.transformer.word_embeddings(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        length = inputs_embeds.shape[1]
        if past == 0:
            inputs_embeds = self.insert_images(inputs_embeds, input_ids, pixel_values)
        if position_ids is not None and past == 0:
            positions = position_ids
            if positions.dim() != 3 or positions.shape[0] != 2:
                raise ValueError(f"position_ids must be (2, batch, length) (position, block position), got "
                                 f"{tuple(positions.shape)}")
            mask = glm_mask(positions, attention_mask[:, -length:] if attention_mask is not None else None)
        elif past == 0:
            if input_ids is None:
                raise ValueError("without input_ids, pass position_ids (2, batch, length)")
            positions, state = glm_positions(input_ids, attention_mask, self.config)
            self._generation_state = state if use_cache else None
            mask = glm_mask(positions, attention_mask)
        else:
            positions = self._decode_positions(past, length, inputs_embeds.device)
            # a continuation comes after <sop>: it sees every real token before it
            valid = attention_mask.bool() if attention_mask is not None else \
                torch.ones(inputs_embeds.shape[0], past + length, dtype=torch.bool, device=inputs_embeds.device)
            causal = torch.ones(length, past + length, dtype=torch.bool, device=valid.device).tril(past)
            mask = (valid[:, None, :] & causal[None])[:, None]
        hidden = self.transformer(inputs_embeds, positions, mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
