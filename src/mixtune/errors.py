"""User-facing errors: the CLI prints these as one clear message instead of a traceback.

Internal bugs stay ordinary exceptions so their tracebacks still show.
"""

from __future__ import annotations

import re


class MixtuneError(Exception):
    """An error caused by the user's config, data or checkpoint, with a message that says how to fix it."""

    def __init__(self, *args):
        super().__init__(*(from_loader_worker(a) if isinstance(a, str) else a for a in args))


_WORKER = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def from_loader_worker(message: str) -> str:
    """The original message of an error raised in a DataLoader worker. torch re-raises it in the main process
    as `type(error)(text)`, where the text is a header and the worker's whole traceback; the user should see
    the one line the error was written to be, as without workers."""
    head = _WORKER.match(message)
    if head is None:
        return message
    # the traceback ends with "package.module.ErrorName: the message" (which may span lines)
    last = None
    for last in re.finditer(rf"\n(?:[\w.]+\.)?{head.group(1)}: ", message):
        pass
    return message[last.end():].rstrip("\n") if last else message


class ConfigError(MixtuneError):
    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}': {message}" if key else message)


class NotSupportedYet(ConfigError):
    def __init__(self, key: str, what: str):
        super().__init__(f"{what} is not supported yet by mixtune; remove the key or set it to its default",
                         key=key)


class DataError(MixtuneError):
    """A bad sample or data file. Carries where it came from so a user can find it."""

    def __init__(self, reason: str, file: str | None = None, index: int | None = None,
                 line: int | None = None, field: str | None = None):
        reason = from_loader_worker(reason)
        self.reason, self.file, self.index, self.line, self.field = reason, file, index, line, field
        super().__init__(f"{self.where()}: {reason}" if self.where() else reason)

    def where(self) -> str:
        parts = []
        if self.file:
            parts.append(str(self.file))
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.index is not None:
            parts.append(f"sample {self.index}")
        if self.field:
            parts.append(f"field '{self.field}'")
        return ", ".join(parts)


class OutputDirError(MixtuneError):
    """output_dir cannot be used: another run holds it, it is not writable, or a save into it failed."""
