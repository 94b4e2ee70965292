"""`llava`: LLaVA-Instruct JSON (llava_instruct_150k, llava_v1_5_mix665k).

[{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                    {"from": "gpt", "value": "The bus is white and red."}]}]
`image` may be missing (text-only samples) or a list (multi-image); paths are relative to `image_root`
(LLaVA's `--image_folder`), else to the data file's folder. `model` (in the ShareGPT part of
llava_v1_5_mix665k) names the chatbot that wrote the text: nothing to train on.
"""

from __future__ import annotations

from functools import partial

from mixtune.data.conversation import Conversation
from mixtune.data.formats import read_json_samples, register
from mixtune.data.formats.records import COMMON_KEYS
from mixtune.data.formats.sharegpt import conversation_from_record

KNOWN_KEYS = COMMON_KEYS | {"conversations", "image", "images", "model"}


@register("llava")
def read_llava(entry, bad) -> list[Conversation]:
    return read_json_samples(entry, bad, partial(conversation_from_record, turn_keys=("conversations",)),
                             KNOWN_KEYS)
