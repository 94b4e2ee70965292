"""VisualGLM-6B (`model_type` "chatglm"): mixtune's native port (`mixtune.native.visualglm`), so the published folder
loads without `trust_remote_code`. EVA ViT (`image_encoder.vit`) -> Q-Former (`image_encoder.qformer`, the
projector with `image_encoder.glm_proj`) -> ChatGLM-6B (`transformer`, `lm_head`).

Prompts are written as the published chat code writes them: `<img></img>` (the image's 32 query tokens go between
the tags) then `问：{question}\\n答：` per round, earlier rounds' replies after `答：` with a newline. A sample is
prompt + [gMASK] <sop> + reply + <eop>; in GLM's layout the prompt (the context) is attended both ways, so only
the last reply of a conversation can be trained: earlier ones are part of the prompt (one warning per process when
a conversation has several trained replies)."""

from __future__ import annotations

import logging
import tempfile

import torch

from mixtune.data.encode import IGNORE_INDEX, Encoded
from mixtune.data.templates import to_messages
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, save_checkpoint, seeded
from mixtune.native.visualglm import ChatGLMConfig, ChatGLMForConditionalGenerationWithImage
from mixtune.native.visualglm.modeling_chatglm import glm_positions
from mixtune.native.visualglm.paddlemix_names import paddlemix_names
from mixtune.native.visualglm.processing_visualglm import VisualGLMProcessor, blip_image_processor
from mixtune.native.visualglm.tokenization_chatglm import ChatGLMTokenizer, train_tiny_sentencepiece

log = logging.getLogger("mixtune")

IMAGE_MARKUP = "<img></img>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% for part in parts %}{% if part['type'] == 'image' %}" + IMAGE_MARKUP + "{% endif %}{% endfor %}问："
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}答："
    "{% elif message['role'] == 'assistant' %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% else %}{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '\\n' }}"
    "{% endif %}{% endfor %}"
)
# ChatGLM-6B's own attention and MLP projections (the ViT and Q-Former, also SwissArmyTransformer-named, excluded)
LORA_TARGETS = r"transformer\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))"
TINY_IMAGE = 56
_warned = False


def _last_trained_reply(conv, messages) -> int:
    global _warned
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and conv.turns[i].loss is not False]
    if not trained:
        raise conv.error("no assistant reply to train on", "conversations")
    if len(trained) > 1 and not _warned:
        _warned = True
        log.warning("visualglm: conversations with several replies train on the last one only; the earlier ones "
                    "are part of its prompt, which GLM attends both ways (first seen in %s)", conv.source_id)
    return trained[-1]


def _prompt_ids(processor, text: str, images: list, conv) -> list[int]:
    ids, spans = processor.encode_text(text)
    if spans != len(images):
        raise conv.error(f"the prompt has {spans} images but the sample gives {len(images)}", "image")
    return processor.tokenizer.build_inputs_with_special_tokens(ids)  # ... [gMASK] <sop>


def encode(conv, images, processor, render) -> Encoded:
    """prompt (every turn before the last trained reply) + [gMASK] <sop> + reply + <eop>; labels on reply + <eop>."""
    messages = to_messages(conv)
    last = _last_trained_reply(conv, messages)
    prompt = _prompt_ids(processor, render(messages[:last], True), images, conv)
    reply_text = "".join(p.get("text", "") for p in messages[last]["content"])
    tok = processor.tokenizer
    reply = tok.encode(reply_text, add_special_tokens=False) + [tok.eos_token_id]
    input_ids = torch.tensor(prompt + reply, dtype=torch.long)
    labels = torch.tensor([IGNORE_INDEX] * len(prompt) + reply, dtype=torch.long)
    media = {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]} if images else {}
    return Encoded(input_ids=input_ids, labels=labels, media=media, source=conv.source_id)


def generation_inputs(conv, images, processor, render) -> dict:
    """The prompt for answering the last user turn (a trailing assistant turn dropped), ending [gMASK] <sop>."""
    messages = to_messages(conv)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    ids = _prompt_ids(processor, render(messages, True), images, conv)
    out = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    if images:
        out["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return out


def pack_positions(model, sample: Encoded) -> torch.Tensor:
    """(2, L): GLM's position and block position of one sample; packed rows restart them per sample, and the model
    derives each sample's prefix-bidirectional mask from them, so MixToken packing is exact."""
    return glm_positions(sample.input_ids[None], None, model.config)[0][:, 0]


def tiny_tokenizer() -> ChatGLMTokenizer:
    from mixtune.models.tokenizer import _CORPUS

    folder = tempfile.mkdtemp(prefix="chatglm_sp_")
    path = train_tiny_sentencepiece(folder, _CORPUS + "\n问：\n答：\n<img></img>\n这张图片是什么颜色？\n", 600)
    return ChatGLMTokenizer(vocab_file=path)


def build_tiny(output_dir: str) -> str:
    seeded()
    tok = tiny_tokenizer()
    processor = VisualGLMProcessor(blip_image_processor(TINY_IMAGE), tok, image_length=32, chat_template=CHAT_TEMPLATE)
    patches = (TINY_IMAGE // 14) ** 2
    eva = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "inner_hidden_size": 64,
           "max_sequence_length": patches + 1, "image_size": [TINY_IMAGE, TINY_IMAGE], "patch_size": 14}
    qformer = {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "inner_hidden_size": 64,
               "vocab_size": 32, "is_decoder": [True, False], "cross_attn_hidden_size": 32}
    config = ChatGLMConfig(vocab_size=len(tok), hidden_size=64, num_layers=2, num_attention_heads=4,
                           inner_hidden_size=128, max_sequence_length=2048, initializer_range=INIT_STD,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id,
                           image_token_id=tok.unk_token_id, eva_config=eva, qformer_config=qformer, image_length=32,
                           architectures=["ChatGLMModel"])
    return save_checkpoint(ChatGLMForConditionalGenerationWithImage(config), processor, output_dir, tok)


FAMILY = Family(
    name="visualglm",
    model_types=("chatglm",),
    vision=("image_encoder.vit.*",),
    projector=("image_encoder.qformer.*", "image_encoder.glm_proj.*"),
    language=("transformer.*", "lm_head.*"),
    lora_targets=LORA_TARGETS,
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    encode=encode,
    generation_inputs=generation_inputs,
    pack_positions=pack_positions,
    auto_class="AutoModelForCausalLM",
    default_chat_template=CHAT_TEMPLATE,  # published VisualGLM-6B folders ship none (their remote code builds prompts)
    paddle_names=paddlemix_names,
)
