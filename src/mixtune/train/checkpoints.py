"""Crash-safe folders: a save is written into a staging folder, fsynced, marked complete, then renamed into place.

A `checkpoint-N` folder in output_dir therefore only ever appears whole. The marker (`mixtune_complete.json`,
written last) lists every file with its size, so a reader can tell a complete folder from one that a kill, a
full disk or a stray copy left half-written. Checkpoints saved by an older mixtune have no marker: they are
accepted when their `trainer_state.json` (the Trainer writes it last) parses and weights exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

from mixtune.errors import OutputDirError

log = logging.getLogger("mixtune")

MARKER = "mixtune_complete.json"
STAGING = ".mixtune-staging"  # inside output_dir, so the final rename never crosses a filesystem
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_RE = re.compile(r"^(model|adapter_model|pytorch_model)[\w.-]*\.(safetensors|bin)$")


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush every file and folder under `folder` to disk (also files that other ranks wrote)."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def list_files(folder: str) -> dict[str, int]:
    """Relative path -> size for every file under `folder`, the marker excepted."""
    sizes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MARKER:
                sizes[rel] = os.path.getsize(os.path.join(root, name))
    return sizes


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path` through a temporary file and a rename: readers see the old file or the new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or ".")


def write_marker(folder: str, kind: str, files: dict[str, int] | None = None) -> None:
    write_json_atomic(os.path.join(folder, MARKER), {"kind": kind, "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                     "files": list_files(folder) if files is None else files})


def read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def incomplete_reason(folder: str) -> str | None:
    """None when `folder` is a complete checkpoint; otherwise why not, in words a user can act on."""
    if not os.path.isdir(folder):
        return "it is not a folder"
    if os.path.exists(os.path.join(folder, MARKER)):
        marker = read_marker(folder)
        if marker is None:
            return f"its {MARKER} is unreadable"
        for rel, size in marker["files"].items():
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f"{rel} is missing"
            if os.path.getsize(path) != size:
                return f"{rel} has {os.path.getsize(path)} bytes, {MARKER} says {size}"
        return None
    return legacy_incomplete_reason(folder)


def legacy_incomplete_reason(folder: str) -> str | None:
    """A checkpoint from before the marker: the Trainer writes trainer_state.json after the weights, optimizer,
    scheduler and RNG states, so a parseable one means the save got to its end."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return f"no {MARKER} and no trainer_state.json: its save was interrupted"
    try:
        with open(state) as f:
            json.load(f)
    except (OSError, ValueError):
        return "trainer_state.json is empty or cut short: its save was interrupted"
    if not any(WEIGHT_RE.match(name) for name in os.listdir(folder)) and not has_deepspeed_state(folder):
        return "it holds no model weights"
    return None


def has_deepspeed_state(folder: str) -> bool:
    return any(name.startswith("global_step") and os.path.isdir(os.path.join(folder, name))
               for name in os.listdir(folder))


def checkpoint_step(name: str) -> int | None:
    match = CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def checkpoints_by_step(folder: str) -> list[str]:
    """checkpoint-N folders in `folder`, newest (highest step) first."""
    if not os.path.isdir(folder):
        return []
    found = [(checkpoint_step(n), n) for n in os.listdir(folder)
             if checkpoint_step(n) is not None and os.path.isdir(os.path.join(folder, n))]
    return [os.path.join(folder, n) for _, n in sorted(found, reverse=True)]


def newest_complete_checkpoint(folder: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete checkpoint-N in `folder` and the (path, reason) of each newer one skipped."""
    skipped = []
    for path in checkpoints_by_step(folder):
        reason = incomplete_reason(path)
        if reason is None:
            if not os.path.exists(os.path.join(path, MARKER)):
                log.warning("%s was saved without %s (an older mixtune); accepted because its trainer_state.json, "
                            "written last, is complete", path, MARKER)
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)


def clear(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def commit_checkpoint(staged: str, final: str) -> None:
    """Make the fully written `staged` folder the checkpoint `final`: fsync, marker last, one rename.

    If `final` already exists (a run resumed from an older checkpoint saves the same step again), it is moved
    aside first; a kill in between leaves the new, marked copy in the staging folder, which
    `recover_staged` puts in place at the next start."""
    fsync_tree(staged)
    write_marker(staged, "checkpoint")
    fsync_path(os.path.dirname(staged))
    if os.path.exists(final):
        aside = os.path.join(os.path.dirname(staged), "replaced-" + os.path.basename(final))
        clear(aside)
        os.rename(final, aside)
        os.rename(staged, final)
        clear(aside)
    else:
        os.rename(staged, final)
    fsync_path(os.path.dirname(final))


def recover_staged(output_dir: str) -> None:
    """At the start of a run: put in place any complete checkpoint a kill left in staging (marker written, rename
    not done), then delete the staging folder's half-written leftovers."""
    staging = staging_dir(output_dir)
    if not os.path.isdir(staging):
        return
    for name in sorted(os.listdir(staging)):
        path, final = os.path.join(staging, name), os.path.join(output_dir, name)
        if checkpoint_step(name) is not None and not os.path.exists(final) and os.path.exists(
                os.path.join(path, MARKER)) and incomplete_reason(path) is None:
            os.rename(path, final)
            log.warning("recovered %s: it was complete in %s when the previous run stopped", final, staging)
    log.info("removing the unfinished saves of a previous run in %s: %s", staging,
             ", ".join(sorted(os.listdir(staging))) or "(empty)")
    shutil.rmtree(staging)


def rotate_checkpoints(output_dir: str, limit: int | None, keep: set[str]) -> list[str]:
    """Delete the oldest complete checkpoints beyond `limit`; never those in `keep` (the one just saved, the best
    one). Incomplete folders (only an older mixtune makes them) are neither counted nor deleted here."""
    if not limit or limit <= 0:
        return []
    keep = {os.path.abspath(k) for k in keep if k}
    complete = [p for p in checkpoints_by_step(output_dir) if incomplete_reason(p) is None]
    deleted = []
    for path in reversed(complete):  # oldest first
        if len(complete) - len(deleted) <= max(limit, len(keep)):
            break
        if os.path.abspath(path) not in keep:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def write_failure(what: str, path: str, error: BaseException, last_complete: str | None) -> OutputDirError:
    """One clear error for a save that could not be written (full disk, folder not writable or gone)."""
    detail = f"{error.strerror} [errno {error.errno}]" if isinstance(error, OSError) and error.strerror else str(error)
    where = getattr(error, "filename", None) or path
    tail = (f"; the last complete checkpoint, {last_complete}, is intact: free space or fix the folder and rerun "
            "with resume_from_checkpoint: true") if last_complete else "; no complete checkpoint was saved yet"
    return OutputDirError(f"could not write {what} to {where}: {detail}{tail}")


def is_write_failure(error: BaseException, path: str) -> bool:
    """An OSError, or a library's own error (torch.save raises RuntimeError on a full disk) while the disk is
    full or the folder not writable. Any other exception is a bug and keeps its traceback."""
    if isinstance(error, OSError):
        return True
    if not isinstance(error, Exception):
        return False
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return True
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return True
