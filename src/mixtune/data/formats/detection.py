"""Boxes with phrases, for the detection task (mixtune/tasks/detection.py). Every reader gives
`DetectionSample`s: one image, its boxes in pixels, and for each box the index of its phrase in the sample's
prompt (Grounding DINO reads the prompt as phrases split by " . ").

`coco_detection`: a COCO instances JSON (data/formats/coco_instances.py); the prompt is every category name,
  in the file's order; crowd boxes are kept for evaluation and left out of the training targets.
`odvg`: Grounding DINO's own JSONL. A detection record
  {"filename", "height", "width", "detection": {"instances": [{"bbox": [x1, y1, x2, y2], "label", "category"}]}}
  is prompted with every category of the entry (by `label` order); a grounding record
  {"filename", "height", "width", "grounding": {"caption", "regions": [{"bbox", "phrase", "tokens_positive"}]}}
  is prompted with its regions' distinct phrases (the caption itself is not the prompt: the model's phrase
  split is by " . ", so the phrases are the classes).
`refcoco`: referring expressions, a JSON list or JSONL of {"image", "bbox": [x, y, w, h],
  "sentences": ["the red circle on the left", ...]} (or "expression" / "sentence": one string; "width" and
  "height" optional); one sample per expression, prompted with the expression alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from PIL import Image

from mixtune.data.formats import expand_data_files, image_base, iter_json_records, register
from mixtune.data.formats.coco_instances import check_box, read_coco_instances
from mixtune.data.formats.records import note_unknown_keys
from mixtune.data.images import resolve_image_ref
from mixtune.errors import DataError

ODVG_KEYS = frozenset({"filename", "height", "width", "detection", "grounding", "id"})
REFCOCO_KEYS = frozenset({"id", "image", "file_name", "bbox", "sentences", "expression", "sentence", "width",
                          "height", "category_id", "ref_id", "image_id", "split"})


@dataclass
class DetectionSample:
    image: str  # absolute path or data: URI
    width: int
    height: int
    boxes: list[tuple[float, float, float, float]]  # x, y, w, h in pixels (COCO's order)
    labels: list[int]  # index of each box's phrase in `phrases`
    phrases: tuple[str, ...]  # the prompt's phrases, in order
    iscrowd: list[int] = field(default_factory=list)  # 1: a crowd box, scored as "ignore" by COCO eval only
    category_ids: tuple[int, ...] | None = None  # a COCO file's own id of each phrase (predictions keep them)
    image_id: int | None = None  # a COCO file's own image id
    file: str | None = None
    index: int | None = None
    line: int | None = None

    @property
    def prompt(self) -> str:
        return prompt_text(self.phrases)


def clean_phrase(text: str) -> str:
    """Lowercased, with Grounding DINO's phrase delimiters ("." and "?") taken out of the phrase itself."""
    return " ".join(text.replace(".", " ").replace("?", " ").lower().split())


def prompt_text(phrases) -> str:
    """Grounding DINO's prompt shape: "red circle . blue square ." """
    return " . ".join(phrases) + " ."


