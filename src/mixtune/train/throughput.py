"""What a run trained per second, in the units users compare tools by: real (non-padding) tokens per second,
how full the batches and MixToken rows were, peak memory and, on a GPU, an estimated MFU.

Tokens are counted where they are known exactly: the training collator is wrapped (`CountingCollator`, only
for the train dataloader) so that each batch carries the count of the samples it was built from, and
`MixTrainer.training_step` takes that count off the batch before the model sees it (`Throughput.take`). So
only batches that were trained are counted (not the batch the data loader fetched ahead, nor eval batches),
and a packed row's padding tail is never counted as tokens.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

COUNT_KEY = "mixtune_batch_counts"  # carried in a train batch from the collator to training_step
# what throughput_metrics may report (README's table names each)
METRIC_KEYS = ("train_real_tokens", "train_real_tokens_per_second", "train_real_samples",
               "train_real_samples_per_second", "train_token_fill", "train_packing_fill", "train_peak_rss_mb",
               "train_peak_gpu_mb", "train_mfu")

# Dense bf16/fp16 tensor-core peak TFLOPS per GPU, from the vendors' datasheets (name fragment as torch reports
# it -> peak). MFU is left out on any other device; MIXTUNE_PEAK_TFLOPS sets the peak for one.
PEAK_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0),
               ("RTX 4090", 165.0), ("A10G", 70.0), ("A10", 125.0))


@dataclass
class BatchCounts:
    tokens: int | None  # real tokens: the samples' own lengths (image tokens included), no padding
    positions: int | None  # tokens the batch's tensors hold, padding included
    rows: int  # samples, or MixToken rows
    capacity: int | None = None  # MixToken: rows x max_length
    samples: int | None = None  # samples (a MixToken row holds several); None: rows are samples


def samples_of(batch: list) -> list | None:
    """The Encoded samples of a chat batch (packs flattened); None for other tasks' samples."""
    from mixtune.data.encode import Encoded

    flat = [s for item in batch for s in (item if isinstance(item, (list, tuple)) else [item])]
    return flat if flat and all(isinstance(s, Encoded) for s in flat) else None


def count_batch(batch: list, collated: dict, max_length: int | None) -> BatchCounts:
    ids = collated.get("input_ids")
    positions = int(ids.numel()) if ids is not None and hasattr(ids, "numel") else None
    encoded = samples_of(batch)
    packed = bool(batch) and isinstance(batch[0], (list, tuple))
    if encoded is not None:
        tokens = sum(len(s) for s in encoded)
    elif ids is not None and collated.get("attention_mask") is not None and \
            collated["attention_mask"].shape == ids.shape:  # other tasks' text: its mask marks the real tokens
        tokens = int(collated["attention_mask"].sum())
    else:
        tokens = positions  # text without padding, or None: no text at all (image classification)
    return BatchCounts(tokens, positions, len(batch), len(batch) * max_length if packed and max_length else None,
                       len(encoded) if encoded is not None else None)


@dataclass
class CountingCollator:
    """The train collator, plus each batch's `BatchCounts` under COUNT_KEY."""
    collate: Any
    max_length: int | None = None  # MixToken rows' capacity

    def __call__(self, batch: list) -> dict:
        collated = self.collate(batch)
        if isinstance(collated, dict):  # GRPO's batches are the raw prompt records: it tokenises them itself
            collated[COUNT_KEY] = count_batch(batch, collated, self.max_length)
        return collated

    def __getattr__(self, name):  # the wrapped collator's own attributes (tokenizer, flatten, ...)
        if name == "collate":
            raise AttributeError(name)
        return getattr(self.collate, name)


