"""Conversation -> generate() inputs, rendered exactly as training renders it.

Training encodes a sample through the family's chat template (`data/templates.py`) and encoder
(`data/encode.py`, or the family's own hook); everything that asks a model a question (the demo, predict,
generation eval, chat, the server) goes through `Prompter`, which uses the same renderer and the family's
`generation_inputs` hook, so a model is prompted the same way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtune.data.conversation import IMAGE_PLACEHOLDER, ROLES, Conversation, Turn
from mixtune.data.encode import generation_inputs
from mixtune.data.templates import Renderer, make_renderer, message_text, to_messages


@dataclass
class Prompter:
    family: Any
    processor: Any
    render: Renderer | None  # None where the family is not chat-templated (PaliGemma's prefix/suffix)

    @classmethod
    def for_family(cls, family, processor, chat_template: str | None = None) -> "Prompter":
        render = (make_renderer(processor, chat_template, family.image_placeholder, family.default_chat_template)
                  if family.uses_chat_template else None)
        return cls(family, processor, render)

    def inputs(self, conv: Conversation, images: list) -> dict:
        """generate() inputs (a batch of one) for the conversation's last user turn."""
        return dict((self.family.generation_inputs or generation_inputs)(conv, images, self.processor, self.render))

    def text(self, conv: Conversation) -> str:
        """The prompt as the model reads it, before image tokens are expanded (for logs and predictions)."""
        messages = to_messages(prompt_part(conv))
        if self.render is not None:
            return self.render(messages, True)
        return "\n".join(message_text(m, self.family.image_placeholder or IMAGE_PLACEHOLDER) for m in messages)


def prompt_part(conv: Conversation) -> Conversation:
    """The conversation without its trailing assistant turn (the reply to generate, or its reference)."""
    if conv.turns and conv.turns[-1].role == "assistant":
        return Conversation(turns=conv.turns[:-1], images=conv.images, videos=conv.videos, audios=conv.audios,
                            file=conv.file, index=conv.index, line=conv.line)
    return conv


def reference_of(conv: Conversation) -> str | None:
    return conv.turns[-1].text.strip() if conv.turns and conv.turns[-1].role == "assistant" else None


def check_prompt(conv: Conversation) -> Conversation:
    """A conversation to answer: an optional system turn, user and assistant alternating, ending on a user
    turn, one image per `<image>` placeholder."""
    where = conv.error
    turns = conv.turns[1:] if conv.turns and conv.turns[0].role == "system" else conv.turns
    if not turns:
        raise where("no user turn to answer")
    for i, turn in enumerate(turns):
        if turn.role not in ROLES:
            raise where(f"unknown role '{turn.role}'; expected one of {ROLES}", "role")
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            raise where(f"broken role order: turn {i} is '{turn.role}', expected '{expected}' (after an optional "
                        "system turn, user and assistant alternate, ending on a user turn)", "role")
    if turns[-1].role != "user":
        raise where("the last turn must be a user turn (the one to answer)", "role")
    n = sum(t.text.count(IMAGE_PLACEHOLDER) for t in conv.turns)
    if n != len(conv.images):
        raise where(f"{n} '{IMAGE_PLACEHOLDER}' placeholder(s) but {len(conv.images)} image(s)", "image")
    return conv


def conversation_from_turns(turns: list[tuple[str, str]], images: list[str]) -> Conversation:
    """(role, text) pairs with `<image>` where each image goes -> a checked Conversation (chat, serve)."""
    return check_prompt(Conversation(turns=[Turn(r, t) for r, t in turns], images=list(images)))
