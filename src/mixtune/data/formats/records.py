"""Rules every record reader shares, so that nothing a record says is silently thrown away.

- Each reader declares the keys it reads; any other key (also inside turns) is counted and reported once per
  dataset entry, or refused under `strict_fields: true` (`note_unknown_keys`).
- Videos (`videos` / `video`: paths of video files or frame folders, or lists of frame paths) are read into
  `Conversation.videos`; a family without video support refuses them when the dataset is built.
- Audio (`audios` / `audio`: paths or data: URIs) is read into `Conversation.audios` likewise.
- The `hf` reader takes neither yet: a row with them is a bad sample (`refuse_unsupported_media`).
- A top-level `system` (ms-swift, LLaMA-Factory) becomes the system turn; ms-swift's per-turn `loss` (and
  OpenAI's per-message `weight`) and its grounding `objects` are carried into the Conversation.
"""

from __future__ import annotations

import json
from typing import Any

from mixtune.data.conversation import Conversation, Objects, Turn, media_not_supported
from mixtune.data.formats.legacy import LEGACY_KEYS, inline_image_tags
from mixtune.data.images import resolve_image_ref
from mixtune.errors import DataError

MEDIA_KEYS = {"videos": "video", "video": "video", "audios": "audio", "audio": "audio"}
# read by every conversation reader (`id` is an identifier, nothing to train on)
COMMON_KEYS = frozenset({"id", "system", "objects", *MEDIA_KEYS})
CONVERSATION_KEYS = COMMON_KEYS | {"messages", "conversations", "image", "images"} | LEGACY_KEYS
# keys of one turn: OpenAI / ms-swift messages, ShareGPT turns, ms-swift's {"human", "assistant"} pairs
TURN_KEYS = frozenset({"role", "content", "from", "value", "loss", "weight", "human", "assistant"})
TURN_LISTS = ("messages", "conversations", "conversation")
OBJECT_KEYS = ("ref", "bbox", "bbox_type", "image_id")
BBOX_TYPES = ("real", "norm1")


def unknown_keys(record: dict, known) -> list[str]:
    """Keys with a value that no rule of the reader reads; turn keys are named like `messages[].name`."""
    keys = sorted(k for k, v in record.items() if k not in known and v is not None)
    for list_key in TURN_LISTS:
        turns = record.get(list_key) if list_key in known else None
        if isinstance(turns, list):
            extra = {k for t in turns if isinstance(t, dict) for k, v in t.items()
                     if k not in TURN_KEYS and v is not None}
            keys += [f"{list_key}[].{k}" for k in sorted(extra)]
    return keys


def note_unknown_keys(record: Any, known, where: dict, bad) -> None:
    if isinstance(record, dict):
        keys = unknown_keys(record, known)
        if keys:
            bad.ignore_keys(keys, where)


def refuse_unsupported_media(record: Any, where: dict, kinds=()) -> None:
    if not isinstance(record, dict):
        return
    for key, kind in MEDIA_KEYS.items():
        if kind in kinds and record.get(key) not in (None, [], ""):
            raise DataError(f"the sample lists {kind} in '{key}': {media_not_supported(kind)}", field=key, **where)


def turn_loss(message: dict, name: str, where: dict) -> bool | None:
    """ms-swift's `loss` (true / false), or OpenAI's fine-tuning `weight` (1 / 0); None when absent."""
    if message.get("loss") is not None:
        key, value = "loss", message["loss"]
    elif message.get("weight") is not None:
        key, value = "weight", message["weight"]
        value = {0: False, 1: True}.get(value, value) if not isinstance(value, bool) else value
    else:
        return None
    if not isinstance(value, bool):
        raise DataError(f"{name}: '{key}' must be {'true or false' if key == 'loss' else '0 or 1'}, got "
                        f"{message[key]!r}", field="loss", **where)
    return value


def with_system(turns: list[Turn], record: dict, where: dict) -> list[Turn]:
    system = record.get("system")
    if system is None or system == "":
        return turns
    if not isinstance(system, str):
        raise DataError("'system' must be a string", field="system", **where)
    if turns and turns[0].role == "system":
        raise DataError("a system prompt is given both in 'system' and as the first turn; use one",
                        field="system", **where)
    return [Turn("system", system), *turns]


