"""InternLM-XComposer2's tokenizer: InternLM2's (the published `tokenizer.model`), plus `<ImageHere>`.

The published tokenizer is InternLM2's under another class name (`InternLMXComposer2Tokenizer`, which its
tokenizer_config.json names). Its prompts mark an image with the text `<ImageHere>`, which its remote code
splits on. Here `<ImageHere>` is also a special token, added after the published vocabulary, so the processor
can write one such id per image vector and the model finds the image positions in `input_ids`.

The chat marks `[UNUSED_TOKEN_146]` / `[UNUSED_TOKEN_145]` are pieces of tokenizer.model; like transformers does
when it reads a folder with tokenizer.model alone (the published layout), they are added tokens, so the text
between them is tokenised piece by piece ("\n" after a mark gets SentencePiece's dummy prefix), the same whether
the tokenizer was built here or read back.
"""

from __future__ import annotations

from tokenizers import AddedToken

from mixtune.native.internlm2.tokenization_internlm2 import InternLM2Tokenizer

IMAGE_PLACEHOLDER = "<ImageHere>"
IM_START, IM_END = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"  # the published chat turn markers


class InternLMXComposer2Tokenizer(InternLM2Tokenizer):
    def __init__(self, vocab_file: str | None = None, **kwargs):
        super().__init__(vocab_file=vocab_file, **kwargs)
        vocab, added = self.get_vocab(), set(self.added_tokens_encoder)
        marks = [t for t in (IM_START, IM_END) if t in vocab and t not in added]
        if marks:
            self.add_tokens([AddedToken(t, special=False, normalized=False) for t in marks])
        if IMAGE_PLACEHOLDER not in vocab:
            self.add_tokens([AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False)], special_tokens=True)

    @property
    def image_placeholder_id(self) -> int:
        return self.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
