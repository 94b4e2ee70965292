"""Qwen2-VL and Qwen2.5-VL: ViT with 2x2 patch merging, M-RoPE language model."""

from __future__ import annotations

import torch

from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, chatml_template, save_checkpoint, seeded
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
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                           pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=True)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return save_checkpoint(model, processor, output_dir)


def build_tiny_2_5(output_dir: str) -> str:
    """A tiny Qwen2.5-VL (windowed-attention ViT, same M-RoPE language model): the qwen2_vl builder's
    pattern with the 2.5 classes, for tests that must cover that model class too."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    seeded()
    tok = train_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_specific_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=chatml_template(IMAGE_MARKUP))
    text = dict(TEXT_SIZES, vocab_size=len(tok), bos_token_id=None, eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"],
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    # window 56 px = 2x2 merged patches: the tiny 112 px images get windowed and full-attention blocks
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
                              pad_token_id=ids["<|endoftext|>"], bos_token_id=None, tie_word_embeddings=True)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return save_checkpoint(model, processor, output_dir)


def mrope_positions(model, sample) -> torch.Tensor:
    """(4, L): row 0 the text positions 0..L-1, which transformers reads for sample boundaries when packed;
    rows 1-3 the M-RoPE (temporal, height, width) positions from the model's own `get_rope_index`, run on
    this sample alone, since it treats a packed row as one sequence."""
    mm = sample.token_fields.get("mm_token_type_ids")
    text = text_positions(model, sample)[None]
    if mm is None:  # a processor without modality ids: text only, all three rows are the text positions
        return text.expand(4, -1)
    grids = {k: sample.media[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
             if k in sample.media}
    with torch.no_grad():
        rope, _ = _inner(model).get_rope_index(sample.input_ids[None], mm[None], **grids)
    return torch.cat([text, rope[:, 0].to(text.dtype)], dim=0)


def _inner(model):
    """The module holding `get_rope_index` (Qwen2VLModel), also under a peft wrapper."""
    while not hasattr(type(model), "get_rope_index"):
        model = model.model if hasattr(model, "model") else model.base_model
    return model


FAMILY = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    vision=("model.visual.*",),
    projector=("model.visual.merger.*",),
    language=("model.language_model.*", "lm_head.*"),
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    pack_positions=mrope_positions,
)
