"""The `on_bad_sample` policy: stop at the first bad sample ("error"), or skip it and keep a record ("skip").

Over-long samples are recorded here too (they are dropped under either policy), so one report lists
everything that will not be trained on: a JSONL of skipped ids in output_dir and a summary in the log.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from mixtune.errors import ConfigError, DataError

POLICIES = ("error", "skip")
TOO_LONG = "too long for max_length"


@dataclass
class BadSamples:
    policy: str = "error"
    entry: str = ""  # which dataset entry, for the report
    records: list[dict] = field(default_factory=list)
    strict_fields: bool = False  # a record key no reader reads is an error, not a warning
    ignored_keys: Counter = field(default_factory=Counter)  # such key -> how many samples had it

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"must be one of {POLICIES}, got {self.policy!r}", key="on_bad_sample")

    def add(self, error: DataError) -> None:
        """Raise under "error"; record and carry on under "skip"."""
        if self.policy == "error":
            raise error
        self.records.append(record_of(error, self.entry))

    def drop_too_long(self, error: DataError) -> None:
        """Over-long samples are dropped whatever the policy: nothing is ever cut through."""
        self.records.append(dict(record_of(error, self.entry), kind=TOO_LONG))

    def ignore_keys(self, keys: list[str], where: dict, count: int = 1) -> None:
        """A record's keys that its reader does not read: counted for one warning per entry, or an error
        under strict_fields (whatever on_bad_sample says: it is the data's shape, not one bad sample).
        `count`: how many samples had them (a whole column of a table counts its rows)."""
        if self.strict_fields:
            raise DataError(f"unknown key(s) {keys}: mixtune does not read them (strict_fields: true); remove "
                            "them, or set strict_fields: false to train without them", field=keys[0], **where)
        self.ignored_keys.update({k: count for k in keys})

    def ignored_keys_warning(self) -> str | None:
        if not self.ignored_keys:
            return None
        keys = ", ".join(f"'{k}' ({n} sample{'s' * (n != 1)})" for k, n in sorted(self.ignored_keys.items()))
        return (f"dataset {self.entry}: record key(s) that mixtune does not read were ignored: {keys}; they are "
                "not trained on (strict_fields: true makes this an error)")

    @contextmanager
    def catch(self):
        """`with bad.catch(): ...` skips the block's sample on a DataError under "skip"."""
        try:
            yield
        except DataError as e:
            self.add(e)


def record_of(error: DataError, entry: str) -> dict:
    return {"entry": entry, "file": error.file, "index": error.index, "line": error.line, "field": error.field,
            "reason": error.reason, "kind": reason_kind(error.reason)}


def reason_kind(reason: str) -> str:
    """A reason without its particulars (paths, quoted values, numbers), to count like with like."""
    head = re.split(r"[:;]", reason, maxsplit=1)[0]
    head = re.sub(r"'[^']*'", "'…'", head)
    return re.sub(r"\d+", "N", head).strip()


def write_report(records: list[dict], output_dir: str, name: str = "skipped_samples.jsonl") -> str | None:
    if not records:
        return None
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def summary(records: list[dict], first: int = 3) -> str:
    """Counts per kind of reason, each with its first offenders by file and index."""
    if not records:
        return "no samples skipped or dropped"
    counts = Counter(r["kind"] for r in records)
    lines = [f"{len(records)} sample(s) skipped or dropped:"]
    for kind, n in counts.most_common():
        examples = [r for r in records if r["kind"] == kind][:first]
        where = "; ".join(f"{r['file']} sample {r['index']}" + (f" ({r['reason']})" if kind == TOO_LONG else "")
                          for r in examples)
        lines.append(f"  {n} x {kind}: e.g. {where}")
    return "\n".join(lines)
