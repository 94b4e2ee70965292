"""ChatGLM-6B's tokenizer (VisualGLM-6B ships it): a SentencePiece model (`ice_text.model`) whose pieces include
GLM's special tokens ([MASK], [gMASK], [sMASK], <unused_0>, <sop>, <eop>, <ENC>, <dBLOCK>) and its whitespace
pieces: before encoding, a newline is written `<n>`, a tab `<|tab|>` and a run of 2-80 spaces `<|blank_N|>`
(decoding undoes it). Ids are the model's piece ids plus `num_image_tokens` (0 for the 130528-token vocabulary
that ChatGLM-6B and VisualGLM-6B publish). A prompt ends with [gMASK] <sop> (`build_inputs_with_special_tokens`);
a reply ends with <eop>; padding is on the left, as published."""

from __future__ import annotations

import os
import re
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILE = "ice_text.model"
GLM_SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
BLANK = re.compile(r"<\|blank_(\d+)\|>")


def preprocess(text: str) -> str:
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    return re.sub(" {2,%d}" % MAX_BLANK, lambda m: f"<|blank_{len(m.group())}|>", text)


def postprocess(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    return BLANK.sub(lambda m: " " * int(m.group(1)), text)


class ChatGLMTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, do_lower_case: bool = False, remove_space: bool = False,
                 bos_token="<sop>", eos_token="<eop>", end_token="</s>", mask_token="[MASK]", gmask_token="[gMASK]",
                 padding_side="left", pad_token="<pad>", unk_token="<unk>", num_image_tokens: int = 0, **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise ValueError(f"ChatGLMTokenizer needs its {VOCAB_FILE} file (got {vocab_file!r})")
        self.vocab_file = vocab_file
        self.sp = spm.SentencePieceProcessor(model_file=vocab_file)
        self.do_lower_case, self.remove_space = do_lower_case, remove_space
        self.num_image_tokens = num_image_tokens
        self.end_token, self.gmask_token = end_token, gmask_token
        kwargs.pop("additional_special_tokens", None)
        super().__init__(do_lower_case=do_lower_case, remove_space=remove_space, bos_token=bos_token,
                         eos_token=eos_token, end_token=end_token, mask_token=mask_token, gmask_token=gmask_token,
                         padding_side=padding_side, pad_token=pad_token, unk_token=unk_token,
                         num_image_tokens=num_image_tokens, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + self.num_image_tokens

    @property
    def gmask_token_id(self) -> int:
        return self._convert_token_to_id(self.gmask_token)

    @property
    def mask_token_id(self) -> int:
        return self._convert_token_to_id("[MASK]")

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp.id_to_piece(i): i + self.num_image_tokens for i in range(self.sp.get_piece_size())}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        return self.sp.encode(preprocess(text), out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp.id_to_piece(index - self.num_image_tokens)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return postprocess(self.sp.decode_pieces(tokens))

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def train_tiny_sentencepiece(folder: str, text: str, vocab_size: int = 600) -> str:
    """A small `ice_text.model` trained locally: <unk> <s> </s> <pad> first, then GLM's special and whitespace
    pieces as user-defined symbols (always whole), byte fallback so no text becomes <unk>."""
    path = os.path.join(folder, "ice_text")
    symbols = list(GLM_SPECIALS) + ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, MAX_BLANK + 1)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(preprocess(line) for line in text.splitlines() if line.strip()),
        model_prefix=path, vocab_size=vocab_size, model_type="bpe", character_coverage=1.0, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", user_defined_symbols=symbols, num_threads=1, minloglevel=2, hard_vocab_limit=False)
    return path + ".model"
