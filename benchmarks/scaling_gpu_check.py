"""GPU check of mixtune's sharding on ONE GPU: peak GPU memory of plain training against FSDP2 with CPU
offload (`sharding: "stage3 offload"`, `sharding_engine: fsdp`) and, where DeepSpeed is installed, ZeRO-3
with CPU offload, for a random-init Qwen2-VL with the published 7B widths (hidden 3584, MLP 18944, 28
heads / 4 KV heads, vocabulary 152064, vision 32 x 1280) and `--layers` decoder layers.

Each case is a real `mixtune train` run under torchrun (1 process), bf16 autocast over fp32 master weights,
2 optimizer steps of batch 1, `skip_memory_metrics: false`; its memory comes from the Trainer's own
tracker (weights moved at init + the peak during training). A case that runs out of memory prints `oom`.
With the default 4 layers (about 2.7 B parameters: plain needs about 16 bytes a parameter, 43 GB,) both fit
on an H100 and the figures show the saving; `--layers 16` (about 5.5 B, 88 GB plain) shows plain failing
where the offloaded run fits, at several minutes and about 90 GB of host memory.

Run: PYTHONPATH=src python benchmarks/scaling_gpu_check.py [--layers 4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def build_model(folder: str, layers: int) -> tuple[str, int]:
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    from mixtune.models.registry import get_family

    tiny = get_family("qwen2_vl").build_tiny(os.path.join(folder, "tiny"))  # its processor and tokenizer
    config = AutoConfig.from_pretrained(tiny)
    text, vision = config.text_config, config.vision_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 3584, 18944, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 28, 4, 128
    text.vocab_size = config.vocab_size = 152064
    text.rope_parameters["mrope_section"] = [16, 24, 24]
    text.layer_types = ["full_attention"] * layers
    vision.depth, vision.embed_dim, vision.num_heads, vision.hidden_size, vision.mlp_ratio = 32, 1280, 16, 3584, 4
    config.tie_word_embeddings = False
    torch.set_default_dtype(torch.bfloat16)  # built and saved in bf16: half the disk and time
    with torch.device("cuda"):  # random init of billions of weights is minutes on the CPU, seconds here
        model = Qwen2VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    out = os.path.join(folder, "model")
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return out, n


def write_data(folder: str) -> str:
    from PIL import Image

    Image.new("RGB", (112, 112), (200, 40, 40)).save(os.path.join(folder, "red.png"))
    records = [{"image": "red.png", "conversations": [["<image>What colour is it?", "red"]]}] * 8
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def run_case(folder: str, name: str, model: str, data: str, extra: dict) -> None:
    cfg = {"model_name_or_path": model, "dataset": {"train": [{"name": "chatml_dataset", "data_files": data}]},
           "output_dir": os.path.join(folder, f"out_{name}"), "per_device_train_batch_size": 1, "max_steps": 2,
           "bf16": True, "save_strategy": "no", "logging_steps": 1, "skip_memory_metrics": False,
           "disable_tqdm": True, "max_length": 256, **extra}
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath("src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29533",
           "-m", "mixtune", "train", path]
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    secs = time.time() - start
    if run.returncode:
        oom = "OutOfMemoryError" in run.stderr or "CUDA out of memory" in run.stderr
        tail = run.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"RESULT case={name} {'oom' if oom else 'failed'} seconds={secs:.0f} last_line={tail[0][:300]!r}")
        return
    metrics = json.loads(run.stdout[run.stdout.rindex("{"):])
    gib = 2 ** 30
    init = metrics.get("init_mem_gpu_alloc_delta", 0) / gib
    peak = metrics.get("train_mem_gpu_peaked_delta", 0) / gib + metrics.get("train_mem_gpu_alloc_delta", 0) / gib
    print(f"RESULT case={name} ok seconds={secs:.0f} gpu_init_gib={init:.1f} gpu_train_peak_gib={init + peak:.1f} "
          f"train_loss={metrics.get('train_loss', float('nan')):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("RESULT skipped: no CUDA device")
        return
    folder = tempfile.mkdtemp(prefix="mixtune_gpu_scaling_")
    start = time.time()
    model, n = build_model(folder, args.layers)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    print(f"RESULT model_params={n / 1e9:.2f}B layers={args.layers} built_in_s={time.time() - start:.0f} "
          f"gpu={torch.cuda.get_device_name(0)} total_gib={total:.0f}")
    data = write_data(folder)
    run_case(folder, "plain", model, data, {})
    run_case(folder, "fsdp2_stage3_offload", model, data, {"sharding": "stage3 offload", "sharding_engine": "fsdp"})
    if importlib.util.find_spec("deepspeed"):
        run_case(folder, "zero3_offload", model, data, {"sharding": "stage3 offload"})
    else:
        print("RESULT case=zero3_offload skipped: deepspeed is not installed here")


if __name__ == "__main__":
    main()
