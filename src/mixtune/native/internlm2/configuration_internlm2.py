"""InternLM2's configuration (`model_type` "internlm2"): the keys of the published config.json, with its defaults.

`rope_scaling` keeps the published shape ({"type": "dynamic" | "linear", "factor": float}) and is saved back as
such. The published `attn_implementation` (often "flash_attention_2", for its remote code) is read as a wish, not
an order: it is kept only when it names an implementation this machine has (eager, sdpa, or flash-attn installed).
"""

from __future__ import annotations

import importlib.util

from transformers import PreTrainedConfig

ROPE_SCALING_TYPES = ("dynamic", "linear")


class InternLM2Config(PreTrainedConfig):
    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 103168
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    bias: bool = True
    rope_theta: float = 10000.0
    # a plain field here (not transformers' deprecated `rope_scaling` property): saved as published
    rope_scaling: dict | None = None

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            kind, factor = self.rope_scaling.get("type"), self.rope_scaling.get("factor")
            if kind not in ROPE_SCALING_TYPES or not isinstance(factor, (int, float)) or factor < 1:
                raise ValueError(f"InternLM2 rope_scaling must be {{'type': one of {ROPE_SCALING_TYPES}, "
                                 f"'factor': a number >= 1}}, got {self.rope_scaling}")
        wish = kwargs.get("attn_implementation")
        if wish is not None and wish not in ("eager", "sdpa") and not (
                wish == "flash_attention_2" and importlib.util.find_spec("flash_attn") is not None):
            kwargs.pop("attn_implementation")  # the default (sdpa where available) computes the same
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads
