"""GPU check of issue 21's GPU-only parts: `mixtune doctor` on a GPU, and the end-of-training throughput figures
that exist only there (`train_peak_gpu_mb`, `train_mfu`).

1. `mixtune doctor --json`: prints what it found (GPUs, bf16, flash-attention 2, features ruled out) and its exit
   code.
2. `mixtune init --family qwen2_vl` (and `--mixtoken`), filled with a tiny Qwen2-VL and 64 samples of uneven
   length, trained 20 steps in bf16 on the GPU with the starter's settings (batch 1 x 16 accumulation, or rows of
   2048 with MixToken). Prints the summary's real tokens/s, token and packing fill, peak GPU memory and MFU (the
   exactness of the counts is tested on the CPU: tests/test_throughput.py).
Asserts nothing; prints RESULT lines. Under two minutes on one H100 / H200.

Run: PYTHONPATH=src python benchmarks/first_hour_gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import yaml
from PIL import Image


def write_data(root: str) -> str:
    Image.new("RGB", (112, 112), (220, 30, 30)).save(os.path.join(root, "red.png"))
    records = [{"image": "red.png", "conversations": [["<image>What colour is the shape?" + " Look." * (i % 9),
                                                       "red" + " indeed" * (i % 13)]]} for i in range(64)]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def mixtune(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.path.abspath("src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "mixtune", *args], capture_output=True, text=True, env=env)


def main() -> None:
    doctor = mixtune("doctor", "--json")
    try:
        found = json.loads(doctor.stdout)
        print("RESULT " + json.dumps({"check": "doctor", "exit": doctor.returncode, "hardware": found["hardware"],
                                      "missing_optional": found["missing_optional"],
                                      "ruled_out": [f["name"] for f in found["features"] if not f["usable"]]}))
    except (json.JSONDecodeError, KeyError):
        print("RESULT " + json.dumps({"check": "doctor", "exit": doctor.returncode, "stderr": doctor.stderr[-2000:]}))

    from mixtune.models.registry import get_family

    root = tempfile.mkdtemp(prefix="first_hour_gpu_")
    model_dir = get_family("qwen2_vl").build_tiny(os.path.join(root, "model"))
    data = write_data(root)
    for mixtoken in (False, True):
        cfg = os.path.join(root, f"cfg_{mixtoken}.yaml")
        made = mixtune("init", "--family", "qwen2_vl", "--output", cfg, *(["--mixtoken"] if mixtoken else []))
        if made.returncode:
            print("RESULT " + json.dumps({"check": "init", "mixtoken": mixtoken, "stderr": made.stderr[-2000:]}))
            continue
        raw = yaml.safe_load(open(cfg))
        raw.update(model_name_or_path=model_dir, output_dir=os.path.join(root, f"out_{mixtoken}"))
        raw["dataset"]["train"][0]["data_files"] = data
        with open(cfg, "w") as f:
            yaml.safe_dump(raw, f)
        run = mixtune("train", cfg, "--max_steps", "20", "--save_strategy", "no", "--disable_tqdm", "true")
        metrics_path = os.path.join(raw["output_dir"], "metrics.json")
        if run.returncode or not os.path.exists(metrics_path):
            print("RESULT " + json.dumps({"check": "train", "mixtoken": mixtoken, "stderr": run.stderr[-3000:]}))
            continue
        final = json.load(open(metrics_path))["final"]
        keys = ("train_runtime", "train_real_tokens", "train_real_tokens_per_second", "train_real_samples",
                "train_token_fill", "train_packing_fill", "train_peak_gpu_mb", "train_peak_rss_mb", "train_mfu")
        line = [ln for ln in run.stderr.splitlines() if "throughput:" in ln]
        print("RESULT " + json.dumps({"check": "train", "mixtoken": mixtoken, "bf16": raw.get("bf16"),
                                      **{k: final.get(k) for k in keys}, "log": line[-1] if line else None}))


if __name__ == "__main__":
    main()
