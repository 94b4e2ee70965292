"""InternVL2's configurations, with the published config.json keys and defaults.

`InternVisionConfig` (`model_type` "intern_vit_6b", the published name for every InternViT size) and
`InternVLChatConfig` (`model_type` "internvl_chat"): `vision_config`, `llm_config` (its `architectures[0]` picks
the language model: InternLM2ForCausalLM, Qwen2ForCausalLM or LlamaForCausalLM, as published), the pixel-shuffle
`downsample_ratio`, the dynamic-tiling keys the processor reads (`force_image_size`, `dynamic_image_size`,
`use_thumbnail`, `min_dynamic_patch`, `max_dynamic_patch`) and `template` (the conversation format's name).

`img_context_token_id` is mixtune's addition: published folders leave it to their chat code, which reads it from
the tokenizer; mixtune does the same when a folder's config has none (`context_token_id_of_folder`).
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, PreTrainedConfig, Qwen2Config

from mixtune.native.internlm2 import InternLM2Config

IMG_CONTEXT, IMG_START, IMG_END = "<IMG_CONTEXT>", "<img>", "</img>"
# llm_config.architectures[0] -> its configuration class (the model class is picked alike in the modeling)
LLM_CONFIGS = {"InternLM2ForCausalLM": InternLM2Config, "Qwen2ForCausalLM": Qwen2Config,
               "LlamaForCausalLM": LlamaConfig}


class InternVisionConfig(PreTrainedConfig):
    model_type = "intern_vit_6b"
    base_config_key = "vision_config"

    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 224
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = True  # published; mixtune's attention is SDPA either way
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1

    def __post_init__(self, **kwargs):
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"InternViT norm_type must be rms_norm or layer_norm, got {self.norm_type!r}")
        super().__post_init__(**kwargs)


def llm_config_from(value) -> PreTrainedConfig:
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(value or {"architectures": ["InternLM2ForCausalLM"]})
    architecture = (value.get("architectures") or ["InternLM2ForCausalLM"])[0]
    if architecture not in LLM_CONFIGS:
        raise ValueError(f"internvl_chat: llm_config.architectures[0] {architecture!r} is not one of "
                         f"{', '.join(LLM_CONFIGS)}")
    value.pop("model_type", None)
    return LLM_CONFIGS[architecture](**value)


class InternVLChatConfig(PreTrainedConfig):
    model_type = "internvl_chat"
    sub_configs = {"vision_config": InternVisionConfig, "llm_config": AutoConfig}

    vision_config: dict | PreTrainedConfig | None = None
    llm_config: dict | PreTrainedConfig | None = None
    use_backbone_lora: int = 0
    use_llm_lora: int = 0
    pad2square: bool = False
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    img_context_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if not isinstance(self.vision_config, InternVisionConfig):
            vision = dict(self.vision_config or {})
            vision.pop("model_type", None)
            self.vision_config = InternVisionConfig(**vision)
        self.llm_config = llm_config_from(self.llm_config)
        super().__post_init__(**kwargs)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        return self.llm_config

    @property
    def image_size(self) -> int:
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def num_image_token(self) -> int:
        """`<IMG_CONTEXT>` tokens per tile: the patch grid after the pixel shuffle."""
        return int((self.image_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio ** 2)


def context_token_id_of_folder(folder: str) -> int | None:
    """The `<IMG_CONTEXT>` id a checkpoint folder's tokenizer files give (tokenizer_config.json's
    added_tokens_decoder, or tokenizer.json's added_tokens), without building the tokenizer; None if neither has it."""
    import json
    import os

    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            for token_id, token in (json.load(f).get("added_tokens_decoder") or {}).items():
                if token.get("content") == IMG_CONTEXT:
                    return int(token_id)
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        with open(path) as f:
            for token in json.load(f).get("added_tokens") or []:
                if token.get("content") == IMG_CONTEXT:
                    return int(token["id"])
    return None
