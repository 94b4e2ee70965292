"""Batched generation: conversations (+ images) -> replies, one `generate()` call per batch.

Each conversation becomes a batch of one through the family's own `generation_inputs` (`prompting.py`);
a batch left-pads those rows (so every row's reply starts at the same position) and joins their pixel
inputs the way training's collator does. Predict, generation eval, chat and the server all call this.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from mixtune.data.collate import concat_media
from mixtune.data.conversation import Conversation
from mixtune.errors import MixtuneError
from mixtune.prompting import Prompter

# Per-token processor outputs, (1, L, ...): left-padded with 0 (masked) beside input_ids. Everything else is
# a pixel input, joined along dim 0 by the family's collate_media (as in training).
TOKEN_KEYS = ("attention_mask", "token_type_ids", "mm_token_type_ids", "cross_attention_mask")
NOT_INPUTS = ("labels",)  # PaliGemma's processor returns prompt-only labels; generate() must not see them


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def check(self) -> "GenerationOptions":
        if self.max_new_tokens < 1:
            raise MixtuneError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MixtuneError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MixtuneError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams < 1:
            raise MixtuneError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.repetition_penalty <= 0:
            raise MixtuneError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        return self

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                      repetition_penalty=self.repetition_penalty)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.stop:
            kwargs.update(stop_strings=list(self.stop), tokenizer=tokenizer)
        return kwargs


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": an end-of-sequence token or a stop string; "length": max_new_tokens reached
    token_ids: list[int] = field(default_factory=list)


def left_pad(rows: list[torch.Tensor], value) -> torch.Tensor:
    """(1, L_i, ...) tensors -> (len(rows), max L, ...), each row right-aligned."""
    length = max(r.shape[1] for r in rows)
    out = rows[0].new_full((len(rows), length, *rows[0].shape[2:]), value)
    for i, row in enumerate(rows):
        out[i, length - row.shape[1]:] = row[0]
    return out


def batch_inputs(rows: list[dict], pad_token_id: int, collate_media: Callable | None = None) -> dict:
    """Per-conversation generate() inputs (batches of one) -> one left-padded batch."""
    keys = [k for k in rows[0] if k not in NOT_INPUTS]
    batch = {"input_ids": left_pad([r["input_ids"] for r in rows], pad_token_id)}
    for key in keys:
        if key in TOKEN_KEYS:
            batch[key] = left_pad([r[key] for r in rows], 0)
    media = [{k: v for k, v in r.items() if k in keys and k != "input_ids" and k not in TOKEN_KEYS
              and isinstance(v, torch.Tensor)} for r in rows]
    if any(media):
        batch.update((collate_media or concat_media)(media))
    return batch


def stop_at(text: str, stops) -> tuple[str, bool]:
    """Text cut before the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class Engine:
    """A loaded model with its processor and prompter; `generate` answers a batch of conversations."""

    def __init__(self, model, family, processor, prompter: Prompter | None = None, name: str = "model",
                 chat_template: str | None = None):
        self.model = model.eval()
        self.family = family
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat_template = chat_template  # a template file given instead of the checkpoint's own
        self.prompter = prompter or Prompter.for_family(family, processor, chat_template)
        self.name = name
        self.lock = threading.Lock()  # one generate() at a time on the model
        # True where the model's parameters are sharded across processes (ZeRO-3, FSDP, tensor parallel): every
        # process then keeps stepping until all have finished, since each forward gathers from every process
        self.synced_gpus: bool | None = None
        pad = self.tokenizer.pad_token_id
        eos = model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.pad_token_id = pad if pad is not None else next(iter(self.eos_ids), 0)

    @classmethod
    def load(cls, model_path: str | None, lora_path: str | None = None, dtype: str = "auto",
             device: str | None = None, chat_template: str | None = None) -> "Engine":
        from mixtune.models.loading import load_model_and_processor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = resolve_dtype(dtype, device)
        family, model, processor = load_model_and_processor(model_path, dtype=torch_dtype, lora_path=lora_path,
                                                            merge_lora=True)
        model.to(device)
        return cls(model, family, processor, name=model_path or lora_path, chat_template=chat_template)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_length(self) -> int | None:
        config = self.model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return getattr(text, "max_position_embeddings", None)

    def inputs(self, conv: Conversation, images: list) -> dict:
        return self.prompter.inputs(conv, images)

    def batch(self, rows: list[dict]) -> dict:
        """Rows -> one left-padded batch on the model's device, pixels in the model's dtype."""
        batch = {k: v.to(self.device) for k, v in
                 batch_inputs(rows, self.pad_token_id, self.family.collate_media).items()}
        if torch.is_floating_point(batch.get("pixel_values", torch.zeros(0, dtype=torch.long))):
            batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        return batch

    @torch.no_grad()
    def generate(self, rows: list[dict], options: GenerationOptions,
                 on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Answer prepared rows (from `inputs`) in one batch. `on_token(row, token_id)` sees each new token."""
        batch = self.batch(rows)
        kwargs = options.generate_kwargs(self.tokenizer)
        if on_token is not None:
            kwargs["streamer"] = RowStreamer(on_token)
        with self.lock:
            if options.seed is not None:
                torch.manual_seed(options.seed)
            if self.synced_gpus is not None:
                kwargs["synced_gpus"] = self.synced_gpus
            out = self.model.generate(**batch, **kwargs, pad_token_id=self.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        prompt_lengths = [int(r["input_ids"].shape[1]) for r in rows]
        return [self.finish(ids, n, options) for ids, n in zip(new, prompt_lengths)]

    def finish(self, ids: list[int], prompt_tokens: int, options: GenerationOptions) -> Generation:
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        reply = ids if end is None else ids[:end]
        text = self.decode(reply)
        text, stopped = stop_at(text, options.stop)
        finish = "stop" if end is not None or stopped else "length"
        count = len(reply) + (end is not None)  # the end-of-sequence token is generated too
        return Generation(text=text, prompt_tokens=prompt_tokens, completion_tokens=count, finish_reason=finish,
                          token_ids=reply)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def answer(self, convs: list[Conversation], images: list[list], options: GenerationOptions) -> list[Generation]:
        return self.generate([self.inputs(c, i) for c, i in zip(convs, images)], options)

    def stream(self, conv: Conversation, images: list, options: GenerationOptions) -> Iterator[str]:
        """Text pieces as they are generated (transformers' TextIteratorStreamer; a batch of one)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        batch = self.batch([self.inputs(conv, images)])
        kwargs = {**options.generate_kwargs(self.tokenizer), "streamer": streamer, "pad_token_id": self.pad_token_id}
        errors: list[BaseException] = []

        def run():
            try:
                with self.lock, torch.no_grad():
                    if options.seed is not None:
                        torch.manual_seed(options.seed)
                    self.model.generate(**batch, **kwargs)
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]


class RowStreamer:
    """A generate() streamer for batches: passes each row's new token to `on_token(row, token_id)`.
    (transformers' text streamers take a batch of one.)"""

    def __init__(self, on_token: Callable[[int, int], None]):
        self.on_token = on_token
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.on_token(row, token)

    def end(self) -> None:
        pass


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    choices = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if dtype not in choices:
        raise MixtuneError(f"dtype must be one of {['auto', *choices]}, got '{dtype}'")
    return choices[dtype]


