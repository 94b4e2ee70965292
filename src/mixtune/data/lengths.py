"""Per-sample token lengths: each sample is encoded once (images included) in a scan before training, and
the outcome is cached on disk.

The scan is also where bad samples are found (an image that will not decode, a template that cannot be
applied, a sample over max_length), so `on_bad_sample: skip` and the over-long drop remove them before
training starts and the data loader never meets them. The cache key covers the data files' content, the
processor and tokenizer, max_length and every entry option that changes the encoding; the image files
themselves are not hashed (that would read every image): after editing images in place, delete the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mixtune.data.conversation import Conversation
from mixtune.errors import ConfigError, DataError

CACHE_VERSION = 1
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
            if min(min(img.size) for img in sized) < MIN_IMAGE_SIDE:
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
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        result = ScanResult(cached["lengths"], {int(k): v for k, v in cached["scales"].items()},
                            {int(k): v for k, v in cached["errors"].items()})
        if len(result.lengths) == len(conversations):
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
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"lengths": result.lengths, "scales": result.scales, "errors": result.errors}, f)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return result
