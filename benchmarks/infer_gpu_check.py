"""Inference on a GPU (< 3 min on one H100): batched left-padded generation equals one-at-a-time generation in
fp32 and (as an agreement rate) in bf16, the demo's predict path runs on CUDA, and an exported bf16 folder
reloads with logits equal to the model it came from. Tiny random checkpoints; no downloads.

    PYTHONPATH=src python3 benchmarks/infer_gpu_check.py

Prints RESULT lines; exits non-zero when an equality that must hold does not.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
from PIL import Image

from mixtune.data.conversation import Conversation, Turn
from mixtune.data.dataset import DatasetEntry
from mixtune.export import export, safetensors_layout
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.infer.predict import predict, read_prompts
from mixtune.models.registry import get_family
from mixtune.tools.demo_data import make_demo_data

QUESTIONS = ["<image>What colour is it?", "<image>Describe the shape in the middle of the picture in a few words",
             "<image>Hi", "<image>Is it on the left or on the right side?"] * 4


def images(n):
    return [[Image.new("RGB", (40 + 16 * (i % 4), 90 - 10 * (i % 4)), (50 * i % 255, 120, 200))] for i in range(n)]


def batched_vs_alone(engine: Engine, n: int = 16) -> float:
    convs = [Conversation(turns=[Turn("user", q)], images=["m"]) for q in QUESTIONS[:n]]
    opts = GenerationOptions(max_new_tokens=12)
    batched = engine.answer(convs, images(n), opts)
    alone = [engine.answer([c], [i], opts)[0] for c, i in zip(convs, images(n))]
    return sum(a.token_ids == b.token_ids for a, b in zip(batched, alone)) / n


def main(device: str = "cuda") -> int:
    if device == "cuda":
        assert torch.cuda.is_available(), "no GPU"
        print(f"RESULT device {torch.cuda.get_device_name(0)} torch {torch.__version__}", flush=True)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen2_vl", "llava"):
            model = get_family(family).build_tiny(os.path.join(tmp, family))
            for dtype in ("float32", "bfloat16"):
                engine = Engine.load(model, dtype=dtype, device=device)
                rate = batched_vs_alone(engine)
                print(f"RESULT batched_equals_alone family={family} dtype={dtype} agreement={rate:.3f}", flush=True)
                failures += dtype == "float32" and rate < 1.0
        data = os.path.join(tmp, "data")
        make_demo_data(data, n_train_images=1, n_val_images=64)
        engine = Engine.load(os.path.join(tmp, "qwen2_vl"), dtype="bfloat16", device=device)
        items = read_prompts([DatasetEntry(name="chatml_dataset", data_files=os.path.join(data, "val.json"))])
        start = time.time()
        summary = predict(engine, items, GenerationOptions(max_new_tokens=8), os.path.join(tmp, "pred"),
                          batch_size=32, metrics=("exact_match",), progress=False)
        print(f"RESULT predict_cuda samples={summary['samples']} seconds={time.time() - start:.2f} "
              f"exact_match={summary['metrics']['exact_match']:.3f}", flush=True)
        out = os.path.join(tmp, "export")
        report = export(os.path.join(tmp, "qwen2_vl"), out, dtype="bfloat16")
        same_keys = set(safetensors_layout(out)) == set(safetensors_layout(os.path.join(tmp, "qwen2_vl")))
        exported = Engine.load(out, dtype="bfloat16", device=device)
        batch = engine.batch([engine.inputs(Conversation(turns=[Turn("user", QUESTIONS[0])], images=["m"]),
                                            images(1)[0])])
        with torch.no_grad():
            diff = (exported.model(**batch).logits - engine.model(**batch).logits).abs().max().item()
        print(f"RESULT export_bf16 keys_match={same_keys} matches_base={report.get('matches_base_checkpoint')} "
              f"max_abs_logit_diff={diff:.3g}", flush=True)
        failures += not same_keys or diff > 0
    print(f"RESULT infer_gpu_check {'PASS' if not failures else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))  # "cpu": a dry run of the script itself
