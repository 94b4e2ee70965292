"""PaliGemma: SigLIP tower, a linear projector, Gemma. No chat template: a sample is a prefix (the
images, then the prompt) and a suffix (the answer); the processor builds `token_type_ids` (0 prefix,
1 suffix), which the model needs for its prefix-LM attention, and labels on the suffix alone.

A conversation maps to one (prefix, suffix) pair: the system and user text form the prefix with every
image first (where PaliGemma was trained to see them), the single reply is the suffix."""

from __future__ import annotations

from mixtune.data.conversation import IMAGE_PLACEHOLDER
from mixtune.data.encode import Encoded, split_fields
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 56, 14


def prefix_and_suffix(conv) -> tuple[str, str | None]:
    replies = [t.text for t in conv.turns if t.role == "assistant"]
    if len(replies) > 1:
        raise conv.error(f"PaliGemma trains on one prefix/suffix pair per sample; this conversation has "
                         f"{len(replies)} assistant turns (split it into one sample per reply)")
    prompt_turns = [t.text for t in conv.turns if t.role != "assistant"]
    text = "\n".join(prompt_turns)
    n_images = text.count(IMAGE_PLACEHOLDER)
    return IMAGE_PLACEHOLDER * n_images + text.replace(IMAGE_PLACEHOLDER, ""), (replies[0] if replies else None)


def encode(conv, images, processor, render=None) -> Encoded:
    prefix, suffix = prefix_and_suffix(conv)
    if suffix is None:
        raise conv.error("conversation has no assistant turn to train on")
    out = processor(text=[prefix], images=images, suffix=[suffix], return_tensors="pt")
    input_ids = out["input_ids"][0]
    token_fields, media = split_fields(out, input_ids.shape[0])
    return Encoded(input_ids=input_ids, labels=out["labels"][0], token_fields=token_fields, media=media,
                   source=conv.source_id)


def generation_inputs(conv, images, processor, render=None) -> dict:
    turns = conv.turns[:-1] if conv.turns[-1].role == "assistant" else conv.turns
    prefix, _ = prefix_and_suffix(type(conv)(turns=turns, images=conv.images))
    return dict(processor(text=[prefix], images=images, return_tensors="pt"))


def build_tiny(output_dir: str) -> str:
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor,
                              SiglipImageProcessor, SiglipVisionConfig)
    from transformers.models.paligemma.processing_paligemma import EXTRA_TOKENS

    seeded()
    # the real vocabulary holds PaliGemma's <locNNNN>/<segNNN> detection tokens; the processor adds any missing
    tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"] + EXTRA_TOKENS, bos_token="<bos>",
                          eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    image_processor = SiglipImageProcessor(size={"height": TILE, "width": TILE})
    image_processor.image_seq_length = (TILE // PATCH) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                image_size=TILE, patch_size=PATCH, projection_dim=64)
    text = GemmaConfig(**TEXT_SIZES, head_dim=16, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text,
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             projection_dim=64, hidden_size=64, vocab_size=len(tok))
    model = PaliGemmaForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="paligemma",
    model_types=("paligemma",),
    vision=("model.vision_tower.*",),
    projector=("model.multi_modal_projector.*",),
    image_placeholder=IMAGE_PLACEHOLDER,
    build_tiny=build_tiny,
    encode=encode,
    generation_inputs=generation_inputs,
    uses_chat_template=False,
)
