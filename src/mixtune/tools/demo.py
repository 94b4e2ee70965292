"""`mixtune demo`: build a tiny model and demo data, fine-tune with `mixtune train`'s own code path, and
show that the model learned by answering held-out questions before and after training."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch

from mixtune.config import build_config
from mixtune.data.dataset import DatasetEntry
from mixtune.models.registry import get_family
from mixtune.tools.demo_data import COLOURS, COUNTS, SHAPES, SIDES, make_demo_data
from mixtune.train.run import train

log = logging.getLogger("mixtune")

# Chance level of a model that knows each question's answer set and guesses uniformly.
CHANCE = (1 / len(COLOURS) + 1 / len(SHAPES) + 1 / len(SIDES) + 1 / len(COUNTS)) / 4

DEMO_TRAINING = {
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 1e-3,
    "num_train_epochs": 6,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "logging_steps": 20,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "max_length": 512,
    "seed": 0,
    "dataloader_num_workers": 0,
}

# Families the shared settings do not suit. Qwen-VL's resampler (`attn_pool`: learned queries cross-attending
# to the ViT's patches through one softmax) collapses at lr 1e-3: accuracy 0.75 with count at chance, and a
# 256-wide model (two resampler heads) 0.575 with all 16 queries attending to one and the same patch (attention
# entropy 0 of ln 64 = 4.2). At 3e-4 most queries keep a spread attention: 0.95 (count, colour, side 1.0;
# shape 0.8) after the same 6 epochs (measured).
FAMILY_TRAINING = {"qwen_vl": {"learning_rate": 3e-4}}

# `--lora`. The tiny model's weights are random, which no real LoRA run faces: a random vision tower gives
# features too poor to answer from (measured: 0.60 accuracy with it frozen), and the frozen random final norm
# caps the logits (loss stalls near 5.2 with adapters alone). So the vision tower, the projector and the final
# norm train fully beside the language model's adapters (measured: 0.91 after 6 epochs; 8 for a margin).
DEMO_LORA = {
    "lora": True,
    "learning_rate": 3e-3,
    "num_train_epochs": 8,
    "lora_modules_to_save": ["vision", "projector", r".*language_model\.norm"],
}

# With MixToken a batch counts rows, and a 512-token row holds about nine demo samples: one row per step
# keeps the samples per optimizer step close to the padded demo's batch of 8. Rows are fuller than padded
# batches, so an epoch has fewer steps (324 vs 375): 8 epochs give a margin (6 measured: 0.925 accuracy).
DEMO_MIXTOKEN = {"mixtoken": True, "per_device_train_batch_size": 1, "num_train_epochs": 8}


def answer_accuracy(model_dir: str, data_file: str, max_new_tokens: int = 8,
                    output_dir: str | None = None, video: dict | None = None) -> tuple[float, list[dict]]:
    """Held-out exact-match accuracy through `mixtune predict`'s own path (same prompts, batched generation);
    `video`: the entry's video keys (fps, min/max_frames), as training read the videos."""
    from mixtune.infer.engine import Engine, GenerationOptions
    from mixtune.infer.predict import predict, read_prompts
    from mixtune.media.video import VideoBudget

    items = read_prompts([DatasetEntry(name="chatml_dataset", data_files=data_file,
                                       video=VideoBudget.from_entry(video) if video else None)])
    output_dir = output_dir or os.path.join(model_dir, "predictions")
    summary = predict(Engine.load(model_dir), items, GenerationOptions(max_new_tokens=max_new_tokens), output_dir,
                      batch_size=16, metrics=("exact_match",), progress=False)
    with open(summary["predictions"]) as f:
        rows = [json.loads(line) for line in f]
    examples = [{"question": item.conv.turns[-1].text, "expected": r["reference"], "answer": r["prediction"]}
                for item, r in zip(items, rows)]
    return summary["metrics"].get("exact_match", 0.0), examples


def next_commands(model_dir: str, val_file: str) -> list[str]:
    """What to do with the trained model, printed at the end of the demo."""
    return [f"mixtune predict --model {model_dir} --data_files {val_file} --output_dir {model_dir}/predictions",
            f"mixtune chat --model {model_dir}",
            f"mixtune serve --model {model_dir} --port 8000"]


def run_demo(family_name: str = "qwen2_vl", output_dir: str = "runs/demo", overrides: dict | None = None,
             lora: bool = False, mixtoken: bool = False) -> dict:
    start = time.time()
    # The tiny model's matrices are too small to gain from threads, and on a loaded machine torch's
    # thread pool makes each step 10-50x slower (measured): one thread is faster and steady.
    torch.set_num_threads(1)
    family = get_family(family_name)
    model_dir = os.path.join(output_dir, "tiny_model")
    data_dir = os.path.join(output_dir, "data")
    train_dir = os.path.join(output_dir, "trained")
    log.info("building tiny %s checkpoint in %s", family.name, model_dir)
    family.build_tiny(model_dir)
    log.info("drawing demo data in %s: %s", data_dir, make_demo_data(data_dir))
    val_file = os.path.join(data_dir, "val.json")
    accuracy_before, _ = answer_accuracy(model_dir, val_file, output_dir=os.path.join(output_dir, "predictions_before"))
    log.info("accuracy before training: %.3f", accuracy_before)
    raw = {
        "model_name_or_path": model_dir,
        "dataset": {"train": [{"name": "chatml_dataset", "data_files": os.path.join(data_dir, "train.json")}],
                    "eval": [{"name": "chatml_dataset", "data_files": val_file}]},
        "output_dir": train_dir,
        "overwrite_output_dir": True,
        **DEMO_TRAINING,
        **FAMILY_TRAINING.get(family.name, {}),
        **(DEMO_LORA if lora else {}),
        **(DEMO_MIXTOKEN if mixtoken else {}),
        **(overrides or {}),
    }
    config = build_config(raw)
    metrics = train(config)
    answer_dir = train_dir
    if config.mix.lora:  # training saved an adapter: evaluate the merged model, as a user would ship it
        from mixtune.tools.merge_lora import merge_lora

        answer_dir = os.path.join(output_dir, "merged")
        shutil.rmtree(answer_dir, ignore_errors=True)  # the demo's own folder, rewritten on every run
        merge_lora(train_dir, answer_dir, model_dir)
    accuracy_after, rows = answer_accuracy(answer_dir, val_file, output_dir=os.path.join(output_dir, "predictions"))
    log.info("accuracy after training: %.3f", accuracy_after)
    with open(os.path.join(train_dir, "metrics.json")) as f:
        train_losses = [loss for _, loss in json.load(f)["train_loss"]]
    report = {
        "family": family.name,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "chance_accuracy": round(CHANCE, 4),
        "train_loss_first": train_losses[0] if train_losses else None,
        "train_loss_last": train_losses[-1] if train_losses else None,
        "eval_loss": metrics.get("eval_loss"),
        "eval_samples": len(rows),
        "train_runtime_s": round(metrics.get("train_runtime", 0), 1),
        "total_runtime_s": round(time.time() - start, 1),
        "lora": config.mix.lora,
        "mixtoken": config.mix.mixtoken,
        "model_dir": answer_dir,
        "next_commands": next_commands(answer_dir, val_file),
        "examples": rows[:8],
    }
    with open(os.path.join(output_dir, "demo_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
