"""`mixtune keys` lists exactly what the config schema accepts: compared with the schema itself."""

from __future__ import annotations

import dataclasses
import re

from mixtune.cli import main
from mixtune.config import MixtuneArgs, _training_fields, valid_keys
from mixtune.config_keys import ENTRY, MIXTUNE, PADDLE, TRAINING, all_keys, listing
from mixtune.data.dataset import ENTRY_KEYS
from mixtune.paddle_compat import ALIASES, NO_OP_KEYS, SCHEDULE_KEYS


def listed(text: str) -> dict[str, set[str]]:
    """Group title -> the key names printed under it (a key line is two spaces and a name)."""
    groups: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(\S.*) \(\d+\):$", line)
        if head:
            current = groups.setdefault(head.group(1), set())
        elif re.match(r"^  \S", line):
            current.add(line.split()[0])
    return groups


def test_listing_holds_every_schema_field_and_alias(capsys):
    assert main(["keys"]) == 0
    groups = listed(capsys.readouterr().out)
    assert groups[MIXTUNE] == {f.name for f in dataclasses.fields(MixtuneArgs)} | {"overwrite_output_dir"}
    assert groups[TRAINING] == set(_training_fields())
    assert groups[PADDLE] == set(ALIASES) | set(NO_OP_KEYS) | set(SCHEDULE_KEYS)
    assert groups[ENTRY] == set(ENTRY_KEYS)
    # and every key the top level accepts is listed once, in one group
    top = groups[MIXTUNE] | groups[TRAINING] | groups[PADDLE]
    assert top == valid_keys() | set(SCHEDULE_KEYS)
    assert sum(len(g) for g in (groups[MIXTUNE], groups[TRAINING], groups[PADDLE])) == len(top)


def test_types_defaults_and_meanings_come_from_the_schema():
    rows = {(r.group, r.key): r for r in all_keys()}
    for f in dataclasses.fields(MixtuneArgs):
        row = rows[(MIXTUNE, f.name)]
        assert row.help == " ".join(f.metadata["help"].split())  # every mixtune key has a meaning
        if f.default is not dataclasses.MISSING:
            assert row.default == repr(f.default)
    assert rows[(MIXTUNE, "max_length")].type == "int"
    assert rows[(MIXTUNE, "freeze_include")].type == "list[str] | None"
    # mixtune's own default for a TrainingArguments field is shown beside transformers'
    assert rows[(TRAINING, "report_to")].default.startswith("'none' (mixtune's")
    assert "fixed by mixtune" in rows[(TRAINING, "remove_unused_columns")].default
    assert rows[(TRAINING, "learning_rate")].default == repr(_training_fields()["learning_rate"].default)
    # each alias names the key it maps to, and that key is one the schema accepts
    for alias, (target, _) in ALIASES.items():
        assert rows[(PADDLE, alias)].type == f"-> {target}" and target in valid_keys()


def test_listed_aliases_really_map_as_described():
    """The listing's claim for one alias and one no-op key, checked against the translation itself."""
    from mixtune.config_keys import paddle_keys

    text = {r.key: r.help for r in paddle_keys()}
    assert "flash_attention_2" in text["use_flash_attention"] and "no effect" not in text["use_flash_attention"]
    notes: list[str] = []
    from mixtune.paddle_compat import translate_keys

    out = translate_keys({"use_flash_attention": True, "unified_checkpoint": True}, notes)
    assert out == {"attn_implementation": "flash_attention_2"}
    assert any("unified_checkpoint" in n and "no effect" in n for n in notes)


def test_search_filters_by_name_or_meaning(capsys):
    text, shown = listing("lora")
    names = {line.split()[0] for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")}
    expected = {r.key for r in all_keys() if r.matches("lora")}
    assert names == expected and shown == len(expected)
    assert {"lora", "lora_rank", "use_dora", "quantization"} <= names  # quantization: "...under LoRA adapters"
    assert "learning_rate" not in names
    assert main(["keys", "--search", "no-such-word-xyz"]) == 1
    assert "no config key matches" in capsys.readouterr().out


def test_train_help_points_to_keys(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "mixtune keys" in out and "mixtune init" in out
