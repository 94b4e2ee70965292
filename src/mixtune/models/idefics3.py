"""Idefics3: SigLIP tower, pixel-shuffle `connector` (the projector), Llama 3 language model.

Images are split into a grid of tiles plus a global view; pixel_values are (samples, images x tiles,
3, H, W) with a count that differs per sample, so batches zero-pad them (the model drops all-zero images).
SmolVLM shares this file's builder.
"""

from __future__ import annotations

from mixtune.data.collate import pad_and_concat
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

TILE, PATCH = 56, 14
IMAGE_SEQ_LEN = (TILE // PATCH) ** 2 // 4  # scale_factor 2 merges 2x2 patches
# The checkpoints' "User:<image>...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n" style.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{% if message['role'] == 'assistant' %} {% endif %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
           "<end_of_utterance>", "<global-img>", "<video>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def build_tiny(output_dir: str, kind: str = "idefics3") -> str:
    import transformers

    prefix = {"idefics3": "Idefics3", "smolvlm": "SmolVLM"}[kind]
    cls = {name: getattr(transformers, prefix + name) for name in
           ("Config", "VisionConfig", "ForConditionalGeneration", "ImageProcessor", "Processor")}
    seeded()
    tok = train_tokenizer(SPECIAL, bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<pad>")
    image_processor = cls["ImageProcessor"](size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})
    extra = {}
    if kind == "smolvlm":
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        extra["video_processor"] = SmolVLMVideoProcessor(size={"longest_edge": 2 * TILE},
                                                         max_image_size={"longest_edge": TILE})
    processor = cls["Processor"](image_processor=image_processor, tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                                 chat_template=CHAT_TEMPLATE, **extra)
    vision = cls["VisionConfig"](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=TILE, patch_size=PATCH)
    text = dict(TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, model_type="llama")
    config = cls["Config"](vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                           scale_factor=2, tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    model = cls["ForConditionalGeneration"](config)
    return save_checkpoint(model, processor, output_dir, tok)


FAMILY = Family(
    name="idefics3",
    model_types=("idefics3",),
    vision=("model.vision_model.*",),
    projector=("model.connector.*",),
    language=("model.text_model.*", "lm_head.*"),
    lora_targets=r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    image_placeholder="<image>",
    build_tiny=build_tiny,
    collate_media=pad_and_concat,
    pack_positions=text_positions,
)
