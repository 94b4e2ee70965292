"""SigLIP2 (transformers' Siglip2Model): SigLIP's towers and sigmoid loss with NaFlex image input (patches at
the image's own aspect ratio, padded to `max_num_patches`, with `pixel_attention_mask` and `spatial_shapes`).
Task: contrastive. Texts are padded to `max_length`, as for SigLIP. Only what differs from SigLIP is said here."""

from __future__ import annotations

import dataclasses

from mixtune.models import siglip
from mixtune.models.clip import IMAGE_SIZE, PATCH, TOWER_SIZES
from mixtune.models.tiny import INIT_STD, save_checkpoint, seeded

MAX_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def build_tiny(output_dir: str) -> str:
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    seeded()
    tok = siglip.tiny_tokenizer()
    image_processor = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tok)
    config = Siglip2Config(text_config=siglip.tiny_text_config(tok), initializer_range=INIT_STD,
                           vision_config=dict(**TOWER_SIZES, num_patches=MAX_PATCHES, patch_size=PATCH))
    return save_checkpoint(Siglip2Model(config), processor, output_dir)


FAMILY = dataclasses.replace(siglip.FAMILY, name="siglip2", model_types=("siglip2",), build_tiny=build_tiny,
                             auto_class="Siglip2Model")
