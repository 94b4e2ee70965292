"""Rendering a Conversation to prompt text: the checkpoint's chat template, a user Jinja template, or
PaddleMIX's `chat_template.json` ({"system", "conversation": [user_tpl, bot_tpl], "query"}).

A renderer is `render(messages, add_generation_prompt) -> str` over transformers-style messages whose
content is a list of parts ({"type": "image"} / {"type": "text", "text": ...}). Every template, the user's
included, renders through transformers' `apply_chat_template` (jinja2's ImmutableSandboxedEnvironment); a
PaddleMIX chat_template.json is first translated into one Jinja chat template, which is also what is saved
with the trained model (`training_chat_template`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2.exceptions import SecurityError

from mixtune.data.conversation import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Conversation
from mixtune.errors import ConfigError

log = logging.getLogger("mixtune")

Renderer = Callable[[list[dict], bool], str]
_MEDIA_PARTS = {IMAGE_PLACEHOLDER: "image", VIDEO_PLACEHOLDER: "video", AUDIO_PLACEHOLDER: "audio"}
_MEDIA_SPLIT = re.compile("(" + "|".join(map(re.escape, _MEDIA_PARTS)) + ")")


def to_messages(conv: Conversation) -> list[dict]:
    """Conversation -> messages with content parts, splitting text at each `<image>`, `<video>` and `<audio>`."""
    messages = []
    for turn in conv.turns:
        parts: list[dict] = []
        for piece in _MEDIA_SPLIT.split(turn.text):
            if piece in _MEDIA_PARTS:
                parts.append({"type": _MEDIA_PARTS[piece]})
            elif piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": parts})
    return messages


def message_text(message: dict, image_text: str) -> str:
    return "".join(image_text if p["type"] == "image" else p["text"] for p in message["content"])


def make_renderer(processor, chat_template: str | None, image_placeholder: str,
                  default_template: str | None = None) -> ChatTemplate:
    """Pick the renderer: a user template file if given, else the checkpoint's own chat template, else the
    family's default prompt format (for checkpoints that ship none)."""
    if chat_template:
        render = ChatTemplate(processor, read_template_file(chat_template, image_placeholder), chat_template)
        render.probe()
        return render
    own = getattr(processor, "chat_template", None)
    if not own:
        if default_template:
            return ChatTemplate(processor, default_template, "the family's default prompt format")
        raise ConfigError("the checkpoint has no chat template; give one with the dataset entry's "
                          "'chat_template' (a Jinja file, or PaddleMIX's chat_template.json)", key="chat_template")
    return ChatTemplate(processor, own if isinstance(own, str) else None, "the checkpoint's chat template")


def read_template_file(path: str, image_placeholder: str) -> str:
    """A template file as Jinja text: a `.jinja` file, transformers' chat_template.json, or PaddleMIX's
    chat_template.json translated (paddle_to_jinja)."""
    if not os.path.exists(path):
        raise ConfigError(f"chat template file not found: {path}", key="chat_template")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".json"):
        return text
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} line {e.lineno}: malformed JSON: {e.msg}", key="chat_template") from None
    if isinstance(spec, dict) and "conversation" in spec:
        return paddle_to_jinja(spec, image_placeholder, path)
    if isinstance(spec, dict) and isinstance(spec.get("chat_template"), str):  # transformers' chat_template.json
        return spec["chat_template"]
    raise ConfigError(f"{path}: expected PaddleMIX's {{'system', 'conversation', 'query'}} or "
                      "transformers' {'chat_template': ...}", key="chat_template")


