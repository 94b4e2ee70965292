"""What every reader owes a bad record (test helper): one DataError naming its index, line and field by
default; under `on_bad_sample: skip` the record is dropped and counted, its neighbours kept."""

from __future__ import annotations

import pytest

from mixtune.data.badsamples import BadSamples
from mixtune.errors import DataError


def assert_named_or_counted(read, entry, field: str, reason: str, index: int = 1, line: int = 2, kept: int = 2):
    with pytest.raises(DataError) as e:
        read(entry, BadSamples())
    assert (e.value.index, e.value.line, e.value.field) == (index, line, field) and reason in e.value.reason
    bad = BadSamples("skip")
    assert len(read(entry, bad)) == kept
    assert [(r["index"], r["field"]) for r in bad.records] == [(index, field)]
