"""Rendering a Conversation to prompt text: the checkpoint's chat template, a user Jinja template, or
PaddleMIX's `chat_template.json` ({"system", "conversation": [user_tpl, bot_tpl], "query"}).

A renderer is `render(messages, add_generation_prompt) -> str` over transformers-style messages whose
content is a list of parts ({"type": "image"} / {"type": "text", "text": ...}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jinja2

from mixtune.data.conversation import IMAGE_PLACEHOLDER, Conversation
from mixtune.errors import ConfigError

Renderer = Callable[[list[dict], bool], str]


def to_messages(conv: Conversation) -> list[dict]:
    """Conversation -> messages with content parts, splitting text at each `<image>`."""
    messages = []
    for turn in conv.turns:
        parts: list[dict] = []
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": parts})
    return messages


def message_text(message: dict, image_text: str) -> str:
    return "".join(image_text if p["type"] == "image" else p["text"] for p in message["content"])


def make_renderer(processor, chat_template: str | None, image_placeholder: str,
                  default_template: str | None = None) -> Renderer:
    """Pick the renderer: a user template file if given, else the checkpoint's own chat template, else the
    family's default prompt format (for checkpoints that ship none)."""
    if chat_template:
        if not os.path.exists(chat_template):
            raise ConfigError(f"chat template file not found: {chat_template}", key="chat_template")
        with open(chat_template, encoding="utf-8") as f:
            text = f.read()
        if chat_template.endswith(".json"):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{chat_template} line {e.lineno}: malformed JSON: {e.msg}",
                                  key="chat_template") from None
            if isinstance(spec, dict) and "conversation" in spec:
                return paddle_renderer(spec, image_placeholder, chat_template)
            if isinstance(spec, dict) and "chat_template" in spec:  # transformers' chat_template.json
                return jinja_renderer(processor, spec["chat_template"])
            raise ConfigError(f"{chat_template}: expected PaddleMIX's {{'system', 'conversation', 'query'}} or "
                              "transformers' {'chat_template': ...}", key="chat_template")
        return jinja_renderer(processor, text)
    if not getattr(processor, "chat_template", None):
        if default_template:
            return jinja_renderer(processor, default_template)
        raise ConfigError("the checkpoint has no chat template; give one with the dataset entry's "
                          "'chat_template' (a Jinja file, or PaddleMIX's chat_template.json)", key="chat_template")
    return jinja_renderer(processor, None)


def jinja_renderer(processor, template: str | None) -> Renderer:
    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return processor.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    return render


def paddle_renderer(spec: dict, image_placeholder: str, path: str) -> Renderer:
    """PaddleNLP's rule: system + each (user, bot) pair through `conversation` + the last user turn
    through `query` when a reply is to be generated."""
    env = jinja2.Environment(keep_trailing_newline=True)
    conv = spec["conversation"]
    if not (isinstance(conv, list) and len(conv) == 2):
        raise ConfigError(f"{path}: 'conversation' must be [user_template, bot_template]", key="chat_template")
    user_tpl, bot_tpl = (env.from_string(t) for t in conv)
    query_tpl = env.from_string(spec.get("query", conv[0]))
    default_system = spec.get("system", "")

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        system = default_system
        if messages and messages[0]["role"] == "system":
            system, messages = message_text(messages[0], image_placeholder), messages[1:]
        out = [system]
        index = 0
        for i, m in enumerate(messages):
            text = message_text(m, image_placeholder)
            if m["role"] == "user":
                last = i == len(messages) - 1
                out.append((query_tpl if last and add_generation_prompt else user_tpl).render(user=text, query=text,
                                                                                              index=index))
            else:
                out.append(bot_tpl.render(bot=text, index=index))
                index += 1
        return "".join(out)
    return render
