"""`sharegpt` / `messages`: OpenAI-style messages or ShareGPT turns, with images inline or in a list.

OpenAI shape:   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.jpg"}},
                                                         {"type": "text", "text": "What is this?"}]},
                              {"role": "assistant", "content": "A cat."}]}
ShareGPT shape: {"conversations": [{"from": "human", "value": "<image>What is this?"},
                                   {"from": "gpt", "value": "A cat."}], "images": ["a.jpg"]}
Content may be a string with `<image>` placeholders (images then come from `images`/`image`) or a list of
parts; an image part may carry its own reference (`image_url`, `image`, `url`, `path`). A turn may carry
ms-swift's `"loss": false` (or OpenAI's `"weight": 0`). The legacy shapes of formats/legacy.py, a top-level
`system` and ms-swift's grounding `objects` are read too (formats/records.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtune.data.conversation import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation, Turn
from mixtune.data.formats import read_json_samples, register
from mixtune.data.formats.legacy import legacy_turns
from mixtune.data.formats.records import (CONVERSATION_KEYS, audio_list, build_conversation, resolve_audio_refs,
                                          resolve_refs, resolve_video_refs, turn_loss, video_list)
from mixtune.errors import DataError

# ShareGPT / LLaVA speaker names -> our roles. Anything else is kept as is, and validation rejects it.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TURN_KEYS = ("messages", "conversations")
# an audio part: OpenAI's {"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}, or a
# reference {"type": "audio_url", "audio_url": {"url": ...}} / {"type": "audio", "audio": "a.wav"}
AUDIO_PARTS = ("input_audio", "audio", "audio_url")
# a video part's reference: {"type": "video_url", "video_url": {"url": ...}} (OpenAI style) or Qwen's
# {"type": "video", "video": "a.mp4" | [frame paths]}
VIDEO_PARTS = ("video", "video_url")


@register("sharegpt", "messages")
def read_sharegpt(entry, bad) -> list[Conversation]:
    return read_json_samples(entry, bad, conversation_from_record, CONVERSATION_KEYS)


def conversation_from_record(record: Any, base_dir: str, where: dict, turn_keys=TURN_KEYS) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    key = next((k for k in turn_keys if k in record), None)
    if key is not None:
        turns, inline = parse_turns(record[key], key, where)
    elif turn_keys == TURN_KEYS and (legacy := legacy_turns(record, where)) is not None:
        turns, inline = legacy, []
    else:
        legacy = (" (or the legacy shapes: query/response, conversation pairs, instruction/output)"
                  if turn_keys == TURN_KEYS else "")
        raise DataError(f"missing field: expected one of {list(turn_keys)}{legacy}", field=turn_keys[0], **where)
    inline_media = [r for r in inline if isinstance(r, InlineMedia)]
    inline, inline_videos = split_inline(inline)
    listed = image_list(record, where)
    if inline and listed:
        raise DataError("images are given both inside the messages and in an 'images' list; use one",
                        field="images", **where)
    listed_videos = video_list(record, where)
    if inline_videos and listed_videos:
        raise DataError("videos are given both inside the messages and in a 'videos' list; use one",
                        field="videos", **where)
    videos = resolve_video_refs(inline_videos or listed_videos, base_dir, where)
    inline_audios = [r.ref for r in inline_media if r.kind == "audio"]
    listed_audios = audio_list(record, where)
    if inline_audios and listed_audios:
        raise DataError("audio is given both inside the messages and in an 'audios' list; use one",
                        field="audios", **where)
    audios = resolve_audio_refs(inline_audios or listed_audios, base_dir, where)
    return build_conversation(turns, resolve_refs(inline or listed, base_dir, "images", where), record, base_dir, where,
                              videos=videos, audios=audios)


def split_inline(refs: list) -> tuple[list, list]:
    """Inline references found in content parts -> (image refs, video refs); others come wrapped."""
    images = [r for r in refs if not isinstance(r, InlineMedia)]
    return images, [r.ref for r in refs if isinstance(r, InlineMedia) and r.kind == "video"]


@dataclass
class InlineMedia:
    kind: str  # "video" or "audio"
    ref: Any


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
        name = f"{key}[{i}]"
        turns.append(Turn(ROLE_NAMES.get(role, role), content_text(content, inline, name, where),
                          loss=turn_loss(m, name, where)))
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
        elif kind in VIDEO_PARTS:
            ref = part.get(kind, part.get("url", part.get("path")))
            if isinstance(ref, dict):
                ref = ref.get("url")
            if ref is None:
                raise DataError(f"{name} has a '{kind}' part without a video reference", field=name, **where)
            inline.append(InlineMedia("video", ref))
            text.append(VIDEO_PLACEHOLDER)
        elif kind in AUDIO_PARTS:
            inline.append(InlineMedia("audio", audio_part_ref(part, kind, name, where)))
            text.append(AUDIO_PLACEHOLDER)
        else:
            raise DataError(f"{name} has a content part of unknown type {kind!r}; expected text, image, "
                            "image_url, video, video_url, input_audio, audio or audio_url", field=name, **where)
    return "".join(text)


def audio_part_ref(part: dict, kind: str, name: str, where: dict) -> str:
    """An audio part's reference; OpenAI's inline base64 becomes a data: URI."""
    value = part.get(kind, part.get("url", part.get("path")))
    if kind == "input_audio":
        if not (isinstance(value, dict) and isinstance(value.get("data"), str)):
            raise DataError(f"{name}: an input_audio part needs {{'data': base64, 'format': ...}}", field=name, **where)
        return f"data:audio/{value.get('format') or 'wav'};base64,{value['data']}"
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str):
        raise DataError(f"{name} has a '{kind}' part without an audio reference", field=name, **where)
    return value


def image_list(record: dict, where: dict) -> list:
    key = "images" if "images" in record else "image" if "image" in record else None
    if key is None or record[key] is None:
        return []
    refs = record[key]
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list):
        raise DataError("must be a path or a list of paths", field=key, **where)
    return refs

