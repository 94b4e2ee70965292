"""The one normalised sample type that every dataset format converts to.

Everything after this point knows nothing of data formats. Images are referenced, not loaded:
decoding happens lazily in the data-loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixtune.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str  # one of ROLES
    text: str  # may hold IMAGE_PLACEHOLDER where an image goes


@dataclass
class Conversation:
    turns: list[Turn]
    images: list[str] = field(default_factory=list)  # absolute paths or data: URIs, in placeholder order
    file: str | None = None
    index: int | None = None
    line: int | None = None
    # every human answer where a dataset has several (VQAv2's ten): what `mixtune predict` scores against
    answers: list[str] = field(default_factory=list)

    def error(self, reason: str, field: str | None = None) -> DataError:
        return DataError(reason, file=self.file, index=self.index, line=self.line, field=field)

    @property
    def source_id(self) -> str:
        return f"{self.file}:{self.index}"

    def validate(self) -> "Conversation":
        """Check roles, role order and that image placeholders match the images given."""
        if not self.turns:
            raise self.error("conversation has no turns")
        for i, turn in enumerate(self.turns):
            if turn.role not in ROLES:
                raise self.error(f"unknown role '{turn.role}' in turn {i}; expected one of {ROLES}", "role")
            if not isinstance(turn.text, str):
                raise self.error(f"turn {i} content must be a string, got {type(turn.text).__name__}")
        body = self.turns[1:] if self.turns[0].role == "system" else self.turns
        for i, turn in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise self.error(f"broken role order: turn {i} is '{turn.role}', expected '{expected}' "
                                 "(after an optional system turn, user and assistant alternate)", "role")
        if not any(t.role == "assistant" for t in body):
            raise self.error("conversation has no assistant turn to train on")
        n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in self.turns)
        if n_placeholders != len(self.images):
            if n_placeholders == 0 and self.images:
                # Convention shared with LLaVA and PaddleMIX: images without placeholders go before the
                # first user text.
                first_user = next(t for t in self.turns if t.role == "user")
                first_user.text = IMAGE_PLACEHOLDER * len(self.images) + first_user.text
            else:
                raise self.error(f"{n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) but "
                                 f"{len(self.images)} image(s)", "image")
        return self
