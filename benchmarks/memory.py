"""Peak memory of full SFT, LoRA and QLoRA of the same model at the same batch: what each option buys.

Each mode runs `mixtune train`'s own path (build_trainer, then the Trainer) for `--steps` steps of a fixed batch,
in a process of its own, on the same checkpoint and data:
  full   every weight trains (fp32 master weights, AdamW; bf16 autocast on the GPU)
  lora   LoRA adapters (rank 8) on the language model's projections, the base frozen
  qlora  the same adapters over a 4-bit NF4 language model (`quantization: 4bit`; CUDA only)
Figures per mode: peak memory (on a GPU torch.cuda.max_memory_allocated; on the CPU the process's peak RSS,
which includes torch's own ~1 GiB), and the training state the Trainer holds after the steps: weights,
gradients (held during each step) and optimizer states, in MiB (what differs between the modes, on any device).
Model: on a GPU a random-init Qwen2-VL with the published 2B sizes (benchmarks/gpu_throughput.py's), saved
once as a checkpoint; on the CPU (or `--tiny`) the tiny test checkpoint, and QLoRA prints a line saying why
it is skipped. One `RESULT {json}` line per mode.
Run: PYTHONPATH=src python benchmarks/memory.py [--tiny] [--batch_size 4] [--modes full,lora,qlora]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import torch


def prepare(work: str, size: str, seed: int) -> tuple[str, str]:
    """(checkpoint folder, data file)."""
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import get_family

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu_throughput import make_records, sized_config

    model_dir = get_family("qwen2_vl").build_tiny(os.path.join(work, "tiny"))
    if size != "tiny":
        _, model, processor = load_model_and_processor(model_dir, "sdpa")
        torch.manual_seed(seed)
        with torch.device("cuda"):
            model = type(model)._from_config(sized_config(model.config, size), dtype=torch.bfloat16)
        model_dir = os.path.join(work, size)
        model.save_pretrained(model_dir)
        processor.save_pretrained(model_dir)
        del model
    return model_dir, make_records(work, 64, seed, big=size != "tiny")


def state_mib(trainer) -> dict:
    """Weights, gradients and optimizer states the Trainer holds, in MiB."""
    def size(tensors):
        return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20

    params = list(trainer.model.parameters())
    states = [v for s in trainer.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)] \
        if trainer.optimizer is not None else []
    # gradients exist from backward to the optimizer step (the Trainer frees them after): one per trainable weight
    return {"weights_mib": round(size(params), 3), "grads_mib": round(size(p for p in params if p.requires_grad), 3),
            "optimizer_mib": round(size(states), 3),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad)}


def run_mode(mode: str, model_dir: str, data: str, work: str, args) -> dict:
    """In this process: train `mode` for a few steps and measure."""
    from mixtune.config import build_config
    from mixtune.train.run import build_trainer

    on_gpu = torch.cuda.is_available() and not args.tiny
    torch.set_num_threads(args.threads)
    pixels = {"min_pixels": 224 * 224, "max_pixels": 448 * 448} if on_gpu else {}
    raw = {"model_name_or_path": model_dir, "output_dir": os.path.join(work, f"out_{mode}"),
           "dataset": {"train": [{"name": "chatml_dataset", "data_files": data, **pixels}]},
           "per_device_train_batch_size": args.batch_size, "max_steps": args.steps, "learning_rate": 1e-5,
           "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "report_to": "none", "seed": args.seed,
           "max_length": 4096, "dataloader_num_workers": 0, "bf16": on_gpu,
           "gradient_checkpointing": args.recompute}
    if mode in ("lora", "qlora"):
        raw.update(lora=True, lora_dropout=0.0)
    if mode == "qlora":
        raw.update(quantization="4bit")
    if not on_gpu:
        raw["device"] = "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer = build_trainer(build_config(raw, work))
    trainer.train()
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return {"mode": mode, "batch_size": args.batch_size, "recompute": args.recompute,
            "peak_memory_gib": round(peak, 3), "memory_kind": "cuda_max_allocated" if on_gpu else "process_peak_rss",
            **state_mib(trainer)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (automatic without CUDA)")
    p.add_argument("--size", choices=("2b", "7b"), default="2b", help="on a GPU")
    p.add_argument("--modes", default="full,lora,qlora")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--recompute", action="store_true", help="gradient_checkpointing: true in every mode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", nargs=4, metavar=("MODE", "MODEL", "DATA", "WORK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.tiny = args.tiny or not torch.cuda.is_available()
    if args.child:
        print(json.dumps(run_mode(*args.child, args)))
        return
    size = "tiny" if args.tiny else args.size
    work = tempfile.mkdtemp(prefix="memory_")
    model_dir, data = prepare(work, size, args.seed)
    where = "CPU" if args.tiny else torch.cuda.get_device_name()
    print(f"# Qwen2-VL {size}, batch {args.batch_size}, {args.steps} steps per mode, {where}")
    for mode in [m for m in args.modes.split(",") if m]:
        if mode == "qlora" and args.tiny:
            print("RESULT " + json.dumps({"mode": mode, "size": size, "skipped": "QLoRA needs a CUDA GPU: transformers "
                                          "quantises weights only as it moves them to the GPU"}))
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, model_dir, data, work] + \
            [a for a in sys.argv[1:] if a != "--child"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        if done.returncode or not lines:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print("RESULT " + json.dumps({"mode": mode, "size": size, "failed": tail[:300]}))
            continue
        print("RESULT " + json.dumps({"size": size, **json.loads(lines[-1])}))


if __name__ == "__main__":
    main()
