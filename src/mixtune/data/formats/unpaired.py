"""`unpaired` (alias `kto`): single replies marked desirable or not, for `task: kto`.

Shapes, told apart per record:
  LLaMA-Factory (kto_tag): {"conversations" | "messages": [prompt turns..., the assistant's reply],
                            "label" | "kto_tag": true | false, "images": [...]}
  ms-swift:                {"messages": [prompt turns..., {"role": "assistant", "content": reply}],
                            "label": true | false, "images": [...]}
  TRL's unpaired:          {"prompt": "text" | [messages], "completion": "text" | [assistant message],
                            "label": true | false, "images": [...]}
  a preference pair:       any record `name: preference` reads (data/formats/preference.py) gives two samples,
                           its chosen reply desirable and its rejected one undesirable.
A record without a reply, with an empty one, with a label that is not true / false, or with images that do not
match the prompt's `<image>` placeholders is a bad sample naming file, index and field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixtune.data.conversation import Conversation
from mixtune.data.formats import read_json_samples, register
from mixtune.data.formats.preference import (PREFERENCE_KEYS, REPLY_KEYS, PreferencePair, preference_pair,
                                             prompt_messages, reply_text)
from mixtune.data.formats.sharegpt import conversation_from_record
from mixtune.errors import DataError
from mixtune.prompting import check_prompt, prompt_part

LABEL_KEYS = ("label", "kto_tag")  # TRL and ms-swift say `label`; LLaMA-Factory's dataset_info maps `kto_tag`
UNPAIRED_KEYS = PREFERENCE_KEYS | {"completion", *LABEL_KEYS}


@dataclass
class UnpairedSample:
    prompt: Conversation  # ends on the user turn the reply answers
    completion: str
    label: bool  # True: desirable

    @property
    def source_id(self) -> str:
        return self.prompt.source_id

    def conversation(self) -> Conversation:
        """The prompt answered by the reply: what the model is scored on (labels on the reply only)."""
        return PreferencePair(self.prompt, self.completion, "").conversation(self.completion)


@register("unpaired", "kto")
def read_unpaired(entry, bad) -> list[UnpairedSample]:
    return [s for group in read_json_samples(entry, bad, unpaired_samples, UNPAIRED_KEYS) for s in group]


read_unpaired.task = "unpaired"  # tasks/samples.py: these records serve kto, not chat SFT


def from_pairs(pairs: list[PreferencePair]) -> list[UnpairedSample]:
    return [UnpairedSample(p.prompt, reply, label) for p in pairs for reply, label in ((p.chosen, True),
                                                                                          (p.rejected, False))]


def unpaired_samples(record: Any, base: str, where: dict) -> list[UnpairedSample]:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    if any(k in record for k in REPLY_KEYS):
        if any(k in record for k in LABEL_KEYS):
            raise DataError("a record is either a pair (chosen / rejected) or one labelled reply, not both",
                            field=next(k for k in LABEL_KEYS if k in record), **where)
        return from_pairs([preference_pair(record, base, where)])
    key = next((k for k in LABEL_KEYS if k in record), None)
    if key is None:
        raise DataError("missing the label: give 'label' (or LLaMA-Factory's 'kto_tag'): true for a desirable "
                        "reply, false for an undesirable one", field="label", **where)
    label = record[key]
    if not isinstance(label, bool):
        raise DataError(f"'{key}' must be true or false, got {label!r}", field=key, **where)
    prompt_record = {k: v for k, v in record.items() if k not in ("prompt", "completion", *LABEL_KEYS)}
    if "prompt" in record:
        prompt_record["messages"] = prompt_messages(record["prompt"], "prompt", where)
    conv = conversation_from_record(prompt_record, base, where)
    if "completion" in record:
        completion, field = reply_text(record["completion"], "completion", where), "completion"
    elif conv.turns and conv.turns[-1].role == "assistant":  # LLaMA-Factory / ms-swift: the last turn is the reply
        completion, field = conv.turns[-1].text, "messages"
    else:
        raise DataError("missing the reply: give 'completion' (or end the messages on the assistant's reply)",
                        field="completion", **where)
    if not completion.strip():
        raise DataError("the reply is empty", field=field, **where)
    prompt = conv if field == "completion" else prompt_part(conv)
    return [UnpairedSample(check_prompt(prompt), completion, label)]
