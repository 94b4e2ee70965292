"""Shared pieces for building tiny random-weight checkpoints (tests and the demo; no hub here).

Each family's `build_tiny` uses the real config, model and processor classes at toy sizes, so the saved
folder loads through exactly the code path a user's real checkpoint takes.
"""

from __future__ import annotations

import os

import torch

# Random-init spread for tiny models. At the usual 0.02, a 64-wide model trained from scratch sits on a
# long plateau (measured: ~500 steps) before its language model starts reading the image tokens; 0.1
# shortens it to ~100 steps, which is what lets the demo learn in minutes on a CPU.
INIT_STD = 0.1

# RoPE base for tiny models. With head_dim 16, the lowest rotary frequencies at the usual base of 10000
# barely turn over a few dozen positions, and M-RoPE gives exactly those to an image's height and width:
# the tiny model then cannot tell left from right (measured: chance level on the demo's side question).
# A base of 20 makes every section's positions distinguishable.
ROPE_THETA = 20.0

# Small sizes shared by every tiny language model: fast on 2 CPU cores, still a real architecture.
TEXT_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, initializer_range=INIT_STD)


# A ChatML template for content-part messages, in the style of Qwen's: `image_markup` is what one
# image becomes in the text (`video_markup`: one video, for families that read video).
def chatml_template(image_markup: str, default_system: str | None = "You are a helpful assistant.",
                    video_markup: str | None = None, audio_markup: str | None = None) -> str:
    system = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\n" + default_system + "<|im_end|>\n"
              "{% endif %}") if default_system else ""
    return (
        system +
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}" + image_markup +
        ("{% elif part['type'] == 'video' %}" + video_markup if video_markup else "") +
        ("{% elif part['type'] == 'audio' %}" + audio_markup if audio_markup else "") +
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def save_checkpoint(model, processor, output_dir: str, tok=None) -> str:
    """Save like a real checkpoint; with `tok`, generation stops at its EOS and pads with its pad id."""
    if tok is not None:
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def seeded(seed: int = 0):
    torch.manual_seed(seed)
