"""Building the train and eval sets from the config's `dataset` block.

Files are parsed up front (cheap: JSON only) and every sample is measured once by `lengths.scan` (cached
on disk), which drops over-long and, under `on_bad_sample: skip`, bad samples before training starts.
Images are decoded and samples encoded again lazily, in `__getitem__`, which runs in the loader workers.
"""

from __future__ import annotations

import difflib
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from mixtune.data.badsamples import POLICIES, TOO_LONG, BadSamples
from mixtune.data.conversation import Conversation, media_not_supported
from mixtune.data.encode import Encoded, encode_with_processor
from mixtune.data.formats import expand_data_files, get_reader
from mixtune.data.formats.jsonstream import DEFAULT_MAX_SAMPLE_BYTES
from mixtune.data.grounding import fill_grounding
from mixtune.data.images import fit_image, load_image
from mixtune.data.lengths import cache_key, default_cache_dir, entry_options, measure, processor_identity, scan
from mixtune.data.mix import MixDataset
from mixtune.data.templates import make_renderer
from mixtune.errors import ConfigError, DataError
from mixtune.media.audio import Audio, AudioBudget, audio_budget, check_audio_keys, load_audio
from mixtune.media.video import VIDEO_KEYS, Video, VideoBudget, check_video_keys, load_video

log = logging.getLogger("mixtune")

TRUNCATION = ("drop", "downscale")
ENTRY_KEYS = {"name", "data_files", "chat_template", "ratio", "repeat", "max_samples", "image_root", "prompt",
              "columns", "min_pixels", "max_pixels", "truncation", "on_bad_sample", "strict_fields", "max_sample_bytes",
              *VIDEO_KEYS, "max_audio_seconds"}
# config-wide keys that are defaults for every entry
ENTRY_DEFAULT_KEYS = ("on_bad_sample", "truncation", "strict_fields", "max_sample_bytes")


