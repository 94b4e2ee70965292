"""Qwen-VL's configuration (`model_type` "qwen"): the keys of the published config.json, with its defaults.

`visual` is the vision tower's dict as published (image_size, patch_size, width, layers, heads, mlp_ratio,
output_dim, image_start_id); `n_queries` (default 256, the published value) may be added for smaller models.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

DEFAULT_VISUAL = {"image_size": 448, "patch_size": 14, "width": 1664, "layers": 48, "heads": 16,
                  "mlp_ratio": 4.9231, "output_dim": 4096, "image_start_id": 151857, "n_queries": 256}


class QWenConfig(PreTrainedConfig):
    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    max_position_embeddings: int = 8192
    scale_attn_weights: bool = True
    use_cache: bool = True
    kv_channels: int = 128
    rotary_pct: float = 1.0
    rotary_emb_base: float = 10000.0
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    intermediate_size: int = 22016
    no_bias: bool = True
    tie_word_embeddings: bool = False
    seq_length: int = 2048
    visual: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        self.visual = {**DEFAULT_VISUAL, **(self.visual or {})}
        super().__post_init__(**kwargs)

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def n_queries(self) -> int:
        return int(self.visual.get("n_queries", 256))
