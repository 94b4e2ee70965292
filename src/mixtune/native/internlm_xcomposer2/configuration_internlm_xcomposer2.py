"""InternLM-XComposer2's configuration (`model_type` "internlmxcomposer2"): InternLM2's keys as published (the
defaults are internlm-xcomposer2-7b's config.json), plus what its remote code hard-codes, as keys with the
published values for a default:

- `img_size` (224): images are resized to img_size squared; also PaddleMIX's key. The CLIP tower's position
  table has (img_size / patch)^2 + 1 rows, as stored in the checkpoint (-vl-7b: 490).
- `vision_config`: the CLIP vision tower (`vit.vision_tower`), ViT-L/14 (the published code loads
  openai/clip-vit-large-patch14-336 and resizes its position table to img_size).
- `vision_projector`: PaddleMIX's key, {"mlp_depth": 2} = Linear, GELU, Linear (`vision_proj`), as published.
- `image_placeholder_id`: mixtune's; the id the processor writes at each image-embedding position (the tokenizer's
  `<ImageHere>`, added after the published vocabulary, so by default `vocab_size`). The published model
  never sees ids there: it splices image embeddings between text pieces.
"""

from __future__ import annotations

from transformers import CLIPVisionConfig
from transformers.configuration_utils import SubConfigSpec

from mixtune.native.internlm2.configuration_internlm2 import InternLM2Config

CLIP_VIT_L14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "patch_size": 14, "image_size": 224, "projection_dim": 768, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5}


class InternLMXComposer2Config(InternLM2Config):
    model_type = "internlmxcomposer2"
    sub_configs_defaults = {"vision_config": SubConfigSpec(config_class=CLIPVisionConfig, init_kwargs=CLIP_VIT_L14)}

    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    bias: bool = False
    rope_theta: float = 1000000.0
    pad_token_id: int | None = 2
    max_length: int = 4096
    img_size: int = 224
    vision_config: dict | CLIPVisionConfig | None = None
    vision_projector: dict | None = None
    image_placeholder_id: int | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop("vision_tower", None)  # PaddleMIX's key: the name the tower was first loaded from
        super().__post_init__(**kwargs)
        self.vision_config.image_size = self.img_size
        self.vision_projector = {"mlp_depth": 2, **(self.vision_projector or {})}
        if self.image_placeholder_id is None:
            self.image_placeholder_id = self.vocab_size

    @property
    def mlp_depth(self) -> int:
        return int(self.vision_projector["mlp_depth"])
