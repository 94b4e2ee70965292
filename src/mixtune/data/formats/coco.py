"""`coco_caption` and `coco_vqa` / `vqa`: captioning and question answering, one sample per caption or question.

coco_caption accepts
  - a COCO captions annotation file: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]};
  - Karpathy's dataset_coco.json: {"images": [{"filepath", "filename", "sentences": [{"raw"}]}]};
  - a list (JSON or JSONL) of {"image", "caption"}, `caption` a string or a list of strings.
coco_vqa accepts
  - VQAv2: a questions file {"data_subtype", "questions": [{"image_id", "question", "question_id"}]} and an
    annotations file {"annotations": [{"question_id", "multiple_choice_answer", "answers"}]}, both listed in
    `data_files`; the target is the most common answer; images are `COCO_<data_subtype>_<id:012d>.jpg`
    under `image_root` (a question with its own "image" uses that);
  - a list (JSON or JSONL) of {"image", "question", "answer"}, `answer` a string or a list (most common wins).
The user turn is `<image>` + the entry's `prompt` (captions; default below) or the prompt with `{question}`
filled in (VQA; default "{question}").
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from mixtune.data.conversation import IMAGE_PLACEHOLDER, Conversation, Turn
from mixtune.data.formats import expand_data_files, image_base, iter_json_records, load_json_file, register
from mixtune.data.formats.records import note_unknown_keys
from mixtune.data.images import resolve_image_ref
from mixtune.errors import ConfigError, DataError

CAPTION_PROMPT = "Describe the image briefly."
VQA_PROMPT = "{question}"
# keys of the list / JSONL shapes (others are reported, formats/records.py)
CAPTION_KEYS = frozenset({"id", "image_id", "image", "caption", "captions"})
VQA_KEYS = frozenset({"id", "image_id", "question_id", "image", "question", "answer", "answers"})


@register("coco_caption")
def read_coco_caption(entry, bad) -> list[Conversation]:
    prompt = entry.prompt if entry.prompt is not None else CAPTION_PROMPT
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        for image, caption, where in caption_records(path, bad, entry.max_sample_bytes):
            with bad.catch():
                out.append(caption_conversation(image, caption, prompt, base, where))
    return out


def caption_records(path: str, bad, max_bytes: int):
    """(image, caption, where) for each caption, whatever the file's shape."""
    if path.endswith(".jsonl"):
        data = None
    else:
        data = load_json_file(path)
    if isinstance(data, dict) and "annotations" in data:  # COCO captions
        files = {}
        for img in data.get("images", []):
            if isinstance(img, dict) and "id" in img and "file_name" in img:
                files[img["id"]] = img["file_name"]
        for index, ann in enumerate(data["annotations"]):
            where = dict(file=path, index=index, line=None)
            if not isinstance(ann, dict) or "image_id" not in ann:
                bad.add(DataError("missing field 'image_id'", field="image_id", **where))
                continue
            image = files.get(ann["image_id"])
            if image is None:
                bad.add(DataError(f"image_id {ann['image_id']} is not in the file's 'images' list",
                                  field="image_id", **where))
                continue
            yield image, ann.get("caption"), where
        return
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_coco.json
        index = 0
        for img in data["images"]:
            image = os.path.join(img.get("filepath", ""), img.get("filename", "")) if isinstance(img, dict) else None
            for sentence in (img.get("sentences") or [None]) if isinstance(img, dict) else [None]:
                caption = sentence.get("raw") if isinstance(sentence, dict) else None
                yield image or None, caption, dict(file=path, index=index, line=None)
                index += 1
        return
    for index, line, record in iter_json_records(path, bad, max_bytes):
        where = dict(file=path, index=index, line=line)
        if not isinstance(record, dict):
            bad.add(DataError(f"sample must be a JSON object, got {type(record).__name__}", **where))
            continue
        note_unknown_keys(record, CAPTION_KEYS, where, bad)
        captions = record.get("caption", record.get("captions"))
        for caption in captions if isinstance(captions, list) else [captions]:
            yield record.get("image"), caption, where


