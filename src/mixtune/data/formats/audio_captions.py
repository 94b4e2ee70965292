"""Captioned audio clips for the text_to_audio task (mixtune/tasks/text_to_audio.py).

`audio_captions`: an AudioCaps-style CSV (a header row; the caption in `caption`, the clip in `audio`, `file_name`
or `path`, or AudioCaps' own `audiocap_id` naming `<audiocap_id>.wav`), or a JSON list / JSONL of
{"audio": path, "caption": text}. Relative paths resolve against `image_root` (the media folder), else the data
file's folder.
`hf_audio_captions`: a `datasets` folder (save_to_disk) or parquet / arrow / JSON file with an Audio column and a
caption column (`columns` maps "audio" / "caption" to other names); clips stay in the arrow file until a loader
worker decodes them.

Only references are read here; decoding happens lazily per sample (media/audio.py), where a corrupt, empty,
silent or many-channel clip becomes a DataError naming file, sample and field (or a counted skip).
These readers give `AudioCaptionSample`s: a chat, contrastive or classification run refuses them.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

from mixtune.data.formats import expand_data_files, image_base, iter_json_records, register
from mixtune.data.formats.records import note_unknown_keys
from mixtune.errors import ConfigError, DataError

AUDIO_COLUMNS = ("audio", "file_name", "path")  # first present wins
AUDIOCAPS_ID = "audiocap_id"
JSON_KEYS = frozenset({"id", "audio", "caption"})
CSV_KNOWN = frozenset({*AUDIO_COLUMNS, AUDIOCAPS_ID, "caption", "youtube_id", "start_time", "id"})
HF_AUDIO = "hfaudio:"  # hfaudio:<dataset path>#<row>#<column>: one cell read lazily


@dataclass
class AudioCaptionSample:
    audio: str  # absolute path, data: URI, or an hfaudio: cell reference
    caption: str
    file: str | None = None
    index: int | None = None
    line: int | None = None


def caption_sample(audio, caption, base: str, where: dict) -> AudioCaptionSample:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"'caption' must be non-empty text, got {caption!r}", field="caption", **where)
    if not isinstance(audio, str) or not audio:
        raise DataError(f"'audio' must be a path, got {audio!r}", field="audio", **where)
    if not (audio.startswith("data:") or audio.startswith(HF_AUDIO) or os.path.isabs(audio)):
        audio = os.path.join(base, audio)
    return AudioCaptionSample(audio, caption.strip(), **where)


@register("audio_captions")
def read_audio_captions(entry, bad) -> list[AudioCaptionSample]:
    out: list[AudioCaptionSample] = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        if path.lower().endswith(".csv"):
            out += read_csv(path, base, bad)
            continue
        for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
            where = dict(file=path, index=index, line=line)
            with bad.catch():
                if not isinstance(record, dict):
                    raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
                note_unknown_keys(record, JSON_KEYS, where, bad)
                out.append(caption_sample(record.get("audio"), record.get("caption"), base, where))
    return out


def read_csv(path: str, base: str, bad) -> list[AudioCaptionSample]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        audio_col = next((c for c in AUDIO_COLUMNS if c in header), AUDIOCAPS_ID if AUDIOCAPS_ID in header else None)
        if audio_col is None or "caption" not in header:
            raise DataError(f"a captions CSV needs a 'caption' column and one of {[*AUDIO_COLUMNS, AUDIOCAPS_ID]}; "
                            f"its header is {header}", file=path, line=1)
        unknown = [c for c in header if c not in CSV_KNOWN]
        if unknown:
            bad.ignore_keys(unknown, dict(file=path, index=None, line=1))
        for index, row in enumerate(reader):
            where = dict(file=path, index=index, line=reader.line_num)
            with bad.catch():
                audio = row.get(audio_col)
                if audio_col == AUDIOCAPS_ID and audio:
                    audio = f"{audio}.wav"
                out.append(caption_sample(audio, row.get("caption"), base, where))
    return out


@register("hf_audio_captions", folders=True)
def read_hf_audio_captions(entry, bad) -> list[AudioCaptionSample]:
    from mixtune.data.formats.hf import open_dataset, require_columns

    columns = {"audio": "audio", "caption": "caption", **(entry.columns or {})}
    if set(columns) != {"audio", "caption"}:
        raise ConfigError(f"hf_audio_captions maps only 'audio' and 'caption' to columns, got "
                          f"{sorted(entry.columns)}", key="columns")
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        ds = open_dataset(path)
        require_columns(ds, columns.values(), path)
        base = image_base(entry, path)
        captions = ds.select_columns([columns["caption"]])[columns["caption"]]  # text only: audio stays unread
        for index, caption in enumerate(captions):
            where = dict(file=path, index=index, line=None)
            with bad.catch():
                out.append(caption_sample(f"{HF_AUDIO}{os.path.abspath(path)}#{index}#{columns['audio']}", caption,
                                          base, where))
    return out


def hf_audio_cell(ref: str) -> tuple[bytes | None, str | None]:
    """The (bytes, path) an Audio column stores for one row."""
    from mixtune.data.formats.hf import _cell_reader

    path, row, column = ref[len(HF_AUDIO):].rsplit("#", 2)
    value = _cell_reader(path, column)[int(row)].column(0)[0].as_py()
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, str):
        return None, value
    raise DataError(f"column '{column}' row {row} is not an audio cell (bytes or path), got {type(value).__name__}",
                    file=path, index=int(row), field=column)


read_audio_captions.task = read_hf_audio_captions.task = "text_to_audio"
