"""`llava`: LLaVA-Instruct JSON (llava_instruct_150k, llava_v1_5_mix665k).

[{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
  "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                    {"from": "gpt", "value": "The bus is white and red."}]}]
`image` may be missing (text-only samples) or a list (multi-image); paths are relative to `image_root`
(LLaVA's `--image_folder`), else to the data file's folder.
"""

from __future__ import annotations

from mixtune.data.conversation import Conversation
from mixtune.data.formats import expand_data_files, image_base, iter_json_records, register
from mixtune.data.formats.sharegpt import conversation_from_record


@register("llava")
def read_llava(entry, bad) -> list[Conversation]:
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        for index, line, record in iter_json_records(path, bad):
            with bad.catch():
                out.append(conversation_from_record(record, base, dict(file=path, index=index, line=line),
                                                    turn_keys=("conversations",)))
    return out
