"""VisualGLM-6B's configuration (`model_type` "chatglm", as its published config.json says): the ChatGLM-6B keys
(`num_layers`, `inner_hidden_size`, `layernorm_epsilon`, the [MASK] / [gMASK] / <sop> / <eop> ids,
`position_encoding_2d`) plus the image part's two SwissArmyTransformer argument dicts, `eva_config` (the EVA ViT)
and `qformer_config` (the Q-Former), and `image_length` (query tokens per image, 32).

Keys this port adds (absent from the published file, defaults = the published behaviour): `image_token_id` (the
placeholder id filling an image's `image_length` positions; `<unk>`, as the published chat code writes them),
`eva_config.hidden_act` ("gelu_pytorch_tanh": SwissArmyTransformer's default GELU), `eva_config.ln_vision_eps`
(1e-5, torch's LayerNorm default that the published `ln_vision` uses).
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from mixtune.errors import MixtuneError

DEFAULT_EVA = {"num_layers": 39, "hidden_size": 1408, "num_attention_heads": 16, "vocab_size": 1,
               "layernorm_order": "pre", "max_sequence_length": 257, "inner_hidden_size": 6144,
               "use_final_layernorm": False, "layernorm_epsilon": 1e-6, "image_size": [224, 224], "pre_len": 1,
               "post_len": 0, "in_channels": 3, "num_classes": 0, "patch_size": 14}
DEFAULT_QFORMER = {"num_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "vocab_size": 32,
                   "layernorm_order": "post", "max_sequence_length": 0, "is_decoder": [True, False] * 6,
                   "cross_attn_hidden_size": 1408, "layernorm_epsilon": 1e-12}


class ChatGLMConfig(PreTrainedConfig):
    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    image_token_id: int = 0
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    eva_config: dict | None = None
    qformer_config: dict | None = None
    image_length: int = 32

    def __post_init__(self, **kwargs):
        later = sorted(set(kwargs) & {"multi_query_attention", "padded_vocab_size", "apply_query_key_layer_scaling"})
        if later:  # ChatGLM2 / ChatGLM3 / GLM-4 folders say "chatglm" too, but are another architecture
            raise MixtuneError(f"this config.json (with {', '.join(later)}) is ChatGLM2 / ChatGLM3 / GLM-4, which "
                             "mixtune does not support; its 'chatglm' port is VisualGLM-6B (ChatGLM-6B + BLIP-2)")
        self.eva_config = {**DEFAULT_EVA, **(self.eva_config or {})}
        self.qformer_config = {**DEFAULT_QFORMER, **(self.qformer_config or {})}
        super().__post_init__(**kwargs)
