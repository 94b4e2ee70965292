"""`mixtune predict`: answer a dataset's prompts with a model and score the answers.

The dataset is any entry mixtune trains on (read by the same readers, rendered by the same template), or a
config's eval split. A sample's trailing assistant turn is its reference; samples with the same prompt and
images (COCO's several captions of one image) are asked once and scored against all their references.
Writes `predictions.jsonl` (id, prompt, prediction, references, source file and index) and, when references
exist, `metrics.json`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from mixtune.data.badsamples import BadSamples
from mixtune.data.conversation import Conversation, Turn
from mixtune.data.dataset import DatasetEntry, ImagePrep, PixelBudgetProcessor
from mixtune.data.formats import get_reader
from mixtune.errors import ConfigError, MixtuneError
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.metrics import METRICS, score
from mixtune.media.audio import audio_budget
from mixtune.prompting import Prompter, check_prompt, prompt_part, reference_of

log = logging.getLogger("mixtune")


@dataclass
class PromptItem:
    """One question to ask: the conversation up to its last user turn, and what it should be answered with."""
    conv: Conversation
    entry: DatasetEntry
    references: list[str] = field(default_factory=list)
    sources: list[tuple[str | None, int | None]] = field(default_factory=list)


def validated(conv: Conversation) -> Conversation:
    """The training checks (roles, image count; images without placeholders go in front), also for a
    sample that ends on the user turn to answer. Grounding `objects` are refused: their boxes are written into
    the text only when training encodes a sample, so here `<ref-object>` / `<bbox>` would reach the model (and
    the reference) as literal text."""
    if conv.objects is not None:
        raise conv.error("grounding 'objects' (<ref-object> / <bbox> placeholders) are filled in by training only; "
                         "predict cannot answer such a sample yet", "objects")
    if conv.turns and conv.turns[-1].role == "user":
        conv.turns.append(Turn("assistant", ""))
        conv.validate()
        conv.turns.pop()
        return check_prompt(conv)
    return conv.validate()


def read_prompts(entries: list[DatasetEntry]) -> list[PromptItem]:
    items: dict[tuple, PromptItem] = {}
    for entry in entries:
        bad = BadSamples(entry.on_bad_sample, entry=entry.label())
        convs = []
        for conv in get_reader(entry.name)(entry, bad):
            with bad.catch():
                convs.append(validated(conv))
        if entry.max_samples is not None:
            convs = convs[: entry.max_samples]
        if bad.records:
            log.warning("%s: %d bad sample(s) skipped, e.g. %s", entry.label(), len(bad.records), bad.records[0])
        for conv in convs:
            prompt = prompt_part(conv)
            key = (id(entry), tuple((t.role, t.text) for t in prompt.turns), tuple(prompt.images),
                   str(prompt.videos), tuple(prompt.audios))
            item = items.setdefault(key, PromptItem(prompt, entry))
            refs = conv.answers or ([reference_of(conv)] if reference_of(conv) else [])
            item.references += [r for r in refs if r not in item.references]
            item.sources.append((conv.file, conv.index))
    return list(items.values())


class EntryInputs:
    """generate() inputs for one entry's prompts, as training encodes that entry: its chat template, and its
    min/max_pixels applied to the images (and told to a pixel-budget processor)."""

    def __init__(self, engine: Engine, entry: DatasetEntry):
        processor = engine.processor
        if (entry.min_pixels or entry.max_pixels) and PixelBudgetProcessor.applies(processor):
            processor = PixelBudgetProcessor(processor, entry.min_pixels, entry.max_pixels)
        self.prompter = Prompter.for_family(engine.family, processor, entry.chat_template or engine.chat_template)
        self.images = ImagePrep(entry.min_pixels, entry.max_pixels, entry.video,
                                audio_budget(processor, entry.max_audio_seconds))

    def __call__(self, conv: Conversation) -> dict:
        return self.prompter.inputs(conv, [self.images.fit(img) for img in self.images.decode(conv)])


def predict(engine: Engine, items: list[PromptItem], options: GenerationOptions, output_dir: str,
            batch_size: int = 8, metrics=METRICS, progress: bool = True) -> dict:
    records = answer_items(engine, items, options, batch_size, progress=progress)
    return write_predictions(records, items, output_dir, metrics)


def answer_items(engine: Engine, items: list[PromptItem], options: GenerationOptions, batch_size: int = 8,
                 batches: list[int] | None = None, progress: bool = True, before_batch=None) -> list[dict]:
    """The prediction records of `items`, answered `batch_size` at a time; `batches` picks which of those
    batches (by number) to answer, so that several processes can share the work while every batch stays
    exactly the batch one process would form. `before_batch(error)` is called with each batch's input
    preparation outcome (None: fine) before it is generated."""
    from tqdm.auto import tqdm

    inputs_for: dict[int, EntryInputs] = {}
    records = []
    starts = list(range(0, len(items), batch_size))
    chosen = range(len(starts)) if batches is None else batches
    with tqdm(total=len(items), desc="predicting", disable=not progress) as bar:
        for number in chosen:
            start = starts[number]
            chunk = items[start: start + batch_size]
            rows, error = [], None
            try:
                for item in chunk:
                    make = inputs_for.setdefault(id(item.entry), EntryInputs(engine, item.entry))
                    rows.append(make(item.conv))
            except Exception as e:  # reported through before_batch, then raised
                error = e
            if before_batch is not None:
                before_batch(error)
            if error is not None:
                raise error
            for i, (item, gen) in enumerate(zip(chunk, engine.generate(rows, options))):
                record = {"id": f"{item.entry.label()}-{start + i}",
                          "prompt": inputs_for[id(item.entry)].prompter.text(item.conv),
                          "images": item.conv.images if all(len(r) < 512 for r in item.conv.images) else None,
                          "prediction": gen.text.strip(),
                          "reference": item.references[0] if item.references else None,
                          "references": item.references,
                          "file": item.sources[0][0], "index": item.sources[0][1],
                          "indices": [s[1] for s in item.sources] if len(item.sources) > 1 else None,
                          "finish_reason": gen.finish_reason, "completion_tokens": gen.completion_tokens}
                records.append({k: v for k, v in record.items() if v is not None})
            bar.update(len(chunk))
    return records


def write_predictions(records: list[dict], items: list[PromptItem], output_dir: str, metrics=METRICS) -> dict:
    """`predictions.jsonl` (and `metrics.json` when references exist) from every item's record, in order."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "predictions.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    scores = score([r["prediction"] for r in records], [it.references for it in items], metrics)
    summary = {"predictions": path, "samples": len(items), "metrics": scores}
    if scores:
        summary["metrics_file"] = os.path.join(output_dir, "metrics.json")
        with open(summary["metrics_file"], "w") as f:
            json.dump(scores, f, indent=1)
    return summary


