"""SigLIP2 (transformers' Siglip2Model): SigLIP's towers and sigmoid loss with NaFlex image input (patches at
the image's own aspect ratio, padded to `max_num_patches`, with `pixel_attention_mask` and `spatial_shapes`).
Task: contrastive. Texts are padded to `max_length`, as for SigLIP."""

from __future__ import annotations

from mixtune.models.clip import IMAGE_SIZE, PATCH, TEXT_LENGTH, TOWER_SIZES, bos_eos_tokenizer
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, save_checkpoint, seeded

MAX_PATCHES = (IMAGE_SIZE // PATCH) ** 2


def build_tiny(output_dir: str) -> str:
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model, Siglip2Processor

    seeded()
    tok = bos_eos_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", unk="<unk>",
                            model_max_length=TEXT_LENGTH)
    image_processor = Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=MAX_PATCHES)
    processor = Siglip2Processor(image_processor=image_processor, tokenizer=tok)
    config = Siglip2Config(
        text_config=dict(**TOWER_SIZES, vocab_size=len(tok), max_position_embeddings=TEXT_LENGTH,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         projection_size=64),
        vision_config=dict(**TOWER_SIZES, num_patches=MAX_PATCHES, patch_size=PATCH), initializer_range=INIT_STD)
    return save_checkpoint(Siglip2Model(config), processor, output_dir)


VISION = ("vision_model.*",)
TEXT = ("text_model.*",)

FAMILY = Family(
    name="siglip2",
    model_types=("siglip2",),
    vision=VISION,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=TEXT,
    lora_targets=r".*(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    auto_class="Siglip2Model",
    uses_chat_template=False,
    task="contrastive",
    parts=(("vision", VISION), ("text", TEXT)),
)
