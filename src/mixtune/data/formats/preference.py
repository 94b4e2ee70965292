"""`preference`: pairs of a preferred (`chosen`) and a dispreferred (`rejected`) reply to one prompt, for `task: dpo`.

Three shapes, told apart per record:
  LLaMA-Factory:  {"conversations" | "messages": [prompt turns, ending on the user's],
                   "chosen": {"from": "gpt", "value": ...} | "text", "rejected": ..., "images": [...]}
                  (its Alpaca shape too: {"instruction", "input", "chosen", "rejected"})
  ms-swift:       {"messages": [prompt turns..., {"role": "assistant", "content": chosen}],
                   "rejected_response": "text", "images": [...]}
  messages:       {"prompt": "text" | [messages], "chosen": "text" | [assistant message],
                   "rejected": same, "images": [...]}   (TRL's conversational preference shape)
A record without a chosen or a rejected reply, with the two identical, or with images that do not match
the prompt's `<image>` placeholders is a bad sample naming file, index and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtune.data.conversation import Conversation
from mixtune.data.formats import read_json_samples, register
from mixtune.data.formats.records import CONVERSATION_KEYS
from mixtune.data.formats.sharegpt import content_text, conversation_from_record
from mixtune.errors import DataError
from mixtune.prompting import check_prompt, prompt_part

REPLY_KEYS = ("chosen", "rejected", "rejected_response")
PREFERENCE_KEYS = CONVERSATION_KEYS | set(REPLY_KEYS) | {"prompt", "instruction", "input"}


@dataclass
class PreferencePair:
    prompt: Conversation  # ends on the user turn the replies answer; its images in placeholder order
    chosen: str
    rejected: str

    @property
    def source_id(self) -> str:
        return self.prompt.source_id

    def conversation(self, reply: str) -> Conversation:
        """The prompt answered by `reply`: what the model is scored on (labels on the reply only)."""
        from mixtune.data.conversation import Turn

        p = self.prompt
        return Conversation(turns=[*p.turns, Turn("assistant", reply)], images=p.images, videos=p.videos,
                            audios=p.audios, file=p.file, index=p.index, line=p.line)


@register("preference", "dpo")
def read_preference(entry, bad) -> list[PreferencePair]:
    return read_json_samples(entry, bad, preference_pair, PREFERENCE_KEYS)


read_preference.task = "preference"  # tasks/samples.py: these records serve dpo, not chat SFT


def preference_pair(record: Any, base: str, where: dict) -> PreferencePair:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    prompt_record = {k: v for k, v in record.items() if k not in REPLY_KEYS and k not in ("prompt", "instruction",
                                                                                          "input")}
    if "prompt" in record:
        prompt_record["messages"] = prompt_messages(record["prompt"], "prompt", where)
    elif "instruction" in record:  # LLaMA-Factory's Alpaca shape
        text = "\n".join(str(record[k]) for k in ("instruction", "input") if record.get(k))
        prompt_record["messages"] = [{"role": "user", "content": text}]
    conv = conversation_from_record(prompt_record, base, where)
    if "chosen" in record:
        chosen = reply_text(record["chosen"], "chosen", where)
    elif conv.turns and conv.turns[-1].role == "assistant":  # ms-swift: the last reply is the chosen one
        chosen = conv.turns[-1].text
    else:
        raise DataError("missing the chosen reply: give 'chosen' (or, ms-swift's shape, end 'messages' on the "
                        "assistant's chosen reply)", field="chosen", **where)
    conv = prompt_part(conv)
    key = "rejected" if "rejected" in record else "rejected_response"
    if record.get(key) is None:
        raise DataError("missing the rejected reply: give 'rejected' (or ms-swift's 'rejected_response')",
                        field="rejected", **where)
    rejected = reply_text(record[key], key, where)
    for name, text in (("chosen", chosen), (key, rejected)):
        if not text.strip():
            raise DataError(f"the {name} reply is empty", field=name, **where)
    if chosen.strip() == rejected.strip():
        raise DataError("the chosen and rejected replies are identical: the pair prefers nothing", field=key, **where)
    return PreferencePair(check_prompt(conv), chosen, rejected)


def prompt_messages(prompt: Any, key: str, where: dict) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list):
        return prompt
    raise DataError(f"'{key}' must be a string or a list of messages", field=key, **where)


def reply_text(value: Any, key: str, where: dict) -> str:
    """A reply given as text, as one turn ({"from", "value"} / {"role", "content"}) or as a list holding one
    assistant message (TRL's conversational shape)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f"'{key}' must hold one assistant message, got {len(value)}", field=key, **where)
        value = value[0]
    if isinstance(value, dict):
        role = value.get("role", value.get("from"))
        if role not in (None, "assistant", "gpt"):
            raise DataError(f"'{key}' must be an assistant reply, got role '{role}'", field=key, **where)
        value = value.get("content", value.get("value"))
        if isinstance(value, list):
            value = content_text(value, [], key, where)
    if not isinstance(value, str):
        raise DataError(f"'{key}' must be a reply text, got {type(value).__name__}", field=key, **where)
    return value