@dataclass
class DatasetEntry:
    name: str
    data_files: Any
    chat_template: str | None = None
    base_dir: str = "."
    ratio: float | None = None  # sampling weight relative to the entry's size
    repeat: int | None = None  # each sample this many times per epoch
    max_samples: int | None = None  # the first N samples of the entry
    image_root: str | None = None  # folder for relative image paths (default: the data file's folder)
    prompt: str | None = None  # caption prompt, or VQA template with {question}
    columns: dict | None = None  # hf: mixtune field -> dataset column
    min_pixels: int | None = None
    max_pixels: int | None = None
    truncation: str = "drop"  # over-long samples: "drop", or "downscale" their images until they fit
    on_bad_sample: str = "error"  # "error" stops at the first bad sample; "skip" drops and reports it
    strict_fields: bool = False  # a record key the reader does not read is an error, not a warning
    max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES  # a bigger JSON record is a bad sample, never parsed
    video: VideoBudget | None = None  # fps, min/max_frames, video_max_pixels, video_total_pixels
    max_audio_seconds: float | None = None  # longer clips are bad samples (default: what the model reads)

    @classmethod
    def from_config(cls, raw: Any, base_dir: str, where: str, defaults: dict | None = None) -> "DatasetEntry":
        if not isinstance(raw, dict):
            raise ConfigError(f"each entry must be a mapping, got {raw!r}", key=where)
        for key in ("name", "data_files"):
            if key not in raw:
                raise ConfigError(f"missing '{key}'", key=where)
        unknown = set(raw) - ENTRY_KEYS
        if unknown:
            key = sorted(unknown)[0]
            close = difflib.get_close_matches(key, sorted(ENTRY_KEYS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known: {sorted(ENTRY_KEYS)}"
            raise ConfigError(f"unknown key '{key}'{hint}", key=where)
        values = {**(defaults or {}), **raw}

        def check(key, ok, expected):
            if values.get(key) is not None and not ok(values[key]):
                raise ConfigError(f"expected {expected}, got {values[key]!r}", key=f"{where}.{key}")

        positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        check("ratio", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
              "a positive number")
        check("repeat", positive_int, "a positive integer")
        check("max_samples", positive_int, "a positive integer")
        check("min_pixels", positive_int, "a positive integer")
        check("max_pixels", positive_int, "a positive integer")
        check("max_sample_bytes", positive_int, "a positive integer (bytes)")
        for key in ("image_root", "prompt", "chat_template"):
            check(key, lambda v: isinstance(v, str), "a string")
        check("columns", lambda v: isinstance(v, dict) and all(isinstance(c, str) for c in v.values()),
              "a mapping of field names to column names")
        check("truncation", lambda v: v in TRUNCATION, f"one of {TRUNCATION}")
        check("on_bad_sample", lambda v: v in POLICIES, f"one of {POLICIES}")
        check("strict_fields", lambda v: isinstance(v, bool), "true or false")
        check_video_keys(values, where)
        check_audio_keys(values, where)
        if values.get("ratio") is not None and values.get("repeat") is not None:
            raise ConfigError("give 'ratio' or 'repeat', not both", key=where)
        if values.get("min_pixels") and values.get("max_pixels") and values["min_pixels"] > values["max_pixels"]:
            raise ConfigError("min_pixels is above max_pixels", key=where)

        def path(key):
            p = values.get(key)
            return os.path.join(base_dir, p) if p and not os.path.isabs(p) else p

        return cls(name=values["name"], data_files=values["data_files"], chat_template=path("chat_template"),
                   base_dir=base_dir, ratio=values.get("ratio"), repeat=values.get("repeat"),
                   max_samples=values.get("max_samples"), image_root=path("image_root"), prompt=values.get("prompt"),
                   columns=values.get("columns"), min_pixels=values.get("min_pixels"),
                   max_pixels=values.get("max_pixels"), truncation=values.get("truncation") or "drop",
                   on_bad_sample=values.get("on_bad_sample") or "error",
                   strict_fields=bool(values.get("strict_fields")),
                   max_sample_bytes=values.get("max_sample_bytes") or DEFAULT_MAX_SAMPLE_BYTES,
                   video=VideoBudget.from_entry(values), max_audio_seconds=values.get("max_audio_seconds"))

    @property
    def weight(self) -> float | None:
        return float(self.repeat) if self.repeat is not None else self.ratio

    def label(self) -> str:
        """A short name for logs and per-entry eval metrics: the first data file's stem."""
        first = self.data_files[0] if isinstance(self.data_files, list) and self.data_files else self.data_files
        stem = os.path.basename(str(first).rstrip("/")).split(".")[0]
        return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or self.name


@dataclass
class ImagePrep:
    """Decodes a sample's images, then its videos (`Video`s, after the images in the same list), and fits them
    to the entry's pixel and frame budgets (picklable for workers)."""
    min_pixels: int | None = None
    max_pixels: int | None = None
    video: VideoBudget | None = None
    audio: AudioBudget | None = None  # the processor's sampling rate and the clip length limit

    def decode(self, conv: Conversation) -> list:
        try:
            return ([load_image(ref) for ref in conv.images]
                    + [load_video(ref, self.video or VideoBudget()) for ref in conv.videos]
                    + [load_audio(ref, self.audio or AudioBudget()) for ref in conv.audios])
        except DataError as e:
            raise DataError(e.reason, file=conv.file, index=conv.index, line=conv.line, field=e.field) from None

    def fit(self, img, scale: float = 1.0):
        if isinstance(img, Audio):  # audio is never shrunk: a clip too long for max_length is dropped
            return img
        if isinstance(img, Video):
            return (self.video or VideoBudget()).fit(img, scale)
        return fit_image(img, self.min_pixels, self.max_pixels, scale)


class PixelBudgetProcessor:
    """The checkpoint's processor, told the entry's min/max_pixels where its image processor sizes images by
    pixel count (Qwen2-VL style), so it does not re-clamp what ImagePrep already sized."""

    def __init__(self, processor, min_pixels: int | None, max_pixels: int | None):
        self.processor = processor
        size = dict(processor.image_processor.size)
        self.images_kwargs = {"size": {"shortest_edge": min_pixels or size["shortest_edge"],
                                       "longest_edge": max_pixels or size["longest_edge"]}}

    def __call__(self, *args, **kwargs):
        return self.processor(*args, images_kwargs=self.images_kwargs, **kwargs)

    def __getattr__(self, name):
        if name == "processor":  # during unpickling, before __init__'s attributes exist
            raise AttributeError(name)
        return getattr(self.processor, name)

    @staticmethod
    def applies(processor) -> bool:
        image_processor = getattr(processor, "image_processor", None)
        kwargs = getattr(getattr(type(image_processor), "valid_kwargs", None), "__annotations__", {})
        size = getattr(image_processor, "size", None) or {}
        return ("max_pixels" in kwargs and size.get("shortest_edge") is not None
                and size.get("longest_edge") is not None)


class SFTDataset(torch.utils.data.Dataset):
    """The measured, kept samples of one dataset entry, encoded on access."""

    def __init__(self, conversations: list[Conversation], encode, max_length: int, images: ImagePrep | None = None,
                 lengths: list[int] | None = None, scales: list[float] | None = None, name: str = "",
                 skipped: list[dict] | None = None, render=None):
        self.conversations = conversations
        self.render = render  # the chat template this entry is rendered with (saved with the model)
        self.encode = encode
        self.max_length = max_length
        self.images = images or ImagePrep()
        self._lengths = lengths
        self.scales = scales or [1.0] * len(conversations)
        self.name = name
        self.skipped = skipped or []

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, i: int) -> Encoded:
        conv = self.conversations[i]
        images = [self.images.fit(img, self.scales[i]) for img in self.images.decode(conv)]
        enc = self.encode(conv, images)
        if len(enc) > self.max_length:  # the scan measured it shorter: data changed since
            raise conv.error(f"sample has {len(enc)} tokens (image tokens included), over max_length "
                             f"{self.max_length}, but measured {self.lengths()[i]} before training: did its "
                             "images change? Delete the length cache (data_cache_dir) and rerun")
        return enc

    def lengths(self) -> list[int]:
        """Token length of each sample, image tokens included (from the scan)."""
        if self._lengths is None:
            self._lengths = [len(self[i]) for i in range(len(self))]
        return self._lengths


def read_entry(entry: DatasetEntry, bad: BadSamples | None = None) -> list[Conversation]:
    """Parse and validate an entry's samples; bad ones raise, or are skipped into `bad`."""
    bad = bad if bad is not None else BadSamples("error", entry=entry.label(), strict_fields=entry.strict_fields)
    conversations = []
    for conv in get_reader(entry.name)(entry, bad):
        with bad.catch():
            conversations.append(conv.validate())
    if bad.ignored_keys_warning():
        log.warning(bad.ignored_keys_warning())
    return conversations


def build_entry(entry: DatasetEntry, processor, family, max_length: int, processor_id: str, cache_dir: str,
                num_workers: int = 0) -> SFTDataset:
    label = entry.label()
    bad = BadSamples(entry.on_bad_sample, entry=label, strict_fields=entry.strict_fields)
    conversations = refuse_media(read_entry(entry, bad), family, bad)
    if entry.max_samples is not None:
        conversations = conversations[: entry.max_samples]
    render = (make_renderer(processor, entry.chat_template, family.image_placeholder, family.default_chat_template)
              if family.uses_chat_template else None)
    if (entry.min_pixels or entry.max_pixels) and PixelBudgetProcessor.applies(processor):
        processor = PixelBudgetProcessor(processor, entry.min_pixels, entry.max_pixels)
    encode = partial(_encode, family.encode or encode_with_processor, processor=processor, render=render,
                     grounding=family.grounding)
    images = ImagePrep(entry.min_pixels, entry.max_pixels, entry.video,
                       audio_budget(processor, entry.max_audio_seconds))
    options = {**entry_options(entry), "family": family.name, "n": len(conversations),
               "skipped_at_parse": [(r["file"], r["index"]) for r in bad.records]}
    files = expand_data_files(entry.data_files, entry.base_dir)
    key = cache_key(files, processor_id, max_length, options)
    measure_one = partial(measure, decode=images.decode, fit=images.fit, encode=encode, max_length=max_length,
                          downscale=entry.truncation == "downscale")
    result = scan(conversations, measure_one, key, cache_dir, num_workers, desc=f"measuring {label}",
                  stop_on_error=entry.on_bad_sample == "error")
    kept, lengths, scales = [], [], []
    for i, conv in enumerate(conversations):
        if i in result.errors:
            bad.add(DataError(**result.errors[i]))
        elif result.lengths[i] > max_length:
            bad.drop_too_long(conv.error(f"{result.lengths[i]} tokens (image tokens included) > max_length "
                                         f"{max_length}"))
        else:
            kept.append(conv)
            lengths.append(result.lengths[i])
            scales.append(result.scales.get(i, 1.0))
    too_long = sum(r["kind"] == TOO_LONG for r in bad.records)
    log.info("dataset %s (%s): %d samples kept, %d over max_length dropped, %d bad skipped, %d downscaled",
             label, entry.name, len(kept), too_long, len(bad.records) - too_long, sum(s < 1.0 for s in scales))
    return SFTDataset(kept, encode, max_length, images, lengths, scales, name=label, skipped=bad.records,
                      render=render)


def refuse_media(conversations: list[Conversation], family, bad: BadSamples) -> list[Conversation]:
    """Samples with media the family does not read (videos, audio, or images for an audio model) are bad
    samples naming the family."""
    unread = [kind for kind in ("image", "video", "audio") if kind not in family.media_kinds]
    kept = []
    for conv in conversations:
        with bad.catch():
            for kind in unread:
                refs = getattr(conv, f"{kind}s")
                if refs:
                    raise conv.error(f"the sample has {len(refs)} {kind}(s): {media_not_supported(kind, family.name)}",
                                     f"{kind}s")
            kept.append(conv)
    return kept


def build_split(raw_entries: list, split: str, processor, family, max_length: int, base_dir: str, *, seed: int = 0,
                cache_dir: str | None = None, num_workers: int = 0, defaults: dict | None = None) -> MixDataset | None:
    """The split's entries, measured and mixed. `defaults` holds config-wide entry keys (on_bad_sample,
    truncation) that an entry may override."""
    if not raw_entries:
        return None
    entries = parse_entries(raw_entries, split, base_dir, defaults)
    processor_id = processor_identity(processor)
    cache_dir = cache_dir or default_cache_dir()
    parts = [build_entry(e, processor, family, max_length, processor_id, cache_dir, num_workers) for e in entries]
    names = unique_names([p.name for p in parts])
    for part, name in zip(parts, names):
        part.name = name
    mix = MixDataset(parts, names, [e.weight for e in entries], seed=seed)
    if len(mix) == 0:
        kinds = sorted({r["kind"] for r in mix.skipped})
        raise DataError(f"dataset.{split} has no samples left: {len(mix.skipped)} were skipped or dropped "
                        f"({', '.join(kinds) or 'the files hold none'})", file=", ".join(str(e.data_files)
                                                                                       for e in entries))
    for entry, part, count in zip(entries, parts, mix.counts()):
        if entry.weight is not None and count == 0 and len(part):
            log.warning("dataset %s: ratio %s of %d samples gives none per epoch", part.name, entry.weight, len(part))
    return mix


def parse_entries(raw_entries: Any, split: str, base_dir: str, defaults: dict | None = None) -> list[DatasetEntry]:
    """The split's entries with their keys and values checked (no file is read)."""
    if not isinstance(raw_entries, list):
        raise ConfigError("must be a list of dataset entries", key=f"dataset.{split}")
    entries = [DatasetEntry.from_config(raw, base_dir, f"dataset.{split}[{i}]", defaults)
               for i, raw in enumerate(raw_entries)]
    if split != "train":
        for i, entry in enumerate(entries):
            if entry.weight is not None:
                raise ConfigError("'ratio' and 'repeat' apply to training entries only",
                                  key=f"dataset.{split}[{i}]")
    return entries


def unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}_{seen[name]}")
    return out


def _encode(encode, conv, images, processor, render, grounding=None):
    # a module-level function keeps the dataset picklable for data-loader worker processes
    return encode(fill_grounding(conv, images, processor, grounding), images, processor, render)
