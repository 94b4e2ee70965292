"""`chatml_dataset`: PaddleMIX's conversation pairs, or OpenAI-style messages.

PaddleMIX shape:  {"image": "a.jpg" | [...], "conversations": [["<image>question", "answer"], ...]}
Messages shape:   {"messages": [{"role": "user", "content": "<image>q"}, ...], "images": ["a.jpg"]}
Records in any other shape the `sharegpt` reader knows (ShareGPT turns, ms-swift's query/response and
conversation pairs, Alpaca) are read as that reader reads them.
"""

from __future__ import annotations

from typing import Any

from mixtune.data.conversation import Conversation, Turn
from mixtune.data.formats import read_json_samples, register
from mixtune.data.formats.records import CONVERSATION_KEYS, build_conversation, resolve_refs
from mixtune.data.formats.sharegpt import conversation_from_record, image_list
from mixtune.errors import DataError


@register("chatml_dataset", "chatml")
def read_chatml(entry, bad) -> list[Conversation]:
    return read_json_samples(entry, bad, chatml_conversation, CONVERSATION_KEYS)


def chatml_conversation(record: Any, base: str, where: dict) -> Conversation:
    if is_paddle_pairs(record):
        images = resolve_refs(image_list(record, where), base, "images", where)
        return build_conversation(paddle_turns(record["conversations"], where), images, record, base, where)
    return conversation_from_record(record, base, where)


def is_paddle_pairs(record: Any) -> bool:
    """PaddleMIX's `conversations` is a list of [question, answer] lists (ShareGPT's is a list of objects)."""
    pairs = record.get("conversations") if isinstance(record, dict) and "messages" not in record else None
    return pairs is not None and not (isinstance(pairs, list) and any(isinstance(p, dict) for p in pairs))


def paddle_turns(pairs: Any, where: dict) -> list[Turn]:
    if not isinstance(pairs, list):
        raise DataError("'conversations' must be a list of [question, answer] pairs", field="conversations",
                        **where)
    turns = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"conversations[{i}] must be a [question, answer] pair of strings",
                            field="conversations", **where)
        turns += [Turn("user", pair[0]), Turn("assistant", pair[1])]
    return turns

