"""Fault injection for the crash tests: stop a training run at its Nth write into output_dir.

Counted events, all under output_dir: an open for writing, a rename or replace, a delete, a mkdir, an rmtree
(through Python's audit hooks, raised *before* the operation), and every torch.save / safetensors save_file
(the file is written, then cut to half its size: a kill in the middle of writing it). At the chosen event the
process dies with os._exit(9), as kill -9 would leave it (no finally blocks, no atexit), or, in-process,
`Killed` is raised (a BaseException, which no save code catches).

As a script: python tests/crashkit.py KILL_AT EVENTS_FILE OUTPUT_DIR -- <mixtune arguments>
KILL_AT 0 only counts; EVENTS_FILE receives one JSON line per event seen (kind, path).
"""

from __future__ import annotations

import json
import os
import sys


class Killed(BaseException):
    pass


STATE = {"root": None, "kill_at": 0, "mode": "exit", "events": []}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def under_root(path) -> bool:
    root = STATE["root"]
    if root is None or not isinstance(path, (str, bytes, os.PathLike)):
        return False
    path = os.fsdecode(path)
    return os.path.abspath(path).startswith(root + os.sep) or os.path.abspath(path) == root


def event(kind: str, path, after=None) -> None:
    STATE["events"].append((kind, os.fsdecode(path)))
    if STATE["kill_at"] and len(STATE["events"]) == STATE["kill_at"]:
        if after is not None:
            after()
        if STATE["mode"] == "exit":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(9)
        STATE["kill_at"] = 0
        raise Killed(f"killed at event {len(STATE['events'])}: {kind} {path}")


def audit_hook(name: str, args) -> None:
    if STATE["root"] is None:
        return
    if name == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (mode is None and flags & WRITE_FLAGS)
        if writing and under_root(path):
            event("open-write", path)
    elif name in ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.link"):
        if under_root(args[0]):
            event(name, args[0])


def half_written(path: str):
    def cut() -> None:
        if os.path.isfile(path):
            os.truncate(path, os.path.getsize(path) // 2)
    return cut


def wrap_saver(original):
    def save(obj, path, *args, **kwargs):
        result = original(obj, path, *args, **kwargs)
        if isinstance(path, (str, os.PathLike)) and under_root(path):
            event(f"{original.__module__}.{original.__name__}", path, after=half_written(os.fspath(path)))
        return result
    save.__wrapped__ = original
    return save


_installed = False


def install() -> None:
    """Hook the audit events and every module's reference to torch.save and safetensors' save_file, once."""
    global _installed
    if _installed:
        return
    import safetensors.torch
    import torch

    import mixtune.train.trainer  # noqa: F401  (imports transformers' trainer and modeling code)
    import peft.peft_model  # noqa: F401

    sys.addaudithook(audit_hook)
    originals = {id(torch.save): wrap_saver(torch.save),
                 id(safetensors.torch.save_file): wrap_saver(safetensors.torch.save_file)}
    for module in list(sys.modules.values()):
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in originals and callable(value):
                setattr(module, attr, originals[id(value)])
    _installed = True


def arm(output_dir: str, kill_at: int, mode: str = "exit") -> None:
    install()
    STATE.update(root=os.path.abspath(output_dir), kill_at=kill_at, mode=mode, events=[])


def disarm() -> list:
    events, STATE["root"], STATE["kill_at"] = STATE["events"], None, 0
    return events


if __name__ == "__main__":
    kill_at, events_file, output_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    argv = sys.argv[sys.argv.index("--") + 1:]
    import atexit

    from mixtune.cli import main

    arm(output_dir, kill_at, "exit")

    def dump() -> None:
        with open(events_file, "w") as f:
            for kind, path in STATE["events"]:
                f.write(json.dumps({"kind": kind, "path": os.path.relpath(path, output_dir)}) + "\n")
    atexit.register(dump)
    sys.exit(main(argv))
