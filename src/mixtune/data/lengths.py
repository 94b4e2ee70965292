"""Per-sample token lengths: each sample is encoded once (images included) in a scan before training, and
the outcome is cached on disk.

The scan is also where bad samples are found (an image that will not decode, a template that cannot be
applied, a sample over max_length), so `on_bad_sample: skip` and the over-long drop remove them before
training starts and the data loader never meets them. The cache key covers the data files' content, the
processor and tokenizer, max_length and every entry option that changes the encoding; the image files
themselves are not hashed (that would read every image): after editing images in place, delete the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixtune.data.conversation import Conversation
from mixtune.errors import ConfigError, DataError

log = logging.getLogger("mixtune")

CACHE_VERSION = 1
# DatasetEntry fields that provably leave every sample's length unchanged, so they stay out of the cache key:
# ratio / repeat act on the measured samples (mixing); on_bad_sample only decides whether a bad sample found
# by the same scan raises or is recorded; base_dir only resolves paths that the key holds resolved already
# (the data files' absolute paths and digests, image_root, chat_template). Every other field is in the key,
# so an option added to DatasetEntry later is keyed without anyone remembering to.
NOT_LENGTH_FIELDS = frozenset({"ratio", "repeat", "on_bad_sample", "base_dir"})
DOWNSCALE_STEP = 0.75  # linear factor per try: about half the pixels every two tries
MIN_IMAGE_SIDE = 28  # below this no vision encoder gets a useful patch


def default_cache_dir() -> str:
    root = os.environ.get("MIXTUNE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mixtune")
    return os.path.join(root, "lengths")


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or of every file under a folder (names and bytes)."""
    h = hashlib.sha256()
    paths = [path]
    if os.path.isdir(path):
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files)
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def processor_identity(processor) -> str:
    """What about the processor changes token counts: its settings, the tokenizer's vocabulary and rules,
    and the chat template."""
    h = hashlib.sha256(type(processor).__name__.encode())
    try:
        h.update(processor.to_json_string().encode())
    except Exception:  # a bare tokenizer or an unusual processor: its class and tokenizer still count
        pass
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else
             json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(getattr(processor, "chat_template", None)).encode())
    return h.hexdigest()


def entry_options(entry) -> dict:
    """The entry's options that can change a sample's token length, for the cache key (a chat template file
    counts by its content, so editing it in place invalidates the cache)."""
    options = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry) if f.name not in NOT_LENGTH_FIELDS}
    if options.get("chat_template"):
        options["chat_template"] = [options["chat_template"], file_digest(options["chat_template"])]
    return options


def cache_key(files: list[str], processor_id: str, max_length: int, options: dict) -> str:
    payload = {"version": CACHE_VERSION, "files": [[os.path.abspath(f), file_digest(f)] for f in files],
               "processor": processor_id, "max_length": max_length, "options": options}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclass
class ScanResult:
    lengths: list[int]  # -1 where the sample is bad
    scales: dict[int, float] = field(default_factory=dict)  # downscale factors, where below 1
    errors: dict[int, dict] = field(default_factory=dict)  # DataError fields, where bad


def measure(conv: Conversation, decode: Callable, fit: Callable, encode: Callable, max_length: int,
            downscale: bool) -> dict:
    """Encode one sample; with `downscale`, shrink its images until it fits (or shrinking stops helping)."""
    try:
        originals = decode(conv)
        scale = 1.0
        length = len(encode(conv, [fit(img, scale) for img in originals]))
        while length > max_length and downscale and originals:
            trial = scale * DOWNSCALE_STEP
            sized = [fit(img, trial) for img in originals]
            # audio clips have no size and are never shrunk: only images and videos count here
            if min((min(m.size) for m in sized if hasattr(m, "size")), default=0) < MIN_IMAGE_SIDE:
                break
            shorter = len(encode(conv, sized))
            if shorter >= length:  # the processor's own minimum size is reached
                break
            scale, length = trial, shorter
        return {"length": length, "scale": scale}
    except DataError as e:
        return {"error": {"reason": e.reason, "field": e.field, "file": conv.file, "index": conv.index,
                          "line": conv.line}}
    except ConfigError:  # the config is wrong (an unsafe chat template), not this sample
        raise
    except Exception as e:  # a processor rejecting this sample's content (e.g. a 1-pixel image)
        return {"error": {"reason": f"cannot encode: {type(e).__name__}: {e}", "field": None, "file": conv.file,
                          "index": conv.index, "line": conv.line}}


class _Measured(torch.utils.data.Dataset):
    def __init__(self, conversations, measure_one):
        self.conversations, self.measure_one = conversations, measure_one

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, i):
        return self.measure_one(self.conversations[i])


def _identity(x):
    return x


def scan(conversations: list[Conversation], measure_one: Callable, key: str, cache_dir: str,
         num_workers: int = 0, desc: str = "token lengths", stop_on_error: bool = False) -> ScanResult:
    """Lengths from the cache, or by measuring every sample (in `num_workers` loader workers) and caching.

    With `stop_on_error`, the first bad sample raises its DataError (and nothing is cached)."""
    path = os.path.join(cache_dir, f"{key}.json")
    result = read_cache(path, len(conversations))
    if result is not None:
        if stop_on_error and result.errors:
            raise DataError(**result.errors[min(result.errors)])
        return result
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(_Measured(conversations, measure_one), batch_size=None,
                                         num_workers=num_workers, collate_fn=_identity)
    result = ScanResult(lengths=[])
    for i, out in enumerate(tqdm(loader, total=len(conversations), desc=desc, mininterval=2.0)):
        if "error" in out:
            if stop_on_error:
                raise DataError(**out["error"])
            result.errors[i] = out["error"]
            result.lengths.append(-1)
            continue
        result.lengths.append(out["length"])
        if out["scale"] < 1.0:
            result.scales[i] = out["scale"]
    write_cache(path, result)
    return result


ERROR_FIELDS = {"reason", "field", "file", "index", "line"}


def read_cache(path: str, n: int) -> ScanResult | None:
    """The cached scan, or None when there is none, it is for another sample count, or it is damaged (a
    truncated or hand-edited file is measured again, with a warning, rather than trusted or fatal)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        lengths = cached["lengths"]
        result = ScanResult(lengths, {int(k): float(v) for k, v in cached["scales"].items()},
                            {int(k): dict(v) for k, v in cached["errors"].items()})
        if not (isinstance(lengths, list) and all(type(x) is int for x in lengths)
                and all(0 <= i < len(lengths) and 0 < s <= 1 for i, s in result.scales.items())
                and all(0 <= i < len(lengths) and set(e) == ERROR_FIELDS for i, e in result.errors.items())):
            raise ValueError("unexpected contents")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("length cache %s is damaged (%s: %s); measuring again", path, type(e).__name__, e)
        return None
    return result if len(lengths) == n else None


def write_cache(path: str, result: ScanResult) -> None:
    """Keep the scan for next time; a cache that cannot be written (read-only or full disk) costs only time."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"lengths": result.lengths, "scales": result.scales, "errors": result.errors}, f)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except OSError as e:
        log.warning("could not write the length cache %s (%s); the next run measures again", path, e)
        if os.path.exists(tmp):
            os.remove(tmp)
