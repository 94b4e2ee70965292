"""InternLM-XComposer2's tokenizer: InternLM2's (the published `tokenizer.model`), plus `<ImageHere>`.

The published tokenizer is InternLM2's under another class name (`InternLMXComposer2Tokenizer`, which its
tokenizer_config.json names). Its prompts mark an image with the text `<ImageHere>`, which its remote code
splits on. Here `<ImageHere>` is also a special token, added after the published vocabulary, so the processor
can write one such id per image vector and the model finds the image positions in `input_ids`.
"""

from __future__ import annotations

from tokenizers import AddedToken

from mixtune.native.internlm2.tokenization_internlm2 import InternLM2Tokenizer

IMAGE_PLACEHOLDER = "<ImageHere>"
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"  # the published chat turn markers


class InternLMXComposer2Tokenizer(InternLM2Tokenizer):
    def __init__(self, vocab_file: str | None = None, **kwargs):
        super().__init__(vocab_file=vocab_file, **kwargs)
        if IMAGE_PLACEHOLDER not in self.get_vocab():
            self.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)

    @property
    def image_placeholder_id(self) -> int:
        return self.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
