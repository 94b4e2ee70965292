"""CogVLM and CogAgent (`model_type`s "cogvlm", "cogagent"): mixtune's native port (`mixtune.native.cogvlm`), so
the published folders load without `trust_remote_code`. EVA2-CLIP (`model.vision`, its `linear_proj` GLU adapter
and `boi` / `eoi` vectors are the projector) read by a Vicuna language model whose every layer has a visual expert
(`model.layers.N`, routed by `token_type_ids`); CogAgent adds the high-resolution EVA-CLIP-L tower
(`model.cross_vision`, part of the vision side) and a cross-attention in every layer (part of the language side).

Prompts follow the published templates with the image first, right after BOS: CogVLM's "chat" format
"Question: {q} Answer: {a}" (turns joined by a newline), CogAgent's " [INST] {q} [/INST] {a}"; each reply ends with
the EOS token, which is what the model learns to stop on. MixToken packs CogVLM exactly (each sample keeps its
token types and CogVLM's positions, which restart at 0); CogAgent is not packed: its cross-attention reads one
high-resolution image per row, so the samples of a packed row would read each other's."""

from __future__ import annotations

from mixtune.data.encode import Encoded
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, save_checkpoint, seeded
from mixtune.native.cogvlm import CogAgentConfig, CogAgentForCausalLM, CogVLMConfig, CogVLMForCausalLM, CogVLMProcessor
from mixtune.native.cogvlm.modeling_cogvlm import build_position_ids
from mixtune.native.cogvlm.processing_cogvlm import IMAGE_MARKUP, clip_image_processor

_TEXT = ("{% macro text(m) %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
         "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
         "{% endif %}{% endmacro %}"
         "{% macro images(m) %}{% if m['content'] is not string %}{% for part in m['content'] %}"
         "{% if part['type'] == 'image' %}" + IMAGE_MARKUP + "{% endif %}{% endfor %}{% endif %}{% endmacro %}")
# CogVLM's "chat" template_version (the published `_history_to_prompt` for "chat"), the image before the question
COGVLM_TEMPLATE = (
    _TEXT + "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% if not loop.first %}\n{% endif %}{{ images(message) }}Question: {{ text(message) }} Answer:"
    "{% elif message['role'] == 'assistant' %} {{ text(message) }}</s>{% endif %}{% endfor %}"
)
# CogAgent's "chat" template_version: " [INST] {q} [/INST] {a}"
COGAGENT_TEMPLATE = (
    _TEXT + "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ images(message) }} [INST] {{ text(message) }} [/INST]"
    "{% elif message['role'] == 'assistant' %} {{ text(message) }}</s>{% endif %}{% endfor %}"
)

TINY_IMAGE, TINY_PATCH = 56, 14  # 4x4 patches: 18 image positions with boi and eoi
TINY_VISION = dict(hidden_size=64, image_size=TINY_IMAGE, patch_size=TINY_PATCH, num_heads=4, num_hidden_layers=2,
                   intermediate_size=128, num_positions=(TINY_IMAGE // TINY_PATCH) ** 2 + 1)
TINY_CROSS_IMAGE = 112  # CogAgent's high-resolution image: twice the low-resolution one, 8x8 patches
TINY_CROSS = dict(layers=3, head_width=16, mlp_ratio=2.6667, patch_size=14)


def tiny_llama_tokenizer():
    """transformers' LlamaTokenizerFast around a small SentencePiece-style BPE (Metaspace, byte fallback) trained
    here on mixtune's small corpus: Vicuna's layout (<unk> 0, <s> 1, </s> 2), not its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    from mixtune.models.tokenizer import _CORPUS

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False)
    lines = _CORPUS.strip().splitlines() + ["[INST] [/INST] Question: Answer: Short answer:"]
    tok.train_from_iterator(lines * 20 + [line.lower() for line in lines], trainer=trainer)
    return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                              pad_token="<unk>", add_bos_token=False, add_eos_token=False)


def _build(output_dir: str, agent: bool) -> str:
    seeded()
    tok = tiny_llama_tokenizer()
    text = {k: v for k, v in TEXT_SIZES.items() if k != "num_key_value_heads"}  # CogVLM's LM has plain MHA
    common = dict(vocab_size=len(tok), vision_config=TINY_VISION, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **text)
    if agent:
        config = CogAgentConfig(**common, cross_image_size=TINY_CROSS_IMAGE, cross_hidden_size=32,
                                cross_compute_hidden_size=64, cross_vision_config=TINY_CROSS,
                                architectures=["CogAgentForCausalLM"])
        model = CogAgentForCausalLM(config)
    else:
        config = CogVLMConfig(**common, architectures=["CogVLMForCausalLM"])
        model = CogVLMForCausalLM(config)
    processor = CogVLMProcessor(clip_image_processor(TINY_IMAGE), tok, vision_tokens=config.vision_tokens,
                                cross_image_size=TINY_CROSS_IMAGE if agent else None,
                                chat_template=COGAGENT_TEMPLATE if agent else COGVLM_TEMPLATE)
    return save_checkpoint(model, processor, output_dir, tok)


def build_tiny(output_dir: str) -> str:
    return _build(output_dir, agent=False)


def build_tiny_agent(output_dir: str) -> str:
    return _build(output_dir, agent=True)


def cogvlm_positions(model, sample: Encoded):
    """`Family.pack_positions`: CogVLM's own positions for the sample alone (image patches share one)."""
    types = sample.token_fields.get("token_type_ids")
    if types is None:
        raise ValueError("a CogVLM sample carries token_type_ids (the processor builds them)")
    return build_position_ids(types[None])[0]


VISION = ("model.vision.*", "model.cross_vision.*")
PROJECTOR = ("model.vision.linear_proj.*", "model.vision.boi", "model.vision.eoi", "model.vision.pos_embed")
LANGUAGE = ("model.embed_tokens.*", "model.layers.*", "model.norm.*", "lm_head.*")
# both experts' attention and MLP projections (the text and the image positions are both adapted)
LORA_TARGETS = (r".*model\.layers\.\d+\.(self_attn\.(language|vision)_expert_(query_key_value|dense)"
                r"|mlp\.(language|vision)_mlp\.(gate_proj|up_proj|down_proj))")

FAMILY = Family(
    name="cogvlm",
    model_types=("cogvlm",),
    vision=VISION,
    projector=PROJECTOR,
    language=LANGUAGE,
    lora_targets=LORA_TARGETS,
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    pack_positions=cogvlm_positions,
    auto_class="AutoModelForCausalLM",
    default_chat_template=COGVLM_TEMPLATE,  # published folders ship none (their remote code builds prompts)
    refused_attn={"flash_attention_2": "CogVLM's port runs eager or SDPA attention with its own masks",
                  "flex_attention": "CogVLM's port runs eager or SDPA attention with its own masks"},
)