def caption_conversation(image: Any, caption: Any, prompt: str, base: str, where: dict) -> Conversation:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError("missing field: 'caption' must be a non-empty string", field="caption", **where)
    return Conversation(turns=[Turn("user", IMAGE_PLACEHOLDER + prompt), Turn("assistant", caption.strip())],
                        images=[image_ref(image, base, where)], **where)


def image_ref(image: Any, base: str, where: dict) -> str:
    if image is None:
        raise DataError("missing field 'image'", field="image", **where)
    try:
        return resolve_image_ref(image, base)
    except ValueError as e:
        raise DataError(str(e), field="image", **where) from None


@register("coco_vqa", "vqa")
def read_vqa(entry, bad) -> list[Conversation]:
    prompt = entry.prompt if entry.prompt is not None else VQA_PROMPT
    if "{question}" not in prompt:
        raise ConfigError("a VQA prompt must contain '{question}'", key="prompt")
    questions, answers, out = [], {}, []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        data = None if path.endswith(".jsonl") else load_json_file(path)
        if isinstance(data, dict) and "questions" in data:
            questions.append((path, data))
        elif isinstance(data, dict) and "annotations" in data:
            for ann in data["annotations"]:
                if isinstance(ann, dict) and "question_id" in ann:
                    answers[ann["question_id"]] = ann
        else:
            base = image_base(entry, path)
            for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
                where = dict(file=path, index=index, line=line)
                note_unknown_keys(record, VQA_KEYS, where, bad)
                with bad.catch():
                    if not isinstance(record, dict):
                        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
                    out.append(vqa_conversation(record.get("image"), record.get("question"),
                                                record.get("answer", record.get("answers")), prompt, base, where))
    for path, data in questions:  # VQAv2 pairs questions with annotations by question_id
        base = image_base(entry, path)
        subtype = data.get("data_subtype")
        for index, q in enumerate(data["questions"]):
            where = dict(file=path, index=index, line=None)
            with bad.catch():
                if not isinstance(q, dict) or "question_id" not in q:
                    raise DataError("missing field 'question_id'", field="question_id", **where)
                ann = answers.get(q["question_id"])
                if ann is None:
                    raise DataError(f"no annotation for question_id {q['question_id']} in the annotation "
                                    "files of data_files", field="answer", **where)
                image = q.get("image") or vqav2_image(q, subtype, where)
                answer = ann.get("multiple_choice_answer") or ann.get("answers")
                out.append(vqa_conversation(image, q.get("question"), answer, prompt, base, where,
                                            human_answers=ann.get("answers")))
    return out


def vqav2_image(q: dict, subtype: str | None, where: dict) -> str:
    if "image_id" not in q:
        raise DataError("missing field 'image_id'", field="image_id", **where)
    if not subtype:
        raise DataError("the questions file has no 'data_subtype' (e.g. train2014) to build COCO image names; "
                        "give each question an 'image'", field="image", **where)
    return f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"


def most_common_answer(answer: Any) -> str | None:
    if isinstance(answer, list):
        texts = [a.get("answer") if isinstance(a, dict) else a for a in answer]
        texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
        # ties go to the earliest answer, so the choice is stable
        return Counter(texts).most_common(1)[0][0] if texts else None
    return answer.strip() if isinstance(answer, str) and answer.strip() else None


def vqa_conversation(image: Any, question: Any, answer: Any, prompt: str, base: str, where: dict,
                     human_answers: Any = None) -> Conversation:
    if not isinstance(question, str) or not question.strip():
        raise DataError("missing field: 'question' must be a non-empty string", field="question", **where)
    target = most_common_answer(answer)
    if target is None:
        raise DataError("missing field: 'answer' must be a non-empty string or list of answers", field="answer",
                        **where)
    text = prompt.replace("{question}", question.strip())
    images = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(images, list):
        raise DataError("must be a path or a list of paths", field="image", **where)
    if images and IMAGE_PLACEHOLDER not in text:
        text = IMAGE_PLACEHOLDER * len(images) + text
    answers = all_answers(answer if human_answers is None else human_answers)
    return Conversation(turns=[Turn("user", text), Turn("assistant", target)],
                        images=[image_ref(i, base, where) for i in images], answers=answers, **where)


def all_answers(answer: Any) -> list[str]:
    texts = [a.get("answer") if isinstance(a, dict) else a for a in answer] if isinstance(answer, list) else []
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]
