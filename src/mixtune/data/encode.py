"""Conversation + images -> Encoded: token ids, labels on assistant tokens only, and pixel inputs.

The generic path renders with a chat template, tokenises once with the checkpoint's processor (which
expands image placeholders into image tokens), and maps each assistant reply's character span in the
rendered text onto tokens through the processor's offsets. So labels cover exactly the assistant tokens
(its reply and end-of-turn marker) and never prompt or image tokens, whatever the template looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mixtune.data.conversation import Conversation
from mixtune.data.templates import Renderer, to_messages
from mixtune.media.audio import Audio, processor_audio_inputs
from mixtune.media.video import Video, processor_video_inputs

IGNORE_INDEX = -100
_TEXT_ONLY_KEYS = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets"}
_MEDIA_KEYS = {"feature_attention_mask"}  # (1, audio frames): media even when a sample has as many tokens


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX outside assistant tokens
    token_fields: dict[str, torch.Tensor] = field(default_factory=dict)  # other (L,) per-token inputs
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel inputs, batched along dim 0
    source: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def assistant_spans(messages: list[dict], render: Renderer, where: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the [start, end) character span of each assistant reply in it that is
    trained on (`messages` are `where`'s turns; a turn with loss: false carries no labels)."""
    full = render(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or where.turns[i].loss is False:
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not upto.startswith(prefix) or not full.startswith(upto):
            raise where.error("the chat template does not render a conversation as a prefix of its extension, "
                              "so assistant tokens cannot be located; use a template that does")
        end = len(upto.rstrip())  # trailing newlines after the end-of-turn marker are not the reply
        spans.append((len(prefix), end))
    return full, spans


def _shift_spans(spans, replacements) -> list[tuple[int, int]]:
    """Map character spans of the rendered text onto the processor's placeholder-expanded text."""
    out = []
    for start, end in spans:
        shift = 0
        for r in replacements:
            (old_start, old_end), (new_start, new_end) = r["span"], r["new_span"]
            if old_end <= start:
                shift += (new_end - new_start) - (old_end - old_start)
        out.append((start + shift, end + shift))
    return out


def add_special_tokens(processor, text: str) -> bool:
    """transformers' own rule: let the tokenizer add BOS unless the rendered template already starts with it."""
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token", None)
    return not (bos and text.startswith(bos))


def labels_from_offsets(input_ids: torch.Tensor, offsets: torch.Tensor, spans, conv: Conversation) -> torch.Tensor:
    """Labels = input ids of tokens whose first character lies in an assistant span, else IGNORE_INDEX."""
    starts = offsets[:, 0]
    nonempty = offsets[:, 1] > offsets[:, 0]
    is_assistant = torch.zeros_like(input_ids, dtype=torch.bool)
    for start, end in spans:
        is_assistant |= (starts >= start) & (starts < end) & nonempty
    if not is_assistant.any():
        raise conv.error("no assistant tokens survived tokenisation")
    return torch.where(is_assistant, input_ids, torch.full_like(input_ids, IGNORE_INDEX))


def split_fields(out, length: int) -> tuple[dict, dict]:
    """Processor outputs beyond input_ids: per-token (1, L) tensors vs. media (batched along dim 0)."""
    token_fields, media = {}, {}
    for key, value in out.items():
        if key in _TEXT_ONLY_KEYS or key == "labels" or not isinstance(value, torch.Tensor):
            continue
        if value.dim() == 2 and value.shape == (1, length) and key not in _MEDIA_KEYS:
            token_fields[key] = value[0]
        else:
            media[key] = value
    return token_fields, media


def media_inputs(processor, media: list) -> dict:
    """The processor's media arguments: images, then decoded videos (`Video`s) and audio clips (`Audio`s)."""
    images = [m for m in media if not isinstance(m, (Video, Audio))]
    return {**({"images": images} if images else {}),
            **processor_video_inputs(processor, [m for m in media if isinstance(m, Video)]),
            **processor_audio_inputs(processor, [m for m in media if isinstance(m, Audio)])}


def encode_with_processor(conv: Conversation, images: list, processor, render: Renderer) -> Encoded:
    messages = to_messages(conv)
    full, spans = assistant_spans(messages, render, conv)
    out = processor(text=[full], **media_inputs(processor, images), return_offsets_mapping=True,
                    return_text_replacement_offsets=True, add_special_tokens=add_special_tokens(processor, full),
                    return_tensors="pt")
    input_ids = out["input_ids"][0]
    spans = _shift_spans(spans, out.get("text_replacement_offsets", [[]])[0])
    labels = labels_from_offsets(input_ids, out["offset_mapping"][0], spans, conv)
    token_fields, media = split_fields(out, input_ids.shape[0])
    return Encoded(input_ids=input_ids, labels=labels, token_fields=token_fields, media=media,
                   source=conv.source_id)


def generation_inputs(conv: Conversation, images: list, processor, render: Renderer) -> dict:
    """Model inputs for answering the conversation's last user turn (drops a trailing assistant turn)."""
    messages = to_messages(conv)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    text = render(messages, True)
    return dict(processor(text=[text], **media_inputs(processor, images),
                          add_special_tokens=add_special_tokens(processor, text), return_tensors="pt"))
