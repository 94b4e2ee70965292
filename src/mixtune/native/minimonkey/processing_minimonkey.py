"""MiniMonkey's processor: InternVL2's (text, `<image>` expansion, per-tile normalisation) with the tiles cut by
multi-scale adaptive cropping (msac.py) instead of InternVL2's single grid.

The layout is the image processor's settings, saved in preprocessor_config.json: `min_dynamic_patch` /
`max_dynamic_patch` bound the detail layer (InternVL2's keys), `adaptive_min_patch` / `adaptive_max_patch` the
adaptive layer, `adaptive_first` its place, `prior_rule` which adaptive grids may sit beside the detail grid.
The defaults are PaddleMIX's MiniMonkey training layout; PaddleMIX's chat demo uses min 4 / max 12, adaptive 3 / 7,
adaptive first (`msac.CHAT_LAYOUT`).
"""

from __future__ import annotations

from PIL import Image

from mixtune.native.internvl_chat.processing_internvl_chat import InternVLChatImageProcessor, InternVLChatProcessor
from mixtune.native.minimonkey.msac import TRAIN_LAYOUT, MsacLayout, msac_tiles


class MiniMonkeyImageProcessor(InternVLChatImageProcessor):
    def __init__(self, image_size: int = 448, dynamic_image_size: bool = True, use_thumbnail: bool = True,
                 min_dynamic_patch: int = TRAIN_LAYOUT.detail_min_tiles,
                 max_dynamic_patch: int = TRAIN_LAYOUT.detail_max_tiles,
                 adaptive_min_patch: int = TRAIN_LAYOUT.adaptive_min_tiles,
                 adaptive_max_patch: int = TRAIN_LAYOUT.adaptive_max_tiles,
                 adaptive_first: bool = TRAIN_LAYOUT.adaptive_first, prior_rule: str = TRAIN_LAYOUT.prior_rule,
                 **kwargs):
        super().__init__(image_size, dynamic_image_size, use_thumbnail, min_dynamic_patch, max_dynamic_patch,
                         **kwargs)
        self.adaptive_min_patch, self.adaptive_max_patch = adaptive_min_patch, adaptive_max_patch
        self.adaptive_first, self.prior_rule = adaptive_first, prior_rule
        self.layout()  # bad settings fail here, when the processor is built, not at the first image

    def layout(self) -> MsacLayout:
        return MsacLayout(self.min_dynamic_patch, self.max_dynamic_patch, self.adaptive_min_patch,
                          self.adaptive_max_patch, adaptive_first=self.adaptive_first, thumbnail=self.use_thumbnail,
                          prior_rule=self.prior_rule)

    def tiles(self, image: Image.Image) -> list[Image.Image]:
        image = image.convert("RGB") if image.mode != "RGB" else image
        if not self.dynamic_image_size:
            return [image]
        return msac_tiles(image, self.image_size, self.layout())[0]


class MiniMonkeyProcessor(InternVLChatProcessor):
    @classmethod
    def for_published_folder(cls, folder: str) -> MiniMonkeyProcessor:
        """A published MiniMonkey folder (like InternVL2's) has no processor files: config.json's tiling keys bound
        the detail layer; the adaptive layer takes PaddleMIX's training settings."""
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(folder)
        images = MiniMonkeyImageProcessor(config.image_size, config.dynamic_image_size, config.use_thumbnail,
                                          config.min_dynamic_patch, config.max_dynamic_patch)
        return cls(images, AutoTokenizer.from_pretrained(folder), num_image_token=config.num_image_token)
