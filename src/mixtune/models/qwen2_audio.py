"""Qwen2-Audio: a Whisper-style audio encoder (the `audio_tower`), a linear projector and a Qwen2 language
model. Audio only (no images); each clip is written as `<|audio_bos|><|AUDIO|><|audio_eos|>`, which the
processor expands to one `<|AUDIO|>` per encoder frame. The feature extractor pads every clip to 30 s."""

from __future__ import annotations

from mixtune.data.pack import text_positions
from mixtune.models.family import Family
from mixtune.models.tiny import TEXT_SIZES, chatml_template, save_checkpoint, seeded
from mixtune.models.tokenizer import train_tokenizer

AUDIO_MARKUP = "Audio: <|audio_bos|><|AUDIO|><|audio_eos|>\n"


def build_tiny(output_dir: str) -> str:
    from transformers import (Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor,
                              WhisperFeatureExtractor)

    seeded()
    tok = train_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>",
                           "<|audio_eos|>"], eos_token="<|im_end|>", pad_token="<|endoftext|>",
                          model_specific_special_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                                                         "audio_eos_token": "<|audio_eos|>"})
    # the template writes images too, as plain text: the family refuses image samples before rendering
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tok,
                                    chat_template=chatml_template("", audio_markup=AUDIO_MARKUP))
    audio = dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, num_mel_bins=128,
                 max_source_positions=1500)
    text = dict(model_type="qwen2", **TEXT_SIZES, vocab_size=len(tok), bos_token_id=None,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text,
                              audio_token_index=tok.convert_tokens_to_ids("<|AUDIO|>"), tie_word_embeddings=True)
    return save_checkpoint(Qwen2AudioForConditionalGeneration(config), processor, output_dir, tok)


FAMILY = Family(
    name="qwen2_audio",
    model_types=("qwen2_audio",),
    vision=("model.audio_tower.*",),  # the encoder: what `freeze_vision` freezes
    projector=("model.multi_modal_projector.*",),
    image_placeholder="",
    build_tiny=build_tiny,
    pack_positions=text_positions,
    auto_class="AutoModelForMultimodalLM",
    audio_placeholder=AUDIO_MARKUP,
    reads_images=False,
)
