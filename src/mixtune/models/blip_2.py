"""BLIP-2: ViT, a Q-Former whose learned queries (plus `language_projection`) form the projector, and an
OPT or Flan-T5 language model. The processor puts `num_query_tokens` image tokens before the text itself
(tokenised from a separate string), so `<image>` never appears in the prompt and one image goes with each
sample; the family's encode keeps those tokens out of the character-offset label mapping."""

from __future__ import annotations

from mixtune.data.encode import Encoded, assistant_spans, labels_from_offsets, split_fields
from mixtune.data.templates import to_messages
from mixtune.models.family import Family
from mixtune.models.tiny import save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

# BLIP-2's prompt style ("Question: ... Answer: ..."): real checkpoints ship no chat template, so neither
# does the tiny one, and this is the family's default.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    "{% if message['role'] == 'user' %}Question: {{ part['text'] }} Answer:"
    "{% elif message['role'] == 'assistant' %} {{ part['text'] }}</s>{% else %}{{ part['text'] }} {% endif %}"
    "{% endif %}{% endfor %}{% if message['role'] == 'assistant' %} {% endif %}{% endfor %}"
)
# the language model's projections, for OPT (q/k/v/out_proj, fc1/fc2), Llama/Vicuna (InstructBLIP) and
# Flan-T5 (q/k/v/o, wi*/wo)
LORA_TARGETS = (r".*language_model.*\.(q_proj|k_proj|v_proj|out_proj|o_proj|fc1|fc2|gate_proj|up_proj|down_proj|"
                r"SelfAttention\.(q|k|v|o)|EncDecAttention\.(q|k|v|o)|DenseReluDense\.(wi|wi_0|wi_1|wo))")
QUERY_TOKENS = 8


def query_token_tokenizer():
    # no `image_token` attribute, like the real OPT/T5 tokenizers: the processor then uses "<image>" itself
    return train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<pad>")


def encode_query_prefixed(conv, images, processor, render, extra_media: dict | None = None) -> Encoded:
    """Generic labelling for processors that prepend the image's query tokens before the text."""
    if len(images) != 1:
        raise conv.error(f"{type(processor).__name__} takes exactly one image per sample, got {len(images)}", "image")
    full, spans = assistant_spans(to_messages(conv), render, conv)
    out = processor(text=[full], images=images, return_offsets_mapping=True, add_special_tokens=False,
                    return_tensors="pt")
    input_ids = out["input_ids"][0]
    offsets = out["offset_mapping"][0].clone()
    offsets[: processor.num_query_tokens] = 0  # offsets into the query-token string, not into `full`
    extra_media = extra_media or {}
    token_fields, media = split_fields({k: v for k, v in out.items() if k not in extra_media}, input_ids.shape[0])
    media.update(extra_media)
    return Encoded(input_ids=input_ids, labels=labels_from_offsets(input_ids, offsets, spans, conv),
                   token_fields=token_fields, media=media, source=conv.source_id)


def build_tiny(output_dir: str) -> str:
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              Blip2QFormerConfig, Blip2VisionConfig, OPTConfig)

    seeded()
    tok = query_token_tokenizer()
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 56, "width": 56}), tokenizer=tok,
                               num_query_tokens=QUERY_TOKENS)
    vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=56, patch_size=14)
    qformer = Blip2QFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    text = OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                     vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, dropout=0.0, max_position_embeddings=512)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text,
                         num_query_tokens=QUERY_TOKENS, image_token_index=tok.convert_tokens_to_ids("<image>"))
    model = Blip2ForConditionalGeneration(config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="blip-2",
    model_types=("blip-2",),
    vision=("vision_model.*",),
    projector=("query_tokens", "qformer.*", "language_projection.*"),
    language=("language_model.*",),
    lora_targets=LORA_TARGETS,
    image_placeholder="",
    build_tiny=build_tiny,
    encode=encode_query_prefixed,
    default_chat_template=CHAT_TEMPLATE,
)
