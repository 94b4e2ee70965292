"""Concurrent requests answered together: a worker thread collects what arrives within a short window,
groups requests with equal generation options, and runs one batched `generate()` per group.

Each request gets its tokens as they are generated (for streaming) through `on_text`, then its finished
`Generation`; both are delivered on the request's own asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from mixtune.infer.engine import Engine, Generation, GenerationOptions, stop_at

log = logging.getLogger("mixtune")


@dataclass
class Pending:
    inputs: dict
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # ("text", str) pieces while streaming, then ("done", Generation) or ("error", exc)
    stream: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    finished: bool = False

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Batcher:
    def __init__(self, engine: Engine, window_s: float = 0.01, max_batch_size: int = 16):
        self.engine = engine
        self.window_s = window_s
        self.max_batch_size = max_batch_size
        self.queue: queue.Queue[Pending | None] = queue.Queue()
        self.batches: list[int] = []  # size of every batch run, for logs and tests
        self.thread = threading.Thread(target=self.run, name="mixtune-batcher", daemon=True)
        self.thread.start()

    def submit(self, pending: Pending) -> None:
        self.queue.put(pending)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def collect(self) -> list[Pending] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    def run(self) -> None:
        while (batch := self.collect()) is not None:
            groups: dict[GenerationOptions, list[Pending]] = {}
            for p in batch:
                groups.setdefault(p.options, []).append(p)
            for options, group in groups.items():
                self.generate(options, group)

    def generate(self, options: GenerationOptions, group: list[Pending]) -> None:
        self.batches.append(len(group))
        on_token = (lambda row, token: self.on_token(group[row], token)) if any(p.stream for p in group) else None
        try:
            results = self.engine.generate([p.inputs for p in group], options, on_token=on_token)
        except Exception as e:  # a failed batch fails its requests, never the server
            log.exception("generation failed for a batch of %d", len(group))
            for p in group:
                p.emit("error", e)
            return
        for p, result in zip(group, results):
            if p.stream and result.text.startswith(p.sent) and len(result.text) > len(p.sent):
                p.emit("text", result.text[len(p.sent):])
            p.emit("done", result)

    def on_token(self, p: Pending, token: int) -> None:
        """Stream text as soon as it is final: a piece that could still become a stop string, or an
        incomplete multi-byte character, waits for the next token."""
        if not p.stream or p.finished:
            return
        if token in self.engine.eos_ids:
            p.finished = True
            return
        p.tokens.append(token)
        text, stopped = stop_at(self.engine.decode(p.tokens), p.options.stop)
        if stopped:
            p.finished = True
            safe = len(text)
        else:
            hold = max((len(s) - 1 for s in p.options.stop), default=0)
            safe = len(text) - hold
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > len(p.sent) and text[:len(p.sent)] == p.sent:
            p.emit("text", text[len(p.sent):safe])
            p.sent = text[:safe]


def usage_of(result: Generation) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}
