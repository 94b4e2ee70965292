"""`mixtune chat`: replies stream piece by piece, follow the conversation (multi-turn, images by path), and
equal the batched engine's greedy answers to the same conversation; bad input is reported and the chat goes on."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from PIL import Image

from mixtune.data.conversation import Conversation, Turn
from mixtune.infer.chat import run_chat
from mixtune.infer.engine import Engine, GenerationOptions


class CountingOut(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, s):
        self.writes += 1
        return super().write(s)


def test_chat_multi_turn_with_images(tiny_model_dir, tmp_path):
    engine = Engine.load(tiny_model_dir("qwen2_vl"))
    options = GenerationOptions(max_new_tokens=8)
    red = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(red)
    stdin = io.StringIO(f"/image {red}\nWhat colour is it?\nAnd the shape?\n/image {tmp_path}/missing.png\n"
                        "/reset\nHi\n/exit\nnever read\n")
    out = CountingOut()
    replies = run_chat(engine, options, stdin=stdin, stdout=out)
    assert len(replies) == 3
    image = [Image.open(red).convert("RGB")]
    first = Conversation(turns=[Turn("user", "<image>What colour is it?")], images=[str(red)])
    second = Conversation(turns=first.turns + [Turn("assistant", replies[0]), Turn("user", "And the shape?")],
                          images=[str(red)])
    fresh = Conversation(turns=[Turn("user", "Hi")])
    expected = [engine.answer([c], [imgs], options)[0].text.strip()
                for c, imgs in ((first, image), (second, image), (fresh, []))]
    assert replies == expected
    text = out.getvalue()
    assert "error:" in text and "missing.png" in text  # reported, and the chat went on
    assert out.writes > 3 * 3  # each reply arrived in several pieces


def test_chat_cli_reads_stdin(tiny_model_dir):
    model = tiny_model_dir("qwen2_vl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "mixtune", "chat", "--model", model, "--max_new_tokens", "5"],
                         input="hello there\n", capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    engine = Engine.load(model)
    expected = engine.answer([Conversation(turns=[Turn("user", "hello there")])], [[]],
                             GenerationOptions(max_new_tokens=5))[0].text.strip()
    assert f"assistant> {expected}" in run.stdout
