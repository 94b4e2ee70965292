"""A small byte-level BPE tokenizer trained locally, for the tiny test and demo checkpoints.

No hub is reachable here, so tiny checkpoints carry a tokenizer trained on the fly with the
`tokenizers` library and wrapped in `PreTrainedTokenizerFast`, which saves and reloads like a real one.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words the demo data and tests use, so the tiny vocabulary covers them in few tokens.
_CORPUS = """
What colour is the shape? What shape is in the image? How many shapes are there? Where is the shape?
Describe the image. Answer with one word. The picture shows a red circle on the left.
red green blue yellow purple orange white black circle square triangle left right top bottom middle
one two three four five zero yes no a an the of in on at is are there image picture photo caption
You are a helpful assistant. system user assistant Question Answer
0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' " ( ) [ ] { } - _ / \\ < > = + * # @ & % $
"""


def train_tokenizer(special_tokens: list[str], vocab_size: int = 1000, extra_text: str = "",
                    **wrapper_kwargs) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE and wrap it; `wrapper_kwargs` names bos/eos/pad and model-specific tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = (_CORPUS + extra_text).strip().splitlines()
    tok.train_from_iterator(text * 20 + [line.lower() for line in text], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **wrapper_kwargs)
