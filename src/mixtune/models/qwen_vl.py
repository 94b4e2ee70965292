"""Qwen-VL (Qwen-VL / Qwen-VL-Chat, `model_type` "qwen"): mixtune's native port (`mixtune.native.qwen_vl`), so
the published folder loads without `trust_remote_code`. ViT + `attn_pool` resampler (the projector, inside
`transformer.visual`), Qwen-7B language model under `transformer.h`. An image is written `Picture N:
<img></img>` as in Qwen-VL-Chat's prompts; the processor puts n_queries image tokens between the tags."""

from __future__ import annotations

import os
import tempfile

from mixtune.data.grounding import GroundingStyle
from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, save_checkpoint, seeded
from mixtune.native.qwen_vl import QWenConfig, QWenLMHeadModel, QWenTokenizer, QWenVLProcessor
from mixtune.native.qwen_vl.processing_qwen_vl import clip_image_processor
from mixtune.native.qwen_vl.tokenization_qwen import ENDOFTEXT, IM_END, IMG_END, IMG_START, write_tiktoken_file

IMAGE_MARKUP = f"{IMG_START}{IMG_END}"
# Qwen-VL-Chat's ChatML, each image as "Picture N: <img></img>\n", numbered through the conversation. Data in
# Qwen-VL's own shape ("Picture 1: <img>a.jpg</img>\nWhat is it?", read as "Picture 1: <image>\nWhat is it?")
# keeps its own "Picture N: " and newline rather than getting them twice.
CHAT_TEMPLATE = (
    "{% set ns = namespace(pic=0) %}"
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% set next = loop.nextitem if loop.nextitem is defined else none %}"
    "{% if part['type'] == 'image' %}{% set ns.pic = ns.pic + 1 %}Picture {{ ns.pic }}: " + IMAGE_MARKUP +
    "{% if not (next and next['type'] == 'text' and next['text'].startswith('\n')) %}{{ '\n' }}{% endif %}"
    "{% elif part['type'] == 'text' %}{% set tag = 'Picture ' ~ (ns.pic + 1) ~ ': ' %}"
    "{% if next and next['type'] == 'image' and part['text'].endswith(tag) %}"
    "{{ part['text'][:part['text'] | length - tag | length] }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen-VL's grounding markup: <ref>name</ref><box>(x1,y1),(x2,y2)</box>, coordinates 0-1000
QWEN_VL_STYLE = GroundingStyle(ref="<ref>{ref}</ref>", box="<box>{points}</box>")

TINY_IMAGE, TINY_QUERIES = 112, 16  # 8x8 patches of 14, resampled to 16 image tokens


def tiny_tiktoken_ranks() -> dict[bytes, int]:
    """BPE ranks for the tiny tokenizer: byte b at rank b, then merges learned locally on mixtune's small corpus."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from mixtune.models.tokenizer import train_tokenizer

    to_byte = {v: k for k, v in bytes_to_unicode().items()}
    learned = train_tokenizer([], vocab_size=800).backend_tokenizer.get_vocab()
    ranks = {bytes([b]): b for b in range(256)}
    for token, _ in sorted(learned.items(), key=lambda kv: kv[1]):
        ranks.setdefault(bytes(to_byte[c] for c in token), len(ranks))
    return ranks


def tiny_tokenizer(**kwargs) -> QWenTokenizer:
    folder = tempfile.mkdtemp(prefix="qwen_tiktoken_")
    path = write_tiktoken_file(tiny_tiktoken_ranks(), os.path.join(folder, "qwen.tiktoken"))
    return QWenTokenizer(vocab_file=path, eos_token=IM_END, pad_token=ENDOFTEXT, **kwargs)


def build_tiny(output_dir: str) -> str:
    seeded()
    tok = tiny_tokenizer()
    processor = QWenVLProcessor(clip_image_processor(TINY_IMAGE), tok, n_queries=TINY_QUERIES,
                                chat_template=CHAT_TEMPLATE)
    visual = dict(image_size=TINY_IMAGE, patch_size=14, width=64, layers=2, heads=4, mlp_ratio=2.0,
                  output_dim=128, image_start_id=tok.convert_tokens_to_ids(IMG_START), n_queries=TINY_QUERIES)
    # 128 wide: the resampler has one head per 128 channels, as published
    config = QWenConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        kv_channels=32, intermediate_size=256, rotary_emb_base=ROPE_THETA, initializer_range=INIT_STD,
                        visual=visual, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        architectures=["QWenLMHeadModel"])
    return save_checkpoint(QWenLMHeadModel(config), processor, output_dir, tok)


FAMILY = Family(
    name="qwen_vl",
    model_types=("qwen",),
    vision=("transformer.visual.*",),
    projector=("transformer.visual.attn_pool.*", "transformer.visual.ln_post.*", "transformer.visual.proj"),
    language=("transformer.wte.*", "transformer.h.*", "transformer.ln_f.*", "lm_head.*"),
    lora_targets=r".*transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj)",
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    pack_positions=text_positions,
    auto_class="AutoModelForCausalLM",
    grounding=QWEN_VL_STYLE,
    default_chat_template=CHAT_TEMPLATE,  # published Qwen-VL folders ship none (their remote code builds prompts)
)
