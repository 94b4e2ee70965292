"""Qwen2-VL: ViT with 2x2 patch merging (the merger is the projector, inside `model.visual`), M-RoPE LM.

Qwen2.5-VL and Qwen3-VL reuse this file's tokenizer and template; they differ only in config classes.
"""

from __future__ import annotations

import torch

from mixtune.data.grounding import QWEN_STYLE
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, TEXT_SIZES, chatml_template, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

IMAGE_MARKUP = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_MARKUP = "<|vision_start|><|video_pad|><|vision_end|>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def qwen_tokenizer():
    return train_tokenizer(
        SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_specific_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                       "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})


def token_ids(tok) -> dict:
    """The top-level config's special-token ids, shared by the Qwen-VL generations."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def text_sizes(tok, **extra) -> dict:
    return dict(TEXT_SIZES, vocab_size=len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **extra)


def build_tiny(output_dir: str) -> str:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    seeded()
    tok = qwen_tokenizer()
    # 112x112 images -> 8x8 patches of 14 -> 16 tokens after the 2x2 merge.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=chatml_template(IMAGE_MARKUP, video_markup=VIDEO_MARKUP))
    text = text_sizes(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                            "rope_theta": ROPE_THETA})
    vision = dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, initializer_range=INIT_STD,
                  rope_parameters={"rope_type": "axial", "rope_theta": ROPE_THETA})
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids(tok), eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, bos_token_id=None, tie_word_embeddings=True,
                           initializer_range=INIT_STD)
    return save_checkpoint(Qwen2VLForConditionalGeneration(config), processor, output_dir, tok)


def resized_image_size(processor, image) -> tuple[int, int]:
    """(width, height) of the image as the Qwen-VL image processor resizes it (its `smart_resize`), which is
    the frame Qwen2.5-VL's absolute box coordinates refer to."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    image_processor = processor.image_processor
    # PixelBudgetProcessor (data/dataset.py) passes an entry's min/max_pixels as `size` at call time
    size = getattr(processor, "images_kwargs", {}).get("size") or image_processor.size
    height, width = smart_resize(image.height, image.width,
                                 factor=image_processor.patch_size * image_processor.merge_size,
                                 min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return width, height


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
    model_types=("qwen2_vl",),
    vision=("model.visual.*",),
    projector=("model.visual.merger.*",),
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    pack_positions=mrope_positions,
    video_placeholder=VIDEO_MARKUP,
    grounding=QWEN_STYLE,  # 0-1000 (Qwen2-VL; Qwen3-VL too); Qwen2.5-VL: pixels, in qwen2_5_vl.py
)
