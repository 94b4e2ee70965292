"""The README's config reference must name every key the code accepts as mixtune's own."""

import dataclasses
import os

from mixtune.config import ALIASES, NO_OP_KEYS, MixtuneArgs

README = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()


def test_readme_documents_every_mixtune_key_and_alias():
    keys = [f.name for f in dataclasses.fields(MixtuneArgs)] + list(ALIASES) + list(NO_OP_KEYS)
    missing = [k for k in keys if f"`{k}`" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_readme_gives_the_two_setup_commands():
    assert "make demo" in README and "make test" in README


def test_readme_names_the_first_hour_commands_and_throughput_figures():
    from mixtune.train.throughput import METRIC_KEYS

    for text in ("mixtune doctor", "mixtune init --family", "mixtune keys", *(f"`{k}`" for k in METRIC_KEYS)):
        assert text in README, text
