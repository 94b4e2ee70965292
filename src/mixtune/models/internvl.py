"""InternVL (the transformers-native `-hf` checkpoints, InternVL2.5/3): InternViT, pixel-shuffle MLP
projector, Qwen2 language model. Images are cut into 1..max_patches tiles (plus a thumbnail), each
worth `image_seq_length` `<IMG_CONTEXT>` tokens between `<img>` and `</img>`; tiles of all images stack
along dim 0, so the default collation holds."""

from __future__ import annotations

from mixtune.data.grounding import INTERNVL_STYLE
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, TEXT_SIZES, chatml_template, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 112, 14
IMAGE_SEQ_LENGTH = (TILE // PATCH) ** 2 // 4  # the projector's pixel shuffle merges 2x2 patches


def build_tiny(output_dir: str) -> str:
    from transformers import (GotOcr2ImageProcessor, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLProcessor, InternVLVisionConfig, Qwen2Config)
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    seeded()
    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                           "<video>"], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          model_specific_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                         "context_image_token": "<IMG_CONTEXT>",
                                                         "video_token": "<video>"})
    image_processor = GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=True,
                                            max_patches=4)
    processor = InternVLProcessor(image_processor=image_processor, tokenizer=tok,
                                  video_processor=InternVLVideoProcessor(size={"height": TILE, "width": TILE}),
                                  image_seq_length=IMAGE_SEQ_LENGTH, chat_template=chatml_template("<IMG_CONTEXT>\n"))
    vision = InternVLVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=[TILE, TILE], patch_size=[PATCH, PATCH], initializer_range=INIT_STD)
    text = Qwen2Config(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id,
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=IMAGE_SEQ_LENGTH, downsample_ratio=0.5, tie_word_embeddings=True,
                            initializer_range=INIT_STD)
    model = InternVLForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="internvl",
    model_types=("internvl",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*",),
    image_placeholder="<IMG_CONTEXT>\n",
    build_tiny=build_tiny,
    pack_positions=text_positions,
    grounding=INTERNVL_STYLE,
)
