"""`sharegpt` / `messages`: OpenAI-style messages or ShareGPT turns, with images inline or in a list.

OpenAI shape:   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                                         {"type": "text", "text": "What is this?"}]},
                              {"role": "assistant", "content": "A cat."}]}
ShareGPT shape: {"conversations": [{"from": "human", "value": "<image>What is this?"},
                                   {"from": "gpt", "value": "A cat."}], "images": ["a.jpg"]}
Content may be a string with `<image>` placeholders (images then come from `images`/`image`) or a list of
parts; an image part may carry its own reference (`image_url`, `image`, `url`, `path`).
"""

from __future__ import annotations

from typing import Any

from mixtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, Turn
from mixtune.data.formats import read_json_samples, register
from mixtune.data.images import resolve_image_ref
from mixtune.errors import DataError

# ShareGPT / LLaVA speaker names -> our roles. Anything else is kept as is, and validation rejects it.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_KEYS = ("messages", "conversations")


@register("sharegpt", "messages")
def read_sharegpt(entry, bad) -> list[Conversation]:
    return read_json_samples(entry, bad, conversation_from_record)


def conversation_from_record(record: Any, base_dir: str, where: dict, turn_keys=TURN_KEYS) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    key = next((k for k in turn_keys if k in record), None)
    if key is None:
        raise DataError(f"missing field: expected one of {list(turn_keys)}", field=turn_keys[0], **where)
    turns, inline = parse_turns(record[key], key, where)
    listed = image_list(record, where)
    if inline and listed:
        raise DataError("images are given both inside the messages and in an 'images' list; use one",
                        field="images", **where)
    refs = inline or listed
    try:
        images = [resolve_image_ref(strip_file_scheme(r), base_dir) for r in refs]
    except ValueError as e:
        raise DataError(str(e), field="images", **where) from None
    return Conversation(turns=turns, images=images, **where)


def parse_turns(messages: Any, key: str, where: dict) -> tuple[list[Turn], list]:
    """Turns, and the image references found inside content parts (in order)."""
    if not isinstance(messages, list):
        raise DataError(f"'{key}' must be a list of turns", field=key, **where)
    turns, inline = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{key}[{i}] must be an object", field=key, **where)
        if "role" in m or "content" in m:
            role, content, names = m.get("role"), m.get("content"), ("role", "content")
        else:
            role, content, names = m.get("from"), m.get("value"), ("from", "value")
        if role is None or content is None:
            raise DataError(f"missing field: {key}[{i}] needs '{names[0]}' and '{names[1]}'", field=key, **where)
        turns.append(Turn(ROLE_NAMES.get(role, role), content_text(content, inline, f"{key}[{i}]", where)))
    return turns, inline


def content_text(content: Any, inline: list, name: str, where: dict) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(f"{name} content must be a string or a list of parts", field=name, **where)
    text = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(part.get("text", ""))
        elif kind in ("image", "image_url"):
            ref = part.get("image_url", part.get("image", part.get("url", part.get("path"))))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if ref is not None:
                inline.append(ref)
            text.append(IMAGE_PLACEHOLDER)
        else:
            raise DataError(f"{name} has a content part of unknown type {kind!r}; expected text, image or "
                            "image_url", field=name, **where)
    return "".join(text)


def image_list(record: dict, where: dict) -> list:
    key = "images" if "images" in record else "image" if "image" in record else None
    if key is None or record[key] is None:
        return []
    refs = record[key]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list):
        raise DataError("must be a path or a list of paths", field=key, **where)
    return refs


def strip_file_scheme(ref: Any) -> Any:
    if isinstance(ref, str) and ref.startswith("file://"):
        return ref[len("file://"):]
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        raise ValueError(f"remote image {ref!r}: mixtune reads local files and data: URIs; download it first")
    return ref
