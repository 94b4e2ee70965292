"""Qwen-VL's tokenizer: the published `qwen.tiktoken` byte-level BPE ranks, Qwen's split pattern and its 217
special tokens (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, `<|extra_0..204|>`, `<ref>`, `</ref>`, `<box>`,
`</box>`, `<quad>`, `</quad>`, `<img>`, `</img>`, `<imgpad>`), numbered after the ranks as published.

The ranks are read with tiktoken and served through a `tokenizers` BPE built from them (transformers'
TikTokenConverter), which encodes as tiktoken does and gives character offsets, which mixtune's labels need.
"""

from __future__ import annotations

import os
import shutil

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

VOCAB_FILE = "qwen.tiktoken"
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
IMG_START, IMG_END, IMG_PAD = "<img>", "</img>", "<imgpad>"
SPECIAL_TOKENS = ((ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
                  + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", IMG_START, IMG_END, IMG_PAD))


def build_backend(vocab_file: str):
    """The `tokenizers` object for a qwen.tiktoken file, special tokens numbered from len(ranks) in order."""
    backend = TikTokenConverter(vocab_file=vocab_file, pattern=PAT_STR).converted()
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in SPECIAL_TOKENS])
    return backend


class QWenTokenizer(PreTrainedTokenizerFast):
    vocab_files_names = {"vocab_file": VOCAB_FILE, "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, **kwargs):
        if kwargs.get("tokenizer_object") is None and not (kwargs.get("tokenizer_file")
                                                           and os.path.isfile(kwargs["tokenizer_file"])):
            if not vocab_file or not os.path.isfile(vocab_file):
                raise ValueError(f"QWenTokenizer needs its {VOCAB_FILE} file (got {vocab_file!r})")
            kwargs["tokenizer_object"] = build_backend(vocab_file)
        kwargs.setdefault("pad_token", ENDOFTEXT)  # the published tokenizer pads with its end-of-document id
        kwargs.setdefault("eos_token", ENDOFTEXT)
        for key in ("vocab", "merges"):  # the backend above is the vocabulary
            kwargs.pop(key, None)
        super().__init__(vocab_file=vocab_file, **kwargs)
        self.vocab_file = vocab_file

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        # tokenizer.json for mixtune, plus the published qwen.tiktoken, so the folder keeps its original layout
        names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return names + self.save_vocabulary(str(save_directory), filename_prefix)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if self.vocab_file and os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def write_tiktoken_file(ranks: dict[bytes, int], path: str) -> str:
    """Write BPE ranks in tiktoken's file format (base64 token, space, rank; one a line)."""
    import base64

    with open(path, "w") as f:
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    return path
