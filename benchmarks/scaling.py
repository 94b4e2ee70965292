"""Step time and peak memory per rank: 1 vs 2 processes under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (CPU, gloo).

    .venv/bin/python benchmarks/scaling.py [--layers 8] [--steps 12]

Builds a small random-init Qwen2-VL (the tiny family checkpoint with a wider, deeper language model, so
that weights, gradients and Adam state outweigh the interpreter), then launches each case under torchrun
with one thread per process and the same global batch of 4 (1 x 4, or 2 x 2). Each rank reports:
- step_s: median wall time of an optimizer step after 3 warm-up steps;
- peak_rss_mb: the process's peak resident memory; model_mb: its growth from just before the model loads
  (interpreter and libraries excluded), which is where ZeRO's sharding shows.
On this machine (2 cores shared with other jobs) the timings vary by tens of percent between runs; the
memory figures are steady.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CASES = [("ddp", None), ("zero2", "stage2"), ("zero3", "stage3")]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(folder: str, layers: int) -> str:
    """The tiny Qwen2-VL checkpoint (its processor and tokenizer), with a 512-wide language model."""
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from mixtune.models.registry import get_family

    tiny = get_family("qwen2_vl").build_tiny(os.path.join(folder, "tiny"))
    config = AutoConfig.from_pretrained(tiny)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 512, 1408, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 8, 4, 64
    text.rope_parameters["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2
    text.layer_types = ["full_attention"] * layers
    config.vision_config.hidden_size = 512  # Qwen2-VL: the merger projects into the language model's width
    model = Qwen2VLForConditionalGeneration(config)
    out = os.path.join(folder, "model")
    model.save_pretrained(out)
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    return out


def write_data(folder: str, n: int = 64) -> str:
    from PIL import Image

    records = []
    for i in range(n):
        Image.new("RGB", (56 + 28 * (i % 3), 56), (40 * (i % 6), 200, 30)).save(os.path.join(folder, f"img{i}.png"))
        question, answer = "<image>Describe the shape." + " More." * (i % 4), "a shape " * (1 + i % 3)
        records.append({"image": f"img{i}.png", "conversations": [[question, answer]]})
    path = os.path.join(folder, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def worker(cfg_path: str, case: str) -> None:
    """One torchrun rank: train, then print this rank's RESULT line."""
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(1)
    from mixtune.config import load_config
    from mixtune.train.distributed import rank, world_size
    from mixtune.train.run import build_trainer

    config = load_config(cfg_path)
    before = rss_mb()
    trainer = build_trainer(config)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(StepTimer())
    trainer.train()
    step = statistics.median(times[3:] or times)
    print(f"RESULT case={case} procs={world_size()} rank={rank()} step_s={step:.3f} "
          f"peak_rss_mb={peak_rss_mb():.0f} model_mb={peak_rss_mb() - before:.0f}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    folder = tempfile.mkdtemp(prefix="mixtune_scaling_")
    model = build_model(folder, args.layers)
    data = write_data(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MIXTUNE_CACHE_DIR": os.path.join(folder, "cache")}
    n_params = None
    for case, sharding in CASES:
        for procs in (1, 2):
            cfg = {"model_name_or_path": model, "dataset": {"train": [{"name": "chatml_dataset", "data_files": data}]},
                   "output_dir": os.path.join(folder, f"out_{case}_{procs}"), "per_device_train_batch_size": 4 // procs,
                   "max_steps": args.steps, "logging_steps": 1000, "save_strategy": "no", "disable_tqdm": True,
                   "max_length": 512, "learning_rate": 1e-4, "seed": 0}
            if sharding:
                cfg["sharding"] = sharding
            path = os.path.join(folder, f"{case}_{procs}.json")
            with open(path, "w") as f:
                json.dump(cfg, f)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
                   str(free_port()), os.path.abspath(__file__), "--worker", path, case]
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = sorted(line for line in run.stdout.splitlines() if line.startswith("RESULT"))
            if run.returncode or not lines:
                print(f"RESULT case={case} procs={procs} failed rc={run.returncode}: {run.stderr[-800:]}")
            for line in lines:
                print(line, flush=True)
            if n_params is None:
                from safetensors import safe_open

                with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
                    n_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
                print(f"RESULT model_params={n_params} fp32_weights_mb={n_params * 4 / 2**20:.0f} "
                      f"(weights + grads + Adam state ~ {n_params * 16 / 2**20:.0f} MB unsharded)", flush=True)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
