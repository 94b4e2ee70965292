"""InternLM-XComposer2 (internlm-xcomposer2-7b, `model_type` "internlmxcomposer2"): mixtune's native port
(`mixtune.native.internlm_xcomposer2`), so the published folder loads without `trust_remote_code`. CLIP ViT-L
(`vit.vision_tower`) and `vision_proj` feed InternLM2 (`model.layers.N...`, `output`) whose projections carry
Partial LoRA (`Plora_A` / `Plora_B`, applied at image positions only). An image is written `<ImageHere>`, as in
the published prompts; chat turns are the published `[UNUSED_TOKEN_146]role\\n...[UNUSED_TOKEN_145]\\n`.

MixToken packs exactly: the image positions (and so the Partial LoRA mask) follow from each sample's own ids,
and position ids restart per sample."""

from __future__ import annotations

import tempfile

from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, save_checkpoint, seeded
from mixtune.native.internlm2.tokenization_internlm2 import train_tiny_spm
from mixtune.native.internlm_xcomposer2 import (InternLMXComposer2Config, InternLMXComposer2ForCausalLM,
                                                InternLMXComposer2Processor, InternLMXComposer2Tokenizer)
from mixtune.native.internlm_xcomposer2.tokenization_internlm_xcomposer2 import IM_END, IM_START, IMAGE_PLACEHOLDER
from mixtune.native.qwen_vl.processing_qwen_vl import clip_image_processor

# The published chat format (PaddleMIX's training text, and the remote code's chat()); no default system
# prompt, as PaddleMIX trains. Each image is written <ImageHere> where it stands.
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + "{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_PLACEHOLDER +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" + IM_END + "\n"
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}"
)

TINY_IMAGE, TINY_PATCH = 56, 14  # 4x4 patches: 16 image vectors per image
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   patch_size=TINY_PATCH, projection_dim=32)


def tiny_tokenizer() -> InternLMXComposer2Tokenizer:
    from mixtune.models.tokenizer import _CORPUS

    folder = tempfile.mkdtemp(prefix="xcomposer2_spm_")
    path = train_tiny_spm(folder, _CORPUS * 4, vocab_size=600, user_defined=(IM_START, IM_END))
    return InternLMXComposer2Tokenizer(vocab_file=path)


def build_tiny(output_dir: str) -> str:
    seeded()
    tok = tiny_tokenizer()
    per_side = TINY_IMAGE // TINY_PATCH
    processor = InternLMXComposer2Processor(clip_image_processor(TINY_IMAGE), tok, image_seq_length=per_side ** 2,
                                            chat_template=CHAT_TEMPLATE)
    config = InternLMXComposer2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=ROPE_THETA, initializer_range=INIT_STD,
        img_size=TINY_IMAGE, vision_config=TINY_VISION, image_placeholder_id=tok.image_placeholder_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["InternLMXComposer2ForCausalLM"])
    model = InternLMXComposer2ForCausalLM(config)
    save_checkpoint(model, processor, output_dir, tok)
    # generation stops at the end of a turn, as the published chat() does (eos and [UNUSED_TOKEN_145])
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]
    model.generation_config.save_pretrained(output_dir)
    return output_dir


FAMILY = Family(
    name="internlm_xcomposer2",
    model_types=("internlmxcomposer2",),
    vision=("vit.*",),
    projector=("vision_proj.*",),
    language=("model.*", "output.*"),
    # the projections themselves (not their Plora_A / Plora_B, which are part of the pretrained model)
    lora_targets=r".*model\.layers\.\d+\.(attention\.(wqkv|wo)|feed_forward\.(w1|w2|w3))",
    image_placeholder=IMAGE_PLACEHOLDER,
    build_tiny=build_tiny,
    pack_positions=text_positions,
    auto_class="AutoModelForCausalLM",
    default_chat_template=CHAT_TEMPLATE,  # published folders ship none (their remote code builds prompts)
)
