"""GRPO's reward functions, named in the config's `reward_funcs`:

  exact_match       1 where the completion equals the sample's reference answer (case and surrounding
                    whitespace / final full stop ignored), else 0
  format            1 where the completion matches a regex (Python `re.fullmatch`, DOTALL): `format` alone uses
                    FORMAT_DEFAULT (a <think>...</think><answer>...</answer> reply); `format:<regex>` gives one
  boxed_accuracy    1 where the last \\boxed{...} in the completion equals the reference answer, else 0
  pkg.mod:fn        a user's function, imported: TRL's reward signature
                    `fn(prompts, completions, **columns) -> list[float | None]`, `answer` among the columns

The reference answer is the sample's last assistant turn (any chat dataset reads as GRPO prompts).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from mixtune.errors import ConfigError

FORMAT_DEFAULT = r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*"
NEEDS_ANSWER = ("exact_match", "boxed_accuracy")


def completion_text(completion) -> str:
    """TRL passes a conversational completion as [{"role": "assistant", "content": ...}], a plain one as text."""
    if isinstance(completion, list):
        content = completion[-1]["content"] if completion else ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content
    return completion


def normalise(text: str | None) -> str:
    return (text or "").strip().rstrip(".").strip().lower()


def exact_match(prompts, completions, answer, **_) -> list[float]:
    return [float(normalise(completion_text(c)) == normalise(a)) for c, a in zip(completions, answer)]


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...}, braces inside it balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def boxed_accuracy(prompts, completions, answer, **_) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        boxed = last_boxed(completion_text(c))
        out.append(float(boxed is not None and normalise(boxed) == normalise(a)))
    return out


def format_reward(pattern: str) -> Callable:
    try:
        regex = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"format regex {pattern!r} does not compile: {e}", key="reward_funcs") from None

    def format_check(prompts, completions, **_) -> list[float]:
        return [float(regex.fullmatch(completion_text(c)) is not None) for c in completions]
    format_check.__name__ = "format"
    return format_check


def import_reward(path: str, key: str) -> Callable:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import reward function '{path}': {e}", key=key) from None
    if not callable(fn):
        raise ConfigError(f"'{path}' is not a function", key=key)
    return fn


def reward_functions(names: list[str]) -> list[Callable]:
    if not names:
        raise ConfigError("grpo needs at least one reward: exact_match, format, format:<regex>, boxed_accuracy or "
                          "'pkg.module:function'", key="reward_funcs")
    out = []
    for i, name in enumerate(names):
        key = f"reward_funcs[{i}]"
        head, _, arg = name.partition(":")
        if name == "exact_match":
            out.append(exact_match)
        elif name == "boxed_accuracy":
            out.append(boxed_accuracy)
        elif head == "format":
            out.append(format_reward(arg or FORMAT_DEFAULT))
        elif arg and "." in head or (arg and head.isidentifier()):
            out.append(import_reward(name, key))
        else:
            raise ConfigError(f"unknown reward '{name}': built-ins are exact_match, format, format:<regex>, "
                              "boxed_accuracy; a function of your own is 'pkg.module:function'", key=key)
    return out
