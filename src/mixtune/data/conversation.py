"""The one normalised sample type that every dataset format converts to.

Everything after this point knows nothing of data formats. Images are referenced, not loaded:
decoding happens lazily in the data-loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mixtune.errors import DataError

IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
AUDIO_PLACEHOLDER = "<audio>"
ROLES = ("system", "user", "assistant")
# ms-swift's grounding placeholders, filled from `Conversation.objects` (data/grounding.py)
REF_PLACEHOLDER = "<ref-object>"
BOX_PLACEHOLDER = "<bbox>"


def media_not_supported(kind: str, family: str | None = None) -> str:
    return f"{kind} inputs are not supported by family {family}" if family else f"{kind} inputs are not supported yet"


@dataclass
class Turn:
    role: str  # one of ROLES
    text: str  # may hold IMAGE_PLACEHOLDER where an image goes
    # ms-swift's per-turn "loss": False excludes an assistant reply from the labels; None is the default
    # (assistant replies carry labels, other turns never do)
    loss: bool | None = None


@dataclass
class Objects:
    """ms-swift's grounding field: each REF_PLACEHOLDER takes the next ref, each BOX_PLACEHOLDER the next box."""
    refs: list[str]
    boxes: list[list[float]]  # [x1, y1, x2, y2] or a point [x, y]
    bbox_type: str = "real"  # "real": pixels of the image file; "norm1": fractions 0-1 of its size
    image_ids: list[int] = field(default_factory=list)  # the image each box is in (default 0)


@dataclass
class Conversation:
    turns: list[Turn]
    images: list[str] = field(default_factory=list)  # absolute paths or data: URIs, in placeholder order
    # each a video file or frame folder (absolute path) or a list of frame image paths, in `<video>` order
    videos: list = field(default_factory=list)
    audios: list[str] = field(default_factory=list)  # absolute paths or data: URIs, in `<audio>` order
    objects: Objects | None = None
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
            self._check_loss(i, turn)
        body = self.turns[1:] if self.turns[0].role == "system" else self.turns
        for i, turn in enumerate(body):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise self.error(f"broken role order: turn {i} is '{turn.role}', expected '{expected}' "
                                 "(after an optional system turn, user and assistant alternate)", "role")
        if not any(t.role == "assistant" for t in body):
            raise self.error("conversation has no assistant turn to train on")
        if not any(t.role == "assistant" and t.loss is not False for t in body):
            raise self.error("every assistant turn has loss: false; nothing is left to train on", "loss")
        self._check_grounding()
        # last kind first, so that media without placeholders end up as images, videos, then audio
        self._match_placeholders(AUDIO_PLACEHOLDER, self.audios, "audio", "audios")
        self._match_placeholders(VIDEO_PLACEHOLDER, self.videos, "video", "videos")
        self._match_placeholders(IMAGE_PLACEHOLDER, self.images, "image", "image")
        return self

    def _match_placeholders(self, placeholder: str, media: list, kind: str, field: str) -> None:
        n_placeholders = sum(t.text.count(placeholder) for t in self.turns)
        if n_placeholders != len(media):
            if n_placeholders == 0 and media:
                # Convention shared with LLaVA and PaddleMIX: media without placeholders go before the
                # first user text.
                first_user = next(t for t in self.turns if t.role == "user")
                first_user.text = placeholder * len(media) + first_user.text
            else:
                raise self.error(f"{n_placeholders} '{placeholder}' placeholder(s) but {len(media)} {kind}(s)", field)

    def _check_loss(self, i: int, turn: Turn) -> None:
        if turn.loss is not None and not isinstance(turn.loss, bool):
            raise self.error(f"turn {i}: 'loss' must be true, false or absent, got {turn.loss!r}", "loss")
        if turn.loss is True and turn.role != "assistant":
            raise self.error(f"turn {i} is '{turn.role}' with loss: true (or weight: 1); only assistant replies are "
                             "trained on (remove the key, or make the turn an assistant reply)", "loss")

    def _check_grounding(self) -> None:
        """Every grounding placeholder has its object and every object its placeholder: nothing left as
        literal text, nothing dropped."""
        objects = self.objects or Objects([], [])
        for placeholder, values, name in ((REF_PLACEHOLDER, objects.refs, "ref"),
                                          (BOX_PLACEHOLDER, objects.boxes, "bbox")):
            count = sum(t.text.count(placeholder) for t in self.turns)
            if count != len(values):
                given = f"{len(values)} in objects.{name}" if self.objects else "no 'objects' field"
                raise self.error(f"{count} '{placeholder}' placeholder(s) but {given}", "objects")
        for k, image_id in enumerate(objects.image_ids):
            if image_id >= len(self.images):
                raise self.error(f"objects.image_id[{k}] is {image_id} but the sample has {len(self.images)} "
                                 "image(s)", "objects")
        if objects.boxes and objects.bbox_type == "real" and not self.images:
            raise self.error("objects.bbox in pixels ('bbox_type': 'real') needs an image to measure them "
                             "against; the sample has none", "objects")
