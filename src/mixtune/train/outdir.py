"""The output folder beyond its checkpoints: a fresh start for `overwrite_output_dir`, and the crash-safe final save.

The final model shares output_dir with the checkpoint-* folders, so it cannot be swapped in as one folder.
Instead it is written into the staging folder, the previous final files are deleted (marker and config first,
so a half-replaced folder never loads), the new files are moved in with the configs last, and the marker is
written when metrics and the loss curve are in place too. Until `config.json` (or `adapter_config.json`) is
in place, `from_pretrained` refuses the folder; once it is, every weight file beside it is the new one.
"""

from __future__ import annotations

import logging
import os
import re

from mixtune.train.checkpoints import (MARKER, STAGING, checkpoint_step, clear, fsync_path, fsync_tree, read_marker,
                                       staging_dir, write_marker)
from mixtune.train.lock import LOCK_NAME

log = logging.getLogger("mixtune")

CONFIG_FILES = ("config.json", "adapter_config.json")  # moved in last: without them nothing loads
# the files a final save (model, processor, state, metrics) writes, for folders saved before the marker existed
FINAL_FILE_RE = re.compile(
    r"^(config\.json|adapter_config\.json|generation_config\.json|training_args\.bin|trainer_state\.json"
    r"|metrics\.json|loss_curve\.png|(model|adapter_model|pytorch_model)[\w.-]*\.(safetensors|bin|json)"
    r"|(tokenizer|special_tokens_map|added_tokens|vocab|merges|chat_template|processor_config|preprocessor_config"
    r"|video_preprocessor_config)[\w.-]*)$")
RUN_REPORTS = ("skipped_samples.jsonl",)  # written at a run's start, so not part of its final save
RUN_FOLDERS = ("generation_eval",)  # predictions of eval_with_do_generation, written during training


def final_files(output_dir: str) -> list[str]:
    """Top-level files of the final save already in output_dir: the marker's list, plus any name a final save
    writes (an older mixtune's folder has no marker)."""
    marker = read_marker(output_dir) or {"files": {}}
    names = set(marker["files"]) | {n for n in os.listdir(output_dir) if FINAL_FILE_RE.match(n)} | {f"{MARKER}.tmp"}
    return sorted(n for n in names if os.path.isfile(os.path.join(output_dir, n)) and n not in RUN_REPORTS)


def start_fresh(output_dir: str) -> None:
    """overwrite_output_dir: delete what a previous run left (checkpoints, final model, metrics, reports,
    generation-eval predictions), so that nothing of it can be resumed or mistaken for this run's result.
    Other files stay, and are named."""
    if not os.path.isdir(output_dir):
        return
    names = set(os.listdir(output_dir))
    old = sorted(n for n in names if checkpoint_step(n) is not None or n in (STAGING, *RUN_FOLDERS))
    old += final_files(output_dir) + [n for n in (MARKER, *RUN_REPORTS) if n in names]
    if os.path.exists(os.path.join(output_dir, MARKER)):
        clear(os.path.join(output_dir, MARKER))  # first, so a kill below never leaves a folder marked complete
    for name in old:
        clear(os.path.join(output_dir, name))
    kept = sorted(names - set(old) - {LOCK_NAME})
    if old:
        log.warning("overwrite_output_dir: deleted the previous run's %s from %s", ", ".join(old), output_dir)
    if kept:
        log.info("overwrite_output_dir: left in place (not written by mixtune): %s", ", ".join(kept))


def final_staging(output_dir: str) -> str:
    path = os.path.join(staging_dir(output_dir), "final")
    clear(path)
    os.makedirs(path)
    return path


def commit_final(staged: str, output_dir: str) -> list[str]:
    """Move the fully written final save from `staged` into output_dir (see the module docstring)."""
    fsync_tree(staged)
    old = final_files(output_dir)
    for name in [MARKER] + [n for n in CONFIG_FILES if n in old] + old:
        if os.path.exists(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
        if name in CONFIG_FILES:
            fsync_path(output_dir)
    fsync_path(output_dir)
    new = sorted(os.listdir(staged), key=lambda n: n in CONFIG_FILES)
    for name in new:
        if os.path.isdir(os.path.join(output_dir, name)):  # a folder a save writes (DeepSpeed's global_step*)
            clear(os.path.join(output_dir, name))
        if name in CONFIG_FILES:
            fsync_path(output_dir)  # every weight is in place before the first config appears
        os.replace(os.path.join(staged, name), os.path.join(output_dir, name))
    fsync_path(output_dir)
    os.rmdir(staged)
    if not os.listdir(os.path.dirname(staged)):
        os.rmdir(os.path.dirname(staged))
    return new


def mark_final_complete(output_dir: str, names: list[str]) -> None:
    """Written last: the final model, metrics and loss curve are all in place."""
    files = {n: os.path.getsize(os.path.join(output_dir, n)) for n in names
             if os.path.isfile(os.path.join(output_dir, n))}
    write_marker(output_dir, "final", files)
