"""MiniGPT-4's configuration (`model_type` "minigpt4"): the keys of PaddleMIX's MiniGPT4Config.

`vision_config` (BLIP-2's EVA ViT-g), `qformer_config` (BLIP-2's Q-Former), `text_config` (a Llama / Vicuna) and
`num_query_tokens`, as PaddleMIX writes them; these are BLIP-2's keys, so transformers' `Blip2Config` reads them
and this class only changes the model type and the default language model (Llama, the one MiniGPT-4 uses).
`image_token_index` (also read as `image_token_id`) is the id the processor writes at each of an image's query
positions. It may lie past the language model's vocabulary (a published Vicuna has no such token): the model
never looks it up, it puts the image's vectors there.
"""

from __future__ import annotations

from transformers import AutoConfig, Blip2Config
from transformers.configuration_utils import SubConfigSpec

IMAGE_TOKEN = "<ImageHere>"


class MiniGPT4Config(Blip2Config):
    model_type = "minigpt4"
    sub_configs_defaults = {**Blip2Config.sub_configs_defaults,
                            "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
