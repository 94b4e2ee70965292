"""`chatml_dataset`: PaddleMIX's conversation pairs, or OpenAI-style messages.

PaddleMIX shape:  {"image": "a.jpg" | [...], "conversations": [["<image>question", "answer"], ...]}
Messages shape:   {"messages": [{"role": "user", "content": "<image>q"}, ...], "images": ["a.jpg"]}
"""

from __future__ import annotations

from typing import Any

from mixtune.data.conversation import Conversation, Turn
from mixtune.data.formats import read_json_samples, register
from mixtune.data.images import resolve_image_ref
from mixtune.errors import DataError


@register("chatml_dataset", "chatml")
def read_chatml(entry, bad) -> list[Conversation]:
    return read_json_samples(entry, bad, lambda record, base, where: Conversation(
        turns=parse_turns(record, where), images=parse_images(record, base, where), **where))


def parse_turns(record: Any, where: dict) -> list[Turn]:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise DataError("'messages' must be a list", field="messages", **where)
        turns = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"message {i} needs 'role' and 'content'", field="messages", **where)
            turns.append(Turn(role=m["role"], text=m["content"]))
        return turns
    if "conversations" in record:
        pairs = record["conversations"]
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
    raise DataError("missing field: expected 'conversations' (PaddleMIX pairs) or 'messages'",
                    field="conversations", **where)


def parse_images(record: dict, base_dir: str, where: dict) -> list[str]:
    key = "images" if "images" in record else "image" if "image" in record else None
    if key is None:
        return []
    refs = record[key]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list):
        raise DataError("must be a path or a list of paths", field=key, **where)
    try:
        return [resolve_image_ref(r, base_dir) for r in refs]
    except ValueError as e:
        raise DataError(str(e), field=key, **where) from None
