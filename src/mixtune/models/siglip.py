"""SigLIP (transformers' SiglipModel): image and text towers trained with the pairwise sigmoid loss.
Task: contrastive. The text tower pools the last position, so texts are padded to `max_length`."""

from __future__ import annotations

from mixtune.models.clip import IMAGE_SIZE, PATCH, TEXT_LENGTH, TOWER_ATTENTION, TOWER_SIZES, bos_eos_tokenizer
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, save_checkpoint, seeded


def build_tiny(output_dir: str) -> str:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    seeded()
    tok = tiny_tokenizer()
    image_processor = SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tok)
    config = SiglipConfig(text_config=tiny_text_config(tok), initializer_range=INIT_STD,
                          vision_config=dict(**TOWER_SIZES, image_size=IMAGE_SIZE, patch_size=PATCH))
    return save_checkpoint(SiglipModel(config), processor, output_dir)


def tiny_tokenizer():
    return bos_eos_tokenizer(["<unk>", "<s>", "</s>", "<pad>"], "<s>", "</s>", "<pad>", unk="<unk>",
                             model_max_length=TEXT_LENGTH)


def tiny_text_config(tok) -> dict:
    """The text tower of the tiny SigLIP and SigLIP2 checkpoints (the same architecture in both)."""
    return dict(**TOWER_SIZES, vocab_size=len(tok), max_position_embeddings=TEXT_LENGTH,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                projection_size=64)


VISION = ("vision_model.*",)
TEXT = ("text_model.*",)

FAMILY = Family(
    name="siglip",
    model_types=("siglip",),
    vision=VISION,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=TEXT,
    lora_targets=TOWER_ATTENTION,
    auto_class="SiglipModel",
    uses_chat_template=False,
    task="contrastive",
    parts=(("vision", VISION), ("text", TEXT)),
)
