"""InternLM2's tokenizer: the published `tokenizer.model` (a SentencePiece BPE with byte fallback) served through a
`tokenizers` object built from that file (transformers' SentencePiece conversion, which follows the model's own
normaliser settings), so it encodes as SentencePiece does and gives the character offsets mixtune's labels need.

Published defaults: `<s>` is prepended (add_bos_token), nothing appended, `</s>` pads. Reading tokenizer.model
needs protobuf (or sentencepiece); `train_tiny_spm` (tiny test checkpoints) needs sentencepiece.
"""

from __future__ import annotations

import os
import shutil

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

VOCAB_FILE = "tokenizer.model"


def read_spm_proto(path: str):
    model_pb2 = import_protobuf()
    proto = model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def build_backend(vocab_file: str):
    """The `tokenizers` object for a SentencePiece tokenizer.model: its pieces at their own ids.

    legacy=True: like the published (slow) tokenizer, which hands each stretch of text between special tokens
    to SentencePiece separately, every such stretch gets the model's dummy prefix (when it has one)."""
    proto = read_spm_proto(vocab_file)
    if proto.trainer_spec.model_type != 2:  # 2: BPE
        raise ValueError(f"{vocab_file}: InternLM2's tokenizer.model is a BPE model, this one is not")
    vocab = {piece.piece: i for i, piece in enumerate(proto.pieces)}
    return SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)


class InternLM2Tokenizer(PreTrainedTokenizerFast):
    vocab_files_names = {"vocab_file": VOCAB_FILE, "tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, **kwargs):
        if kwargs.get("tokenizer_object") is None and not (kwargs.get("tokenizer_file")
                                                           and os.path.isfile(kwargs["tokenizer_file"])):
            if not vocab_file or not os.path.isfile(vocab_file):
                raise ValueError(f"InternLM2Tokenizer needs its {VOCAB_FILE} file (got {vocab_file!r})")
            kwargs["tokenizer_object"] = build_backend(vocab_file)
        for key, value in (("unk_token", "<unk>"), ("bos_token", "<s>"), ("eos_token", "</s>"),
                           ("pad_token", "</s>"), ("add_bos_token", True), ("add_eos_token", False)):
            kwargs.setdefault(key, value)
        for key in ("vocab", "merges", "decode_with_prefix_space", "sp_model_kwargs"):  # published slow-only keys
            kwargs.pop(key, None)
        super().__init__(vocab_file=vocab_file, **kwargs)
        self.vocab_file = vocab_file

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        # tokenizer.json for mixtune, plus the published tokenizer.model, so the folder keeps its original layout
        names = super()._save_pretrained(save_directory, file_names, legacy_format, filename_prefix)
        return names + self.save_vocabulary(str(save_directory), filename_prefix)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        target = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        if self.vocab_file and os.path.isfile(self.vocab_file) and \
                os.path.abspath(self.vocab_file) != os.path.abspath(target):
            shutil.copyfile(self.vocab_file, target)
        return (target,)


def train_tiny_spm(folder: str, text: str, vocab_size: int = 600, user_defined: tuple[str, ...] = ()) -> str:
    """Train a small SentencePiece BPE (byte fallback, `<unk>` `<s>` `</s>` at 0 1 2, as InternLM2's) on `text`
    and write `folder/tokenizer.model`: the tiny checkpoints' stand-in for the published 92k-piece model."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]), model_writer=out,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=list(user_defined),
        split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False, hard_vocab_limit=False,
        normalization_rule_name="identity",  # newlines and spaces kept as written, as in InternLM2's
        minloglevel=2)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, VOCAB_FILE)
    with open(path, "wb") as f:
        f.write(out.getvalue())
    return path
