"""GLM-4V (GLM-4.1V / GLM-4.5V; the native successor of CogVLM and VisualGLM): a Qwen-VL-like ViT whose
`downsample` conv and `merger` MLP are the projector (inside `model.visual`), and a GLM-4 language model
with M-RoPE, so it needs `mm_token_type_ids` like Qwen-VL.

GLM's chat template ends an assistant turn with nothing: the next `<|user|>` tag starts the next turn.
So that the model learns to stop, the family appends the tokenizer's EOS (`<|endoftext|>`, one of GLM's
generation stop tokens) to every reply before rendering, as LLaMA-Factory's GLM template does."""

from __future__ import annotations

from mixtune.data.encode import encode_with_processor
from mixtune.models.family import Family
from mixtune.models.qwen2_vl import mrope_positions
from mixtune.models.tiny import ROPE_THETA, TEXT_SIZES, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

IMAGE_MARKUP = "<|begin_of_image|><|image|><|end_of_image|>"
# The checkpoints' turn format: "[gMASK]<sop><|user|>\n...<|assistant|>\n..." with no end-of-turn marker.
CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + IMAGE_MARKUP +
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
           "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]


def with_eos_after_replies(processor, render):
    eos = processor.tokenizer.eos_token

    def render_with_eos(messages, add_generation_prompt):
        messages = [m if m["role"] != "assistant" else {**m, "content": m["content"] + [{"type": "text", "text": eos}]}
                    for m in messages]
        return render(messages, add_generation_prompt)
    return render_with_eos


def encode(conv, images, processor, render):
    return encode_with_processor(conv, images, processor, with_eos_after_replies(processor, render))


def build_tiny(output_dir: str) -> str:
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessor, Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor

    seeded()
    tok = train_tokenizer(SPECIAL, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          model_specific_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    # 112x112 images -> 8x8 patches of 14 -> 16 tokens after the 2x2 merge
    image_processor = Glm4vImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})
    processor = Glm4vProcessor(image_processor=image_processor, tokenizer=tok, video_processor=Glm4vVideoProcessor(),
                               chat_template=CHAT_TEMPLATE)
    text = dict(TEXT_SIZES, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5,
                                 "rope_theta": ROPE_THETA})
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, image_size=112,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    config = Glm4vConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image|>"],
                         video_token_id=ids["<|video|>"], image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"], video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"], tie_word_embeddings=True)
    model = Glm4vForConditionalGeneration(config)
    model.generation_config.eos_token_id = [tok.eos_token_id, ids["<|user|>"]]
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_checkpoint(model, processor, output_dir)


FAMILY = Family(
    name="glm4v",
    model_types=("glm4v",),
    vision=("model.visual.*",),
    projector=("model.visual.downsample.*", "model.visual.merger.*"),
    lora_targets=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_up_proj|gate_proj|up_proj|down_proj)",
    image_placeholder=IMAGE_MARKUP,
    build_tiny=build_tiny,
    encode=encode,
    pack_positions=mrope_positions,
)