def entries_from_args(data_files: str | None, name: str | None, dataset: str | None, config: str | None,
                      split: str = "eval") -> tuple[list[DatasetEntry], dict]:
    """The dataset to predict on: a `--dataset` JSON entry, `--data_files` (+ `--name`), or a config's split.
    Also returns the config (empty without one), for its model."""
    if sum(x is not None for x in (data_files, dataset, config)) != 1:
        raise MixtuneError("give exactly one of --data_files, --dataset (a dataset entry as JSON) or --config")
    if config is not None:
        from mixtune.config import read_config_file

        raw = read_config_file(config)
        entries = (raw.get("dataset") or {}).get(split) if isinstance(raw.get("dataset"), dict) else None
        if not entries or not isinstance(entries, list):
            raise ConfigError(f"{config} has no dataset.{split} entries to predict on", key=f"dataset.{split}")
        base = os.path.dirname(os.path.abspath(config))
        defaults = {k: raw[k] for k in ("on_bad_sample", "truncation") if k in raw}
        return [DatasetEntry.from_config(e, base, f"dataset.{split}[{i}]", defaults)
                for i, e in enumerate(entries)], raw
    if dataset is not None:
        try:
            raw_entry = json.loads(dataset)
        except json.JSONDecodeError as e:
            raise MixtuneError(f"--dataset is not valid JSON: {e.msg} (column {e.colno})") from None
    else:
        raw_entry = {"name": name or "chatml_dataset", "data_files": data_files}
    return [DatasetEntry.from_config(raw_entry, os.getcwd(), "--dataset")], {}


def model_from_config(raw: dict) -> tuple[str, str | None]:
    """A config's trained model: its output_dir (with the base, when training saved a LoRA adapter there)."""
    out = raw.get("output_dir", "output")
    if os.path.isfile(os.path.join(out, "adapter_config.json")):
        return raw.get("model_name_or_path"), out
    if os.path.isfile(os.path.join(out, "config.json")):
        return out, None
    raise MixtuneError(f"the config's output_dir {out} holds no trained model; pass --model")
