"""CogVLM's and CogAgent's configurations: the keys of the published config.json (THUDM/cogvlm-chat-hf,
THUDM/cogagent-chat-hf), with their defaults, under the `model_type`s PaddleMIX's CogModelConfig uses ("cogvlm",
"cogagent").

`vision_config` is the EVA2-CLIP tower's dict as published (hidden_size, image_size, patch_size, num_heads,
num_hidden_layers, num_positions, intermediate_size, layer_norm_eps, hidden_act, in_channels, dropout_prob).
CogAgent adds the high-resolution branch: `cross_image_size`, `cross_hidden_size` (the EVA-CLIP-L tower's width,
which its cross-attention keys and values read) and `cross_compute_hidden_size` (the cross-attention's own
width). The published code hard-codes that tower's other sizes (24 layers, 64-wide heads, MLP ratio 2.6667,
patch 14); `cross_vision_config` may override them for smaller models. `rope_theta` (not in the published
config, whose code fixes 10000) may be set for small models.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

COGVLM_VISION = {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": 1792, "image_size": 490, "in_channels": 3,
                 "intermediate_size": 15360, "layer_norm_eps": 1e-06, "num_heads": 16, "num_hidden_layers": 63,
                 "num_positions": 1226, "patch_size": 14}
COGAGENT_VISION = {**COGVLM_VISION, "image_size": 224, "num_positions": 257}
# EVA-CLIP-L as CogAgent's published cross_visual.py builds it (Eva2LargeEncoder); width = cross_hidden_size
CROSS_VISION = {"layers": 24, "head_width": 64, "mlp_ratio": 2.6667, "patch_size": 14, "pt_hw_seq_len": 16}


class CogVLMConfig(PreTrainedConfig):
    model_type = "cogvlm"
    keys_to_ignore_at_inference = ["past_key_values"]
    default_vision = COGVLM_VISION

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-05
    template_version: str = "chat"
    use_cache: bool = True
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    vision_config: dict | None = None
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self, **kwargs):
        self.vision_config = {**self.default_vision, **(self.vision_config or {})}
        super().__post_init__(**kwargs)

    @property
    def vision_tokens(self) -> int:
        """Input positions one image takes: its patches plus the boi and eoi vectors."""
        grid = int(self.vision_config["image_size"]) // int(self.vision_config["patch_size"])
        return grid * grid + 2


class CogAgentConfig(CogVLMConfig):
    model_type = "cogagent"
    default_vision = COGAGENT_VISION

    cross_image_size: int = 1120
    cross_hidden_size: int = 1024
    cross_compute_hidden_size: int = 1024
    cross_vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        self.cross_vision_config = {**CROSS_VISION, **(self.cross_vision_config or {})}
        super().__post_init__(**kwargs)
