"""Older conversation shapes that other toolkits' data still uses, read into turns.

- ms-swift query / response:  {"system"?, "query": q, "response": a, "history": [[q1, a1], ...]}
- ms-swift pairs:             {"system"?, "conversation": [{"human": q1, "assistant": a1}, ...]}
- Alpaca (LLaMA-Factory, ms-swift): {"system"?, "instruction": q, "input"?: more, "output": a, "history"?}
- Qwen-VL inline images:      "Picture 1: <img>a.jpg</img>\\nWhat is it?" (the tag becomes `<image>`)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from mixtune.data.conversation import IMAGE_PLACEHOLDER, Turn
from mixtune.errors import DataError

LEGACY_KEYS = frozenset({"query", "response", "history", "conversation", "instruction", "input", "output"})
IMG_TAG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def legacy_turns(record: dict, where: dict) -> list[Turn] | None:
    """Turns of a record in one of the legacy shapes, or None when it is in none of them."""
    if "query" in record or "response" in record:
        return pairs(record.get("history") or [], "history", where) + pair(
            [record.get("query"), record.get("response")], "query/response", where)
    if "instruction" in record or "output" in record:
        query = record.get("instruction")
        if isinstance(query, str) and isinstance(record.get("input"), str) and record["input"]:
            query = f"{query}\n{record['input']}"
        return pairs(record.get("history") or [], "history", where) + pair(
            [query, record.get("output")], "instruction/output", where)
    if "conversation" in record:
        items = record["conversation"]
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise DataError("'conversation' must be a list of {\"human\": ..., \"assistant\": ...} pairs",
                            field="conversation", **where)
        return pairs([[i.get("human"), i.get("assistant")] for i in items], "conversation", where)
    return None


def pairs(items: Any, name: str, where: dict) -> list[Turn]:
    if not isinstance(items, list):
        raise DataError(f"'{name}' must be a list of [question, answer] pairs", field=name, **where)
    return [turn for i, item in enumerate(items) for turn in pair(item, f"{name}[{i}]", where)]


def pair(item: Any, name: str, where: dict) -> list[Turn]:
    if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(p, str) for p in item)):
        raise DataError(f"{name} must be a question and an answer, both strings; got {str(item)[:80]}",
                        field=name.split("[")[0].split("/")[0], **where)
    return [Turn("user", item[0]), Turn("assistant", item[1])]


def inline_image_tags(turns: list[Turn]) -> tuple[list[Turn], list[str]]:
    """Qwen-VL's `<img>path</img>` tags -> `<image>` placeholders, and the paths in order."""
    refs: list[str] = []

    def take(match) -> str:
        refs.append(match.group(1).strip())
        return IMAGE_PLACEHOLDER

    out = [dataclasses.replace(t, text=IMG_TAG.sub(take, t.text)) if isinstance(t.text, str) else t for t in turns]
    return out, refs
