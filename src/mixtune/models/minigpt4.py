"""MiniGPT-4 (`model_type` "minigpt4"): mixtune's native port (`mixtune.native.minigpt4`). BLIP-2's EVA ViT-g and
Q-Former (`vision_model`, `query_tokens`, `qformer`), one linear layer (`language_projection`, the published
`llama_proj`) and a Vicuna / Llama (`language_model`). `mixtune convert --from minigpt4` builds the folder
from the released pieces. MiniGPT-4 trains only the projection: `freeze_vision` (ViT and Q-Former, "BLIP-2's
frozen image encoder") plus `freeze_language` is that recipe, which is also PaddleMIX's run_train.py default.

Prompts are Vicuna v0's `###Human: ... ###Assistant: ...`, an image written `<Img><ImageHere></Img>` as in
MiniGPT-4's and PaddleMIX's prompts; a reply ends with MiniGPT-4's end symbol `###` (then EOS, so generation
stops)."""

from __future__ import annotations

from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import INIT_STD, ROPE_THETA, TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer
from mixtune.native.minigpt4 import IMAGE_TOKEN, MiniGPT4Config, MiniGPT4ForConditionalGeneration, MiniGPT4Processor
from mixtune.native.minigpt4.processing_minigpt4 import blip2_image_processor

IMAGE_MARKUP = f"<Img>{IMAGE_TOKEN}</Img>"
END_SYMBOL = "###"
# A user turn is "###Human: <Img><ImageHere></Img> question " (the "###" is the previous reply's end symbol
# after the first turn), the reply "###Assistant: answer###" + EOS, as MiniGPT-4's training prompts write them;
# the generation prompt ends "###Assistant:" as MiniGPT-4's chat does, so the reply's first token (" answer")
# is the reply's. A system message goes first, as is.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] == 'system' %}###{% endif %}Human: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_MARKUP + " "
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}###Assistant: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}" + END_SYMBOL + "{{ eos_token }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}###Assistant:{% endif %}"
)
TINY_IMAGE, TINY_QUERIES = 56, 8


def tiny_tokenizer():
    return train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN], bos_token="<s>", eos_token="</s>",
                           unk_token="<unk>", pad_token="<pad>")


def tiny_config(tok) -> MiniGPT4Config:
    from transformers import Blip2QFormerConfig, Blip2VisionConfig, LlamaConfig

    vision = Blip2VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               image_size=TINY_IMAGE, patch_size=14, initializer_range=INIT_STD)
    qformer = Blip2QFormerConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                 initializer_range=INIT_STD)
    text = LlamaConfig(**TEXT_SIZES, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                       rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    return MiniGPT4Config(vision_config=vision, qformer_config=qformer, text_config=text,
                          num_query_tokens=TINY_QUERIES, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          initializer_range=INIT_STD, architectures=["MiniGPT4ForConditionalGeneration"])


def build_tiny(output_dir: str) -> str:
    seeded()
    tok = tiny_tokenizer()
    processor = MiniGPT4Processor(blip2_image_processor(TINY_IMAGE), tok, num_query_tokens=TINY_QUERIES,
                                  chat_template=CHAT_TEMPLATE)
    return save_checkpoint(MiniGPT4ForConditionalGeneration(tiny_config(tok)), processor, output_dir, tok)


FAMILY = Family(
    name="minigpt4",
    model_types=("minigpt4",),
    # BLIP-2's image encoder as MiniGPT-4 freezes it: the ViT and the Q-Former with its queries
    vision=("vision_model.*", "query_tokens", "qformer.*"),
    projector=("language_projection.*",),
    language=("language_model.*",),
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    pack_positions=text_positions,
    default_chat_template=CHAT_TEMPLATE,  # converted folders carry it too; Vicuna's tokenizer has none
)
