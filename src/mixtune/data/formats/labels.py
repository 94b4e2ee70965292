"""Labelled images for the classification task (mixtune/tasks/classification.py).

`imagefolder`: a folder of class folders (torchvision's ImageFolder layout): `root/<class>/<image>`.
`image_label`: a JSON list or JSONL of {"image": path, "label": class name or index}.
`hf_label`: a `datasets` folder (save_to_disk) or parquet / arrow / JSON file with an image and a label column
(`columns` maps "image" / "label" to other names); a ClassLabel column gives its class names.
These readers give `LabelSample`s, not Conversations: a chat or contrastive run refuses them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mixtune.data.formats import expand_data_files, image_base, iter_json_records, register
from mixtune.data.formats.records import note_unknown_keys
from mixtune.data.images import resolve_image_ref
from mixtune.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LABEL_KEYS = frozenset({"id", "image", "label"})


@dataclass
class LabelSample:
    image: str  # absolute path or data: URI
    label: str | int  # a class name, or an index into the model's classes
    file: str | None = None
    index: int | None = None
    line: int | None = None


@register("imagefolder", folders=True)
def read_image_folder(entry, bad) -> list[LabelSample]:
    out = []
    for root in expand_data_files(entry.data_files, entry.base_dir):
        if not os.path.isdir(root):
            raise DataError("imagefolder data_files must be folders of class folders", file=root)
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise DataError("no class folders in it (expected <root>/<class>/<image>)", file=root)
        for label in classes:
            for name in sorted(os.listdir(os.path.join(root, label))):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    out.append(LabelSample(os.path.join(root, label, name), label, file=root, index=len(out)))
    return out


@register("image_label")
def read_image_labels(entry, bad) -> list[LabelSample]:
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        base = image_base(entry, path)
        for index, line, record in iter_json_records(path, bad, entry.max_sample_bytes):
            where = dict(file=path, index=index, line=line)
            with bad.catch():
                if not isinstance(record, dict):
                    raise DataError(f"sample must be a JSON object, got {type(record).__name__}", **where)
                note_unknown_keys(record, LABEL_KEYS, where, bad)
                out.append(label_sample(record.get("image"), record.get("label"), base, where))
    return out


@register("hf_label", folders=True)
def read_hf_labels(entry, bad) -> list[LabelSample]:
    from mixtune.data.formats.hf import image_refs, open_dataset, require_columns

    columns = {"image": "image", "label": "label", **(entry.columns or {})}
    if set(columns) != {"image", "label"}:
        raise ConfigError(f"hf_label maps only 'image' and 'label' to columns, got {sorted(entry.columns)}",
                          key="columns")
    out = []
    for path in expand_data_files(entry.data_files, entry.base_dir):
        ds = open_dataset(path)
        require_columns(ds, columns.values(), path)
        names = getattr(ds.features[columns["label"]], "names", None)  # a ClassLabel column
        base, index = image_base(entry, path), 0
        selected = ds.with_format("arrow").select_columns([columns["image"], columns["label"]])
        for batch in selected.iter(batch_size=1000):
            for row in batch.to_pylist():
                where = dict(file=path, index=index, line=None)
                with bad.catch():
                    refs = image_refs(row[columns["image"]], path, index, columns["image"], where)
                    if len(refs) != 1:
                        raise DataError(f"a labelled sample needs one image, got {len(refs)}", field="image", **where)
                    label = row[columns["label"]]
                    if names and isinstance(label, int) and 0 <= label < len(names):
                        label = names[label]
                    out.append(label_sample(refs[0], label, base, where))
                index += 1
    return out


def label_sample(image, label, base: str, where: dict) -> LabelSample:
    if image is None:
        raise DataError("missing field 'image'", field="image", **where)
    if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
        raise DataError(f"'label' must be a class name or index, got {label!r}", field="label", **where)
    if isinstance(label, int) and label < 0:
        raise DataError(f"'label' index must be >= 0, got {label}", field="label", **where)
    try:
        ref = resolve_image_ref(image, base)
    except ValueError as e:
        raise DataError(str(e), field="image", **where) from None
    return LabelSample(ref, label, **where)


read_image_folder.task = read_image_labels.task = read_hf_labels.task = "classification"