def image_size(path: str, where: dict) -> tuple[int, int]:
    """(width, height) from the file's header (PIL reads no pixels for this)."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}", field="image", **where) from None


def resolve(ref, base: str, where: dict, key: str) -> str:
    try:
        path = resolve_image_ref(ref, base)
    except ValueError as e:
        raise DataError(str(e), field=key, **where) from None
    if not path.startswith("data:") and not os.path.exists(path):
        raise DataError(f"image file not found: {path}", field=key, **where)
    return path


@register("coco_detection")
def read_coco_detection(entry, bad) -> list[DetectionSample]:
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        coco = read_coco_instances(path, entry.image_root, bad)
        ids = list(coco.categories)
        phrases = tuple(clean_phrase(coco.categories[i]) for i in ids)
        for i, img in enumerate(coco.images):
            anns = img.annotations
            out.append(DetectionSample(img.path, img.width, img.height, [a.bbox for a in anns],
                                       [ids.index(a.category_id) for a in anns], phrases,
                                       [a.iscrowd for a in anns], category_ids=tuple(ids), image_id=img.id,
                                       file=path, index=i))
    return out


@register("odvg")
def read_odvg(entry, bad) -> list[DetectionSample]:
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        records = []
        for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
            where = dict(file=path, index=index, line=line)
            with bad.catch():
                records.append((odvg_record(record, base, where, bad), where))
        categories = odvg_categories([r for r, _ in records if r["kind"] == "detection"])
        for rec, where in records:
            with bad.catch():
                out.append(odvg_sample(rec, categories, where))
    return out


def odvg_record(record, base: str, where: dict, bad) -> dict:
    """One ODVG line checked: its image, size and boxes (x1, y1, x2, y2) with their label or phrase."""
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    note_unknown_keys(record, ODVG_KEYS, where, bad)
    if "filename" not in record:
        raise DataError("missing 'filename'", field="filename", **where)
    image = resolve(record["filename"], base, where, "filename")
    width, height = record.get("width"), record.get("height")
    if width is None or height is None:
        width, height = image_size(image, where)
    kinds = [k for k in ("detection", "grounding") if k in record]
    if len(kinds) != 1:
        raise DataError("an ODVG record has exactly one of 'detection' or 'grounding'", field="detection", **where)
    kind = kinds[0]
    body = record[kind]
    items_key = "instances" if kind == "detection" else "regions"
    items = body.get(items_key) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise DataError(f"'{kind}' needs a list '{items_key}'", field=f"{kind}.{items_key}", **where)
    boxes, names = [], []
    for j, item in enumerate(items):
        at = f"{kind}.{items_key}[{j}]"
        if not isinstance(item, dict):
            raise DataError("must be an object", field=at, **where)
        box = item.get("bbox")
        if not (isinstance(box, list) and len(box) == 4):
            raise DataError(f"bbox must be [x1, y1, x2, y2], got {box!r}", field=f"{at}.bbox", **where)
        x1, y1, x2, y2 = box
        boxes.append(check_box([x1, y1, _minus(x2, x1), _minus(y2, y1)], width, height,
                               dict(where, field=f"{at}.bbox")))
        if kind == "detection":
            label, category = item.get("label"), item.get("category")
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise DataError(f"label must be a non-negative integer, got {label!r}", field=f"{at}.label", **where)
            if not isinstance(category, str) or not clean_phrase(category):
                raise DataError("needs its 'category' name", field=f"{at}.category", **where)
            names.append((label, clean_phrase(category)))
        else:
            phrase = item.get("phrase")
            if not isinstance(phrase, str) or not clean_phrase(phrase):
                raise DataError("needs a non-empty 'phrase'", field=f"{at}.phrase", **where)
            names.append(clean_phrase(phrase))
    return {"kind": kind, "image": image, "width": int(width), "height": int(height), "boxes": boxes,
            "names": names}


def _minus(a, b):
    return a - b if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) else None


def odvg_categories(records: list[dict]) -> dict[int, str]:
    """label -> category over the entry's detection records; one label named two ways is an error."""
    out: dict[int, str] = {}
    for rec in records:
        for label, name in rec["names"]:
            if out.setdefault(label, name) != name:
                raise DataError(f"label {label} is called both '{out[label]}' and '{name}'", field="category")
    return dict(sorted(out.items()))


def odvg_sample(rec: dict, categories: dict[int, str], where: dict) -> DetectionSample:
    if rec["kind"] == "detection":
        order = list(categories)
        phrases = tuple(categories.values())
        labels = [order.index(label) for label, _ in rec["names"]]
    else:
        phrases = tuple(dict.fromkeys(rec["names"]))
        labels = [phrases.index(name) for name in rec["names"]]
    return DetectionSample(rec["image"], rec["width"], rec["height"], rec["boxes"], labels, phrases,
                           [0] * len(labels), **where)


@register("refcoco")
def read_refcoco(entry, bad) -> list[DetectionSample]:
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
            where = dict(file=path, index=index, line=line)
            with bad.catch():
                out.extend(refcoco_samples(record, base, where, bad))
    return out


def refcoco_samples(record, base: str, where: dict, bad) -> list[DetectionSample]:
    if not isinstance(record, dict):
        raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
    note_unknown_keys(record, REFCOCO_KEYS, where, bad)
    key = "image" if "image" in record else "file_name"
    if key not in record:
        raise DataError("missing 'image'", field="image", **where)
    image = resolve(record[key], base, where, key)
    width, height = record.get("width"), record.get("height")
    if width is None or height is None:
        width, height = image_size(image, where)
    box = check_box(record.get("bbox"), width, height, dict(where, field="bbox"))
    sentences = record.get("sentences", record.get("expression", record.get("sentence")))
    sentences = [sentences] if isinstance(sentences, str) else sentences
    texts = [s.get("sent", s.get("raw")) if isinstance(s, dict) else s for s in sentences or []]
    if not texts or not all(isinstance(t, str) and clean_phrase(t) for t in texts):
        raise DataError("needs 'sentences' (a list of expressions) or an 'expression' string", field="sentences",
                        **where)
    return [DetectionSample(image, int(width), int(height), [box], [0], (clean_phrase(t),), [0], **where)
            for t in texts]


for _reader in (read_coco_detection, read_odvg, read_refcoco):
    _reader.task = "detection"