def parse_objects(record: dict, where: dict) -> Objects | None:
    """ms-swift's grounding field {"ref": [...], "bbox": [[x1, y1, x2, y2] | [x, y], ...], "bbox_type":
    "real" | "norm1", "image_id": [...]} (a JSON string of it is read too)."""
    raw = record.get("objects")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"'objects' is a string but not JSON: {e.msg}", field="objects", **where) from None
    if not isinstance(raw, dict):
        raise DataError("'objects' must be a mapping with 'ref' and 'bbox'", field="objects", **where)
    extra = sorted(set(raw) - set(OBJECT_KEYS))
    if extra:
        raise DataError(f"'objects' has unknown key(s) {extra}; expected {list(OBJECT_KEYS)}", field="objects",
                        **where)
    refs = raw.get("ref") or []
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DataError("objects.ref must be a list of strings", field="objects", **where)
    boxes = raw.get("bbox") or []
    if not isinstance(boxes, list) or not all(is_box(b) for b in boxes):
        raise DataError("objects.bbox must be a list of boxes [x1, y1, x2, y2] or points [x, y]", field="objects",
                        **where)
    bbox_type = raw.get("bbox_type") or "real"
    if bbox_type not in BBOX_TYPES:
        raise DataError(f"objects.bbox_type must be one of {BBOX_TYPES}, got {bbox_type!r}", field="objects",
                        **where)
    image_ids = raw.get("image_id")
    image_ids = [] if image_ids is None else [image_ids] * len(boxes) if isinstance(image_ids, int) else image_ids
    if not isinstance(image_ids, list) or not all(isinstance(i, int) and i >= 0 for i in image_ids) \
            or len(image_ids) > len(boxes):
        raise DataError("objects.image_id must be a list of image indices, one per box at most", field="objects",
                        **where)
    return Objects(refs=refs, boxes=[list(b) for b in boxes], bbox_type=bbox_type, image_ids=image_ids)


def is_box(box: Any) -> bool:
    return (isinstance(box, (list, tuple)) and len(box) in (2, 4)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box))


def resolve_refs(refs: list, base: str, field: str, where: dict) -> list[str]:
    try:
        return [resolve_image_ref(r, base) for r in refs]
    except ValueError as e:
        raise DataError(str(e), field=field, **where) from None


def video_list(record: dict, where: dict) -> list:
    """The record's `videos` (or `video`): each a path (video file or frame folder) or a list of frame paths."""
    key = "videos" if "videos" in record else "video" if "video" in record else None
    if key is None or record[key] in (None, ""):
        return []
    refs = record[key]
    if isinstance(refs, str) or (key == "video" and isinstance(refs, list) and refs
                                 and all(isinstance(r, str) for r in refs) and all(is_frame(r) for r in refs)):
        refs = [refs]  # `video` naming one video (a path, or its frame images)
    if not isinstance(refs, list):
        raise DataError("must be a path or a list of paths (or of frame-path lists)", field=key, **where)
    return refs


def audio_list(record: dict, where: dict) -> list:
    """The record's `audios` (or `audio`): paths or data: URIs."""
    key = "audios" if "audios" in record else "audio" if "audio" in record else None
    if key is None or record[key] in (None, ""):
        return []
    refs = [record[key]] if isinstance(record[key], str) else record[key]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DataError("must be a path or a list of paths", field=key, **where)
    return refs


def resolve_audio_refs(refs: list, base: str, where: dict) -> list:
    try:
        return [resolve_image_ref(r, base) for r in refs]
    except ValueError as e:
        raise DataError(str(e).replace("image", "audio"), field="audios", **where) from None


def is_frame(path: str) -> bool:
    return path.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp"))


def resolve_video_refs(refs: list, base: str, where: dict) -> list:
    """Paths resolved like images' (relative to the data file or image_root); frame lists path by path."""
    try:
        return [[resolve_image_ref(f, base) for f in r] if isinstance(r, list) else resolve_image_ref(r, base)
                for r in refs]
    except ValueError as e:
        raise DataError(str(e).replace("image", "video"), field="videos", **where) from None


def build_conversation(turns: list[Turn], images: list[str], record: dict, base: str, where: dict,
                       videos: list | None = None, audios: list | None = None) -> Conversation:
    """The record's turns and resolved images, plus what every format shares: the top-level system prompt,
    Qwen-VL's inline `<img>path</img>` images and ms-swift's grounding objects."""
    turns, tagged = inline_image_tags(turns)
    if tagged and images:
        raise DataError("images are given both as <img>...</img> tags in the text and in an image list; use one",
                        field="images", **where)
    images = images or resolve_refs(tagged, base, "<img>", where)
    if videos is None:
        videos = resolve_video_refs(video_list(record, where), base, where)
    if audios is None:
        audios = resolve_audio_refs(audio_list(record, where), base, where)
    return Conversation(turns=with_system(turns, record, where), images=images, videos=videos, audios=audios,
                        objects=parse_objects(record, where), **where)