@dataclass
class Throughput:
    """Sums the counts of the batches this process trained."""
    tokens: int = 0
    positions: int = 0
    rows: int = 0
    capacity: int = 0
    samples: int = 0
    has_tokens: bool = False
    has_positions: bool = False

    def take(self, inputs) -> None:
        counts = inputs.pop(COUNT_KEY, None) if isinstance(inputs, dict) else None
        if counts is None:
            return
        self.rows += counts.rows
        self.samples += counts.samples if counts.samples is not None else counts.rows
        if counts.tokens is not None:
            self.tokens += counts.tokens
            self.has_tokens = True
        if counts.positions is not None:
            self.positions += counts.positions
            self.has_positions = True
        self.capacity += counts.capacity or 0

    def summed(self, accelerator=None) -> tuple[int, int, int, int, int]:
        """(tokens, positions, rows, capacity, samples) over every data-parallel rank."""
        values = (self.tokens, self.positions, self.rows, self.capacity, self.samples)
        if accelerator is None or accelerator.num_processes == 1:
            return values
        import torch

        total = accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=accelerator.device), "sum")
        return tuple(int(v) for v in total.tolist())


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, float]:
    """The process's peak resident memory (CPU RAM, since it started) and, on a GPU, the peak memory torch
    allocated on it since training began."""
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"train_peak_rss_mb": round(rss / (1024 ** 2 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["train_peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 1024 ** 2, 1)
    return out


def peak_tflops() -> float | None:
    import torch

    if os.environ.get("MIXTUNE_PEAK_TFLOPS"):
        return float(os.environ["MIXTUNE_PEAK_TFLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in name), None)


def flops_per_token(model) -> int:
    """6 x the parameters outside embeddings (transformers' `floating_point_ops` convention: forward 2, backward
    4 FLOPs per weight per token); attention's own FLOPs and frozen parts are not discounted."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
    seen, n = set(), 0
    for p in base.parameters():
        if id(p) in seen or id(p) in embeddings:
            continue
        seen.add(id(p))
        n += getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 leaves each rank a shard
    return 6 * n


def throughput_metrics(trainer, runtime: float, mfu_flops_per_token: int | None = None,
                       half_precision: bool = False) -> dict[str, float]:
    """The run's train_real_tokens(_per_second), fills, peak memory and MFU, summed over ranks."""
    counter: Throughput | None = getattr(trainer, "throughput", None)
    out: dict[str, float] = {}
    if counter is not None:
        tokens, positions, rows, capacity, samples = counter.summed(trainer.accelerator)
        if runtime > 0 and samples:  # with MixToken the Trainer's samples/s counts rows; this counts samples
            out["train_real_samples"] = samples
            out["train_real_samples_per_second"] = samples / runtime
        if counter.has_tokens and runtime > 0:
            out["train_real_tokens"] = tokens
            out["train_real_tokens_per_second"] = tokens / runtime
            if counter.has_positions and positions:
                out["train_token_fill"] = tokens / positions  # the share of computed positions that were real
            if capacity:
                out["train_packing_fill"] = tokens / capacity  # MixToken: the share of row capacity used
            peak = peak_tflops()
            if mfu_flops_per_token and peak and half_precision:
                world = max(1, trainer.accelerator.num_processes)
                out["train_mfu"] = mfu_flops_per_token * tokens / runtime / (peak * 1e12 * world)
    out.update(peak_memory_mb())
    return out


def describe(metrics: dict) -> str:
    """One log line of the figures above."""
    parts = []
    if "train_real_tokens_per_second" in metrics:
        parts.append(f"{metrics['train_real_tokens_per_second']:.1f} real tokens/s "
                     f"({metrics['train_real_tokens']} tokens)")
    if "train_token_fill" in metrics:
        parts.append(f"token fill {100 * metrics['train_token_fill']:.1f}%")
    if "train_packing_fill" in metrics:
        parts.append(f"packing fill {100 * metrics['train_packing_fill']:.1f}%")
    if "train_real_samples_per_second" in metrics:
        parts.append(f"{metrics['train_real_samples_per_second']:.2f} samples/s")
    if "train_peak_gpu_mb" in metrics:
        parts.append(f"peak GPU memory {metrics['train_peak_gpu_mb']:.0f} MiB")
    parts.append(f"peak RSS {metrics['train_peak_rss_mb']:.0f} MiB")
    if "train_mfu" in metrics:
        parts.append(f"MFU {100 * metrics['train_mfu']:.1f}% (estimate)")
    return ", ".join(parts)
