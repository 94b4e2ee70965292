"""`hf`: a local `datasets` folder (save_to_disk), or a parquet, JSON/JSONL or arrow file, read with `datasets`.

`columns` maps mixtune's field names to the dataset's columns, e.g. {"messages": "conv", "images": "pics"};
fields already named like ours need no mapping. A row becomes a sample by the fields it has:
  messages / conversations (+ images)  -> as `sharegpt`;
  question + answer (+ image / images) -> as `vqa`;
  caption + image                      -> as `coco_caption` (with the entry's `prompt`).
`system` and ms-swift's grounding `objects` are read for any row; `videos` / `audios` make a row a bad
sample (not supported yet); any other column is reported as not read (an error under strict_fields).
Images may be paths (relative to `image_root` or the data file's folder), `data:` URIs, or `datasets`
Image values ({"bytes", "path"}). Embedded bytes stay in the memory-mapped arrow files: a sample keeps only
an `hfrow:` reference, and the loader worker reads that one cell when it needs the image.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from mixtune.data.conversation import Conversation
from mixtune.data.formats import expand_data_files, image_base, register
from mixtune.data.formats.coco import CAPTION_PROMPT, VQA_PROMPT, caption_conversation, vqa_conversation
from mixtune.data.formats.records import (MEDIA_KEYS, note_unknown_keys, parse_objects, refuse_unsupported_media,
                                          resolve_refs, with_system)
from mixtune.data.formats.sharegpt import conversation_from_record
from mixtune.errors import ConfigError, DataError

FIELDS = ("messages", "conversations", "images", "image", "question", "answer", "answers", "caption", "system",
          "objects", *MEDIA_KEYS)
HF_SCHEME = "hfrow:"


def require_columns(ds, columns, path: str) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"column(s) {missing} are not in the dataset; it has {ds.column_names} (map them with "
                        "'columns')", file=path, field="columns")


@register("hf", folders=True)
def read_hf(entry, bad) -> list[Conversation]:
    mapping = dict(entry.columns or {})
    unknown = set(mapping) - set(FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) {sorted(unknown)}; map any of {list(FIELDS)} to column names",
                          key="columns")
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        ds = open_dataset(path)
        require_columns(ds, mapping.values(), path)
        columns = {f: mapping.get(f, f) for f in FIELDS if mapping.get(f, f) in ds.column_names}
        unused = [c for c in ds.column_names if c not in columns.values() and c != "id"]
        if unused:  # counted per column, not per row: reading them row by row could mean reading image bytes
            bad.ignore_keys(unused, dict(file=path, index=None, line=None), count=len(ds))
        base = image_base(entry, path)
        index = 0
        for batch in ds.with_format("arrow").select_columns(sorted(set(columns.values()))).iter(batch_size=1000):
            for row in batch.to_pylist():
                where = dict(file=path, index=index, line=None)
                record = {f: row[c] for f, c in columns.items()}
                note_unknown_keys(record, FIELDS, where, bad)  # keys inside turns, e.g. messages[].name
                with bad.catch():
                    refuse_unsupported_media(record, where, kinds=("video", "audio"))
                    out.append(row_conversation(record, columns, path, base, entry.prompt, where))
                index += 1
    return out


def row_conversation(record: dict, columns: dict, path: str, base: str, prompt: str | None,
                     where: dict) -> Conversation:
    image_field = "images" if record.get("images") is not None else "image"
    refs = image_refs(record.get(image_field), path, where["index"], columns.get(image_field), where)
    images = resolve_refs(refs, base, columns.get(image_field, image_field), where)  # hfrow: refs pass through
    if record.get("messages") is not None or record.get("conversations") is not None:
        conv = conversation_from_record({k: v for k, v in record.items() if k not in ("images", "image")}, base,
                                        where)
        if images and conv.images:
            raise DataError("images are given both inside the messages and in an image column; use one",
                            field=columns.get(image_field, image_field), **where)
        conv.images = images or conv.images
        return conv
    if record.get("question") is not None:
        answer = record.get("answer", record.get("answers"))
        conv = vqa_conversation(refs or None, record["question"], answer, prompt or VQA_PROMPT, base, where)
    elif record.get("caption") is not None:
        if len(refs) != 1:
            raise DataError(f"a caption sample needs exactly one image, got {len(refs)}", field="image", **where)
        conv = caption_conversation(refs[0], record["caption"], prompt or CAPTION_PROMPT, base, where)
    else:
        raise DataError(f"missing field: a row needs messages, conversations, question + answer, or caption "
                        f"(map columns with 'columns'); it has {sorted(k for k, v in record.items() if v is not None)}",
                        field="columns", **where)
    conv.images = images
    conv.turns = with_system(conv.turns, record, where)
    conv.objects = parse_objects(record, where)
    return conv


def image_refs(value: Any, path: str, row: int, column: str | None, where: dict) -> list[str]:
    """Strings stay paths / URIs; Image values with bytes become lazy `hfrow:` references."""
    if value is None:
        return []
    values, listed = (value, True) if isinstance(value, list) else ([value], False)
    refs = []
    for k, v in enumerate(values):
        if isinstance(v, str):
            refs.append(v)
        elif isinstance(v, dict) and v.get("bytes") is not None:
            refs.append(f"{HF_SCHEME}{os.path.abspath(path)}#{row}#{column}#{k if listed else -1}")
        elif isinstance(v, dict) and v.get("path"):
            refs.append(v["path"])
        else:
            raise DataError(f"unreadable image value {str(v)[:60]!r}: expected a path, a data: URI or an Image "
                            "value with bytes or path", field=column or "image", **where)
    return refs


def open_dataset(path: str):
    """A memory-mapped `datasets.Dataset` for a saved folder or a parquet / json / jsonl / arrow file."""
    import datasets

    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"not a saved `datasets` folder: {e}", file=path) from None
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(f"holds several splits {list(ds)}; point data_files at one split's folder, e.g. "
                            f"{os.path.join(path, next(iter(ds)))}", file=path)
        return ds
    ext = path.rsplit(".", 1)[-1].lower()
    try:
        if ext == "parquet":
            return datasets.Dataset.from_parquet(path)
        if ext in ("json", "jsonl"):
            return datasets.Dataset.from_json(path)
        if ext == "arrow":
            return datasets.Dataset.from_file(path)
    except Exception as e:  # pyarrow raises many types for broken files
        raise DataError(f"cannot read with `datasets`: {type(e).__name__}: {e}", file=path) from None
    raise DataError("expected a saved `datasets` folder or a .parquet, .json, .jsonl or .arrow file", file=path)


@functools.lru_cache(maxsize=16)
def _cell_reader(path: str, column: str):
    # one open dataset per (file, column) and process: loader workers each open their own, memory-mapped
    return open_dataset(path).with_format("arrow").select_columns([column])


def hf_image_bytes(ref: str) -> bytes:
    """The encoded image behind an `hfrow:` reference: one cell read from the arrow file."""
    path, row, column, k = ref[len(HF_SCHEME):].rsplit("#", 3)
    value = _cell_reader(path, column)[int(row)].column(0)[0].as_py()
    value = value[int(k)] if int(k) >= 0 else value
    return value["bytes"]
