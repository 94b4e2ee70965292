"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merging, M-RoPE language model."""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, TEXT_SIZES, chatml_template, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def build_tiny(output_dir: str, model_type: str = "qwen2_vl") -> str:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    seeded()
    tok = train_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_specific_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # 112x112 images -> 8x8 patches of 14 -> 16 tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=chatml_template(IMAGE_MARKUP))
    text = dict(TEXT_SIZES, vocab_size=len(tok), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": ROPE_THETA})
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT_STD,
                  rope_parameters={"rope_type": "axial", "rope_theta": ROPE_THETA})
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=True,
                           initializer_range=INIT_STD)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return save_checkpoint(model, processor, output_dir)


FAMILY = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    vision=("model.visual.*",),
    projector=("model.visual.merger.*",),
    language=("model.language_model.*", "lm_head.*"),
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
)
