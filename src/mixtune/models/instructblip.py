"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction through its own tokenizer.

The processor feeds the Q-Former the whole text it is given, which in training would include the
answers; the family gives it the user turns only (the same in training and generation). Q-Former
token counts differ per sample, so batches zero-pad them (pad id 0, masked by qformer_attention_mask).
"""

from __future__ import annotations

import dataclasses

from mixtune.data.collate import pad_and_concat
from mixtune.data.encode import generation_inputs as generic_generation_inputs
from mixtune.data.templates import message_text, to_messages
from mixtune.models import blip_2
from mixtune.models.blip_2 import encode_query_prefixed, query_token_tokenizer
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

QUERY_TOKENS = 8


def qformer_inputs(conv, processor) -> dict:
    instruction = "\n".join(message_text(m, "") for m in to_messages(conv) if m["role"] == "user")
    out = processor.qformer_tokenizer([instruction], return_tensors="pt")
    return {"qformer_input_ids": out["input_ids"], "qformer_attention_mask": out["attention_mask"]}


def encode(conv, images, processor, render):
    return encode_query_prefixed(conv, images, processor, render, extra_media=qformer_inputs(conv, processor))


def generation_inputs(conv, images, processor, render) -> dict:
    inputs = generic_generation_inputs(conv, images, processor, render)
    return {**inputs, **qformer_inputs(conv, processor)}


def build_tiny(output_dir: str) -> str:
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor, InstructBlipQFormerConfig, InstructBlipVisionConfig,
                              LlamaConfig)

    seeded()
    tok = query_token_tokenizer()
    # a BERT-style Q-Former tokenizer: [PAD] is id 0, [CLS] ... [SEP] around the instruction
    qformer_tok = train_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], vocab_size=600, pad_token="[PAD]",
                                  unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    from tokenizers.processors import TemplateProcessing

    qformer_tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    processor = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 56, "width": 56}),
                                      tokenizer=tok, qformer_tokenizer=qformer_tok, num_query_tokens=QUERY_TOKENS)
    vision = InstructBlipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, image_size=56, patch_size=14)
    qformer = InstructBlipQFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, encoder_hidden_size=64, vocab_size=len(qformer_tok),
                                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                                num_query_tokens=QUERY_TOKENS, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = InstructBlipForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


# BLIP-2's parts, prompt format and LoRA targets; its own encoder (the Q-Former reads the user turns too).
FAMILY = dataclasses.replace(
    blip_2.FAMILY, name="instructblip", model_types=("instructblip",), build_tiny=build_tiny, encode=encode,
    generation_inputs=generation_inputs, collate_media=pad_and_concat)