@dataclass
class ChatTemplate:
    """A renderer: `render(messages, add_generation_prompt) -> str` through transformers' own
    `apply_chat_template`, i.e. in jinja2's ImmutableSandboxedEnvironment. A plain object (not a closure), so
    datasets holding it pickle for data-loader workers started with `spawn`."""
    processor: Any
    template: str | None  # Jinja text; None: the processor's own (when it is not a single string)
    source: str  # where it came from, for messages

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.processor.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except SecurityError as e:
            raise ConfigError(f"{self.source}: the template tried an unsafe operation and was stopped by the "
                              f"sandbox ({e})", key="chat_template") from None

    def probe(self) -> None:
        """Render a small conversation once, in the main process, so that an unsafe template is refused when
        it is read rather than inside a data-loader worker. Other template errors are left to the samples
        that cause them."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]
        for msgs, generation in ((messages, False), (messages[:1], True)):
            try:
                self(msgs, generation)
            except ConfigError:
                raise
            except Exception:  # noqa: BLE001 (a template may refuse this probe; real samples decide)
                return


def paddle_to_jinja(spec: dict, image_placeholder: str, path: str) -> str:
    """PaddleMIX's {"system", "conversation": [user_tpl, bot_tpl], "query"} as one Jinja chat template.

    The rule (PaddleNLP's): the system text (a system turn, else `system`), then each user turn through
    `conversation[0]` and each reply through `conversation[1]`, except that the last user turn goes through
    `query` when a reply is to be generated. The sub-templates keep their variables: `user` / `query` (the
    user text), `bot` (the reply) and `index` (the turn number). Images are written as the model's own image
    markup. Training renders with this template and it is saved with the model, so both prompt alike."""
    conv = spec["conversation"]
    if not (isinstance(conv, list) and len(conv) == 2 and all(isinstance(t, str) for t in conv)):
        raise ConfigError(f"{path}: 'conversation' must be [user_template, bot_template]", key="chat_template")
    system, query = spec.get("system", ""), spec.get("query", conv[0])
    if not (isinstance(system, str) and isinstance(query, str)):
        raise ConfigError(f"{path}: 'system' and 'query' must be strings", key="chat_template")
    user_tpl, bot_tpl = conv
    # `+%}` / `{%+` keep the sub-templates' leading newlines and trailing spaces, which transformers'
    # trim_blocks / lstrip_blocks would otherwise remove next to our own tags
    return (
        "{% set ns = namespace(index=0) %}"
        "{% macro text(message) %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
        f"{{% elif part['type'] == 'image' %}}{{{{ {json.dumps(image_placeholder)} }}}}{{% endif %}}{{% endfor %}}"
        "{% endif %}{% endmacro %}"
        "{% if messages and messages[0]['role'] == 'system' %}{{ text(messages[0]) }}"
        "{% set turns = messages[1:] %}"
        f"{{% else %}}{{{{ {json.dumps(system)} }}}}{{% set turns = messages %}}{{% endif %}}"
        "{% for message in turns %}{% set index = ns.index %}"
        "{% if message['role'] == 'user' %}{% set user = text(message) %}{% set query = user %}"
        "{% if loop.last and add_generation_prompt +%}" + query + "{%+ else +%}" + user_tpl + "{%+ endif %}"
        "{% else %}{% set bot = text(message) +%}" + bot_tpl + "{%+ set ns.index = ns.index + 1 %}"
        "{% endif %}{% endfor %}"
    )


def training_chat_template(parts: list) -> str | None:
    """The chat template to save with the model: the one training rendered with. With several different
    templates in one run the first entry's is saved, and the others are named in a warning."""
    used = [(p.name, p.render) for p in parts if getattr(p, "render", None) is not None and p.render.template]
    if not used:
        return None
    first_name, first = used[0]
    others = [name for name, render in used if render.template != first.template]
    if others:
        log.warning("dataset entries were rendered with different chat templates; the model is saved with %s's "
                    "(%s), so prompts for %s will not look like their training data", first_name, first.source,
                    ", ".join(dict.fromkeys(others)))
    return first.template


def save_with_model(processor, template: str) -> None:
    """Make `template` the one `save_pretrained` writes (processor and tokenizer both)."""
    processor.chat_template = template
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer is not processor:
        tokenizer.chat_template = template
