"""CLIP (transformers' CLIPModel): an image tower and a text tower trained with InfoNCE. Task: contrastive.

The text tower pools at the EOS token, so the tokenizer adds BOS and EOS around every text.
"""

from __future__ import annotations

from mixtune.models.family import Family
from mixtune.models.tiny import save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TEXT_LENGTH = 32  # tiny text tower's positions: the demo's captions are a dozen tokens
IMAGE_SIZE, PATCH = 56, 8
TOWER_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   )


def bos_eos_tokenizer(special: list[str], bos: str, eos: str, pad: str, unk: str | None = None, **kwargs):
    """A tiny BPE that wraps every text as BOS text EOS (the towers pool at EOS or the last position)."""
    from tokenizers.processors import TemplateProcessing

    tok = train_tokenizer(special, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, **kwargs)
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.convert_tokens_to_ids(bos)),
                                                  (eos, tok.convert_tokens_to_ids(eos))])
    return tok


def build_tiny(output_dir: str, projection_dim: int = 32) -> str:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    seeded()
    tok = bos_eos_tokenizer(["<|endoftext|>", "<|startoftext|>", "<pad>"], "<|startoftext|>", "<|endoftext|>",
                            "<pad>", model_max_length=TEXT_LENGTH)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    config = CLIPConfig(
        text_config=dict(**TOWER_SIZES, vocab_size=len(tok), max_position_embeddings=TEXT_LENGTH,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(**TOWER_SIZES, image_size=IMAGE_SIZE, patch_size=PATCH),
        projection_dim=projection_dim)
    return save_checkpoint(CLIPModel(config), processor, output_dir)


# LoRA defaults of transformers' two-tower models (CLIP, SigLIP): both towers' attention projections
TOWER_ATTENTION = r".*(vision_model|text_model)\.encoder\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|out_proj)"
VISION = ("vision_model.*", "visual_projection.*")
TEXT = ("text_model.*", "text_projection.*")

FAMILY = Family(
    name="clip",
    model_types=("clip",),
    vision=VISION,
    projector=(),
    image_placeholder="",
    build_tiny=build_tiny,
    language=TEXT,
    lora_targets=TOWER_ATTENTION,
    auto_class="CLIPModel",
    uses_chat_template=False,
    task="contrastive",
    parts=(("vision", VISION), ("text", TEXT)),
)
