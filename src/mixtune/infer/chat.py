"""`mixtune chat`: a terminal conversation with a model, replies streamed as they are generated.

Each line is a user turn. `/image PATH [PATH ...]` attaches images to the next turn (they go in front of its
text, as in training data without `<image>` placeholders), `/reset` starts over, `/exit` (or end of input)
quits. The conversation is rendered by `prompting.py`, the way the model was trained.
"""

from __future__ import annotations

import sys
from typing import TextIO

from mixtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, Turn
from mixtune.data.images import load_image
from mixtune.errors import MixtuneError
from mixtune.infer.engine import Engine, GenerationOptions

HELP = "type a message; /image PATH [PATH ...] attaches images to your next message; /reset; /exit"


class ChatSession:
    def __init__(self, engine: Engine, options: GenerationOptions, system: str | None = None):
        self.engine, self.options, self.system = engine, options, system
        self.reset()

    def reset(self) -> None:
        self.turns: list[Turn] = [Turn("system", self.system)] if self.system else []
        self.image_refs: list[str] = []
        self.images: list = []
        self.attached: list[str] = []

    def attach(self, paths: list[str]) -> None:
        for path in paths:
            load_image(path)  # a clear error now rather than at the next message
        self.attached += paths

    def reply(self, text: str, out: TextIO):
        """Stream the reply to `text` to `out`; the turn and its reply join the history."""
        user = Turn("user", IMAGE_PLACEHOLDER * len(self.attached) + text)
        refs = self.image_refs + self.attached
        images = self.images + [load_image(p) for p in self.attached]
        conv = Conversation(turns=self.turns + [user], images=refs)
        inputs_length = self.engine.inputs(conv, images)["input_ids"].shape[1]
        limit = self.engine.max_length
        if limit and inputs_length + self.options.max_new_tokens > limit:
            raise MixtuneError(f"the conversation has {inputs_length} tokens, too long for the model's {limit}; "
                               "/reset to start over")
        pieces = []
        for piece in self.engine.stream(conv, images, self.options):
            piece = piece if pieces else piece.lstrip()  # the reply starts at its first visible character
            if not piece:
                continue
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        answer = "".join(pieces).strip()
        self.turns += [user, Turn("assistant", answer)]
        self.image_refs, self.images, self.attached = refs, images, []
        return answer


def run_chat(engine: Engine, options: GenerationOptions, system: str | None = None, images: list[str] | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> list[str]:
    """The interactive loop; returns the replies (for tests)."""
    session = ChatSession(engine, options, system)
    interactive = stdin.isatty()
    stdout.write(f"mixtune chat with {engine.name} ({HELP})\n")
    if images:
        session.attach(images)
    replies = []
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        try:
            if not line:
                continue
            if line in ("/exit", "/quit"):
                break
            if line == "/reset":
                session.reset()
                stdout.write("(conversation cleared)\n")
            elif line.startswith("/image"):
                session.attach(line.split()[1:])
                stdout.write(f"({len(session.attached)} image(s) attached to your next message)\n")
            elif line.startswith("/"):
                stdout.write(f"unknown command; {HELP}\n")
            else:
                stdout.write("assistant> ")
                replies.append(session.reply(line, stdout))
        except MixtuneError as e:
            stdout.write(f"error: {e}\n")
    return replies
