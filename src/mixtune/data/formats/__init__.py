"""Dataset readers, one per `name` in the config's dataset block. Each turns a file into Conversations.

A reader is a function `(entry: DatasetEntry, bad: BadSamples) -> list[Conversation]`, registered with
`@register(name)`. It parses each record inside `with bad.catch():` so that `on_bad_sample: skip` drops a
bad record (counted) and `error` stops at it, naming file, line or index, and field.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from typing import Any

from mixtune.data.formats.jsonstream import DEFAULT_MAX_SAMPLE_BYTES, iter_records, load_document
from mixtune.data.formats.records import note_unknown_keys, refuse_unsupported_media
from mixtune.errors import ConfigError, DataError

READERS: dict[str, Callable] = {}


def register(*names: str, folders: bool = False):
    """`folders`: the reader takes a folder in data_files (e.g. a `datasets` save_to_disk folder)."""
    def wrap(fn):
        fn.reads_folders = folders
        for name in names:
            READERS[name] = fn
        return fn
    return wrap


def get_reader(name: str) -> Callable:
    _load_builtin_readers()
    if name not in READERS:
        raise ConfigError(f"unknown dataset name '{name}'; known: {sorted(READERS)}", key="dataset.name")
    return READERS[name]


def _load_builtin_readers() -> None:
    from mixtune.data.formats import chatml, coco, hf, labels, llava, preference, sharegpt, unpaired  # noqa: F401  (they register themselves)
    from mixtune.data.formats import segmentation  # noqa: F401
    from mixtune.data.formats import detection  # noqa: F401
    from mixtune.data.formats import audio_captions  # noqa: F401


def expand_data_files(data_files: Any, base_dir: str = ".") -> list[str]:
    """A path, a glob or a list of them -> existing files, in a stable order."""
    patterns = data_files if isinstance(data_files, list) else [data_files]
    files: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"data_files entries must be strings, got {pattern!r}", key="dataset.data_files")
        path = pattern if os.path.isabs(pattern) else os.path.join(base_dir, pattern)
        if glob.has_magic(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise DataError(f"data file not found: no file matches the glob {path}", file=path)
        else:
            matches = [path]
            if not os.path.exists(path):
                raise DataError(f"data file not found: {path}", file=path)
        files.extend(matches)
    return files


def image_base(entry, path: str) -> str:
    """Relative image paths resolve against the entry's `image_root`, else the data file's folder."""
    return entry.image_root or os.path.dirname(os.path.abspath(path))


def read_json_samples(entry, bad, to_conversation: Callable, known_keys) -> list:
    """Every record of every data file of the entry through `to_conversation(record, image_base, where)`;
    a record that raises a DataError stops the run or is skipped, as `bad`'s policy says. Keys outside
    `known_keys` are reported (formats/records.py)."""
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
            where = dict(file=path, index=index, line=line)
            note_unknown_keys(record, known_keys, where, bad)
            with bad.catch():
                refuse_unsupported_media(record, where)
                out.append(to_conversation(record, base, where))
    return out


def load_json_file(path: str) -> Any:
    """A whole JSON document; a syntax error names the line (not skippable: the file has no samples)."""
    return load_document(path)


def iter_json_records(path: str, bad=None,
                      max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> Iterator[tuple[int, int | None, Any]]:
    """Yield (index, line, record) from a JSON list file or a JSONL file, one record in memory at a time.

    A bad record (malformed JSONL line, over `max_bytes`, not UTF-8, a key given twice) goes to `bad`
    (skipped under `on_bad_sample: skip`); without `bad` it raises. A malformed JSON list always raises."""
    for index, line, record in iter_records(path, max_bytes):
        if isinstance(record, DataError):
            if bad is None:
                raise record
            bad.add(record)
        else:
            yield index, line, record
