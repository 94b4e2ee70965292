"""Training throughput and MFU of a Qwen2-VL-sized model: padded vs MixToken, attention paths, Liger on/off.

Model: random init with the published sizes of Qwen2-VL-2B (`--size 2b`: language model hidden 1536, 28 layers,
12 heads / 2 KV heads, MLP 8960, vocab 151936, tied head; vision tower 32 blocks of width 1280, 16 heads, MLP
ratio 4, 14-pixel patches, 2x2 merge) or 7B (`--size 7b`: hidden 3584, 28 layers, 28 / 4 heads, MLP 18944, vocab
152064, untied head; the same vision tower), bf16 weights and AdamW, full SFT (every part trains), on the GPU.
`--size tiny` (automatic without CUDA, or `--tiny`) uses the tiny test checkpoint in fp32 on the CPU: a smoke
run whose figures mean nothing beyond "every setting runs".
Data: synthetic VQA / caption samples of uneven lengths (one image of 224-448 px per side, 64-256 image tokens
at 2B; answers of 1 to ~600 words); the same samples train in every setting, one step's samples the same in
all of them: MixToken packs them into `--rows` rows of `--max_length` tokens, padded batches hold the same
samples padded to the longest.

Settings (`--settings`, comma-joined; those that cannot run here print a RESULT line saying why):
  padded           SDPA, padded batches (what training without mixtoken runs)
  mixtoken_mask    MixToken rows, SDPA with the block-diagonal causal mask transformers builds (GPU default)
  mixtoken_packed  MixToken rows, mixtune's PACKED_SDPA (samples batched by length bucket; CPU default)
  mixtoken_varlen  MixToken rows, PACKED_VARLEN: torch's own varlen flash attention (CUDA, bf16)
  mixtoken_flash   MixToken rows joined into one, flash-attention-2 varlen (needs the flash-attn package)
  ... and each of them with `+liger` (transformers' `apply_liger_kernel`, as `use_liger_kernel: true` does;
  needs liger-kernel and CUDA). Liger settings run after all others (Liger patches some functions globally).
As in `mixtune train`: logits only at labelled positions (`labelled_logits_only`), except under Liger, whose
fused linear + cross-entropy never materialises them.

Per setting: real (non-padding) tokens per second per GPU, median step time over `--steps` after `--warmup`,
peak memory (torch.cuda.max_memory_allocated; on the CPU the process's peak RSS so far), and MFU:

  MFU = model FLOPs per step / step time / the GPU's dense bf16 peak (`--peak_tflops`, else a table below)
  model FLOPs per step (training = 3x forward: forward 2 FLOPs per multiply-add, backward twice that):
    language model  6 * P_layers * T                      P_layers: decoder-layer weights; T: real tokens
                  + 6 * d_model * vocab * T_logits        the head, at the positions whose logits are computed
                  + 6 * layers * d_attn * sum_i n_i^2     causal attention of each sample alone (n_i tokens;
                                                          full QK^T + AV forward is 4 n^2 d, causal half: 2 n^2 d)
    vision tower    6 * P_vision * patches                P_vision: every vision weight (merger included)
                  + 12 * depth * d_vision * sum_j p_j^2   full attention within each image (p_j patches)
  Padding, cross-sample attention blocks and recomputation count as nothing: MFU counts useful work only.

One `RESULT {json}` line per setting. Run on a GPU: PYTHONPATH=src python benchmarks/gpu_throughput.py
[--size 2b|7b] [--settings ...] [--steps 8]; CPU smoke: PYTHONPATH=src python benchmarks/gpu_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import tempfile
import time
from functools import partial

import torch

ALL_SETTINGS = ("padded", "mixtoken_mask", "mixtoken_packed", "mixtoken_varlen", "mixtoken_flash")
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312,
                    "L40S": 362, "B200": 2250, "GH200": 989}  # dense, no sparsity (vendor data sheets)

SIZES = {
    "2b": dict(text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936), tie=True),
    "7b": dict(text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064), tie=False),
}
VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
              temporal_patch_size=2)


def sized_config(config, size: str):
    """The tiny checkpoint's config with Qwen2-VL-2B's or -7B's published sizes (its token ids kept)."""
    d = config.to_dict()
    text, vision = d["text_config"], d["vision_config"]
    for sub in (text, vision):
        for derived in ("layer_types", "head_dim"):
            sub.pop(derived, None)
    spec = SIZES[size]
    text.update(spec["text"], tie_word_embeddings=spec["tie"])
    text["rope_parameters"]["mrope_section"] = [16, 24, 24]  # sums to head_dim / 2 = 64
    text["rope_parameters"]["rope_theta"] = 1e6
    vision.update(VISION, hidden_size=spec["text"]["hidden_size"])
    d["tie_word_embeddings"] = spec["tie"]
    return type(config).from_dict(d)


def make_records(root: str, n: int, seed: int, big: bool) -> str:
    from PIL import Image

    rng = random.Random(seed)
    sides = (224, 336, 448) if big else (56, 112)
    words = "a plain picture with one bright colour filling it from edge to edge , nothing else".split()
    records = []
    for i in range(n):
        w, h = rng.choice(sides), rng.choice(sides)
        name = f"img_{w}x{h}.png"
        if not os.path.exists(os.path.join(root, name)):
            Image.new("RGB", (w, h), (rng.randrange(256), 90, 160)).save(os.path.join(root, name))
        if i % 3 == 2:  # a long caption
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(50, 600 if big else 120)))
            question = "<image>Describe the image in detail."
        else:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
            question = "<image>What is in this picture? Answer briefly."
        records.append({"image": name, "conversations": [[question, answer]]})
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def flops_per_step(model, batch_samples, logits_positions: int) -> float:
    """Model FLOPs of one training step over these samples (the formula in the module docstring)."""
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    lm = model.model.language_model
    p_layers = sum(p.numel() for p in lm.layers.parameters())
    p_vision = sum(p.numel() for p in model.model.visual.parameters())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    d_attn = text.num_attention_heads * head_dim
    tokens = sum(len(s) for s in batch_samples)
    flops = 6 * p_layers * tokens + 6 * text.hidden_size * text.vocab_size * logits_positions
    flops += 6 * text.num_hidden_layers * d_attn * sum(len(s) ** 2 for s in batch_samples)
    for s in batch_samples:
        grid = s.media.get("image_grid_thw")
        if grid is None:
            continue
        for patches in grid.prod(-1).tolist():
            flops += 6 * p_vision * patches + 12 * vision.depth * vision.embed_dim * patches ** 2
    return float(flops)


def peak_flops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return tflops * 1e12
    return None


def why_not(setting: str, on_gpu: bool) -> str | None:
    """Why a setting cannot run here, or None."""
    attn, liger = setting.split("+")[0], "+liger" in setting
    if liger and not on_gpu:
        return "Liger needs a CUDA GPU"
    if liger and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install 'mixtune[liger]')"
    if attn == "mixtoken_varlen" and not on_gpu:
        return "torch's varlen attention runs on CUDA only (fp16 / bf16)"
    if attn == "mixtoken_flash" and importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed"
    if attn == "mixtoken_flash" and not on_gpu:
        return "flash-attention needs a CUDA GPU"
    return None


def collator(setting: str, model, family, pad: int):
    from mixtune.data.collate import PadCollator
    from mixtune.data.pack import PACKED_SDPA, PACKED_VARLEN, PackCollator, use_packed_sdpa

    attn = setting.split("+")[0]
    text_attn = {"padded": "sdpa", "mixtoken_mask": "sdpa", "mixtoken_packed": PACKED_SDPA,
                 "mixtoken_varlen": PACKED_VARLEN, "mixtoken_flash": "flash_attention_2"}[attn]
    use_packed_sdpa(model, text_attn)  # the language model's attention only; the vision tower keeps its own
    if attn == "padded":
        return PadCollator(pad, family.collate_media)
    return PackCollator(pad, partial(family.pack_positions, model), flatten=attn == "mixtoken_flash",
                        collate_media=family.collate_media)


def to_device(batch: dict, device, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def run_setting(setting: str, model, opt, family, pad: int, steps_samples, args, device, dtype) -> dict:
    from mixtune.train.loss import keep_labelled_positions

    liger = "+liger" in setting
    collate = collator(setting, model, family, pad)
    packed = setting.startswith("mixtoken")
    batches = []
    for packs in steps_samples:  # collated beforehand: the data loader's workers do this during training
        batch = collate(packs if packed else [s for pack in packs for s in pack])
        if not liger:
            batch = keep_labelled_positions(batch)
        batches.append(batch)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, batch in enumerate(batches):
        inputs = to_device(batch, device, dtype)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
    measured = [[s for pack in packs for s in pack] for packs in steps_samples[args.warmup:]]
    tokens = statistics.mean(sum(len(s) for s in samples) for samples in measured)
    step = statistics.median(times)
    logits = [int(b["logits_to_keep"].sum()) if "logits_to_keep" in b else sum(len(s) for s in samples)
              for b, samples in zip(batches[args.warmup:], measured)]
    flops = statistics.mean(flops_per_step(model, samples, n) for samples, n in zip(measured, logits))
    peak = peak_flops(args)
    memory = (torch.cuda.max_memory_allocated() / 2 ** 30 if cuda
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    shapes = tuple(batches[-1]["input_ids"].shape)
    return {"setting": setting, "tokens_per_s": round(tokens / step, 1), "step_ms": round(1e3 * step, 1),
            "tflops_per_s": float(f"{flops / step / 1e12:.4g}"), "mfu": round(flops / step / peak, 4) if peak else None,
            "peak_memory_gib": round(memory, 2), "memory_kind": "cuda_max_allocated" if cuda else "process_peak_rss",
            "tokens_per_step": round(tokens), "batch_shape": shapes, "mean_loss": round(statistics.mean(losses), 4)}


def step_samples(samples, args) -> list[list[list]]:
    """Each step's packs (lists of samples): first-fit-decreasing packs of the whole set, `args.rows` packs a
    step; padded settings take the same samples as one padded batch."""
    from mixtune.data.pack import first_fit_decreasing

    packs = first_fit_decreasing([len(s) for s in samples], args.max_length, args.seed)
    random.Random(args.seed).shuffle(packs)
    steps = []
    for i in range(0, len(packs) - args.rows + 1, args.rows):
        steps.append([[samples[j] for j in pack] for pack in packs[i: i + args.rows]])
    return steps[: args.warmup + args.steps]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "2b", "7b"), default=None, help="default: 2b on a GPU, tiny without")
    p.add_argument("--tiny", action="store_true", help="the tiny checkpoint on the CPU (a smoke run)")
    p.add_argument("--settings", default=",".join(ALL_SETTINGS + tuple(s + "+liger" for s in ALL_SETTINGS)))
    p.add_argument("--max_length", type=int, default=None, help="MixToken row length (default 4096; tiny 1024)")
    p.add_argument("--rows", type=int, default=2, help="MixToken rows per step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samples", type=int, default=None, help="default: enough for warmup + steps")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    on_gpu = torch.cuda.is_available() and not args.tiny
    size = args.size or ("2b" if on_gpu else "tiny")
    if not on_gpu and size != "tiny":
        print(f"# no CUDA GPU (or --tiny): the tiny checkpoint instead of {size}")
        size = "tiny"
    args.max_length = args.max_length or (1024 if size == "tiny" else 4096)
    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    torch.set_num_threads(args.threads)

    from mixtune.data.dataset import build_split
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import get_family

    work = tempfile.mkdtemp(prefix="gpu_throughput_")
    model_dir = get_family("qwen2_vl").build_tiny(os.path.join(work, "model"))
    family, model, processor = load_model_and_processor(model_dir, "sdpa")
    if size != "tiny":
        torch.manual_seed(args.seed)
        config = sized_config(model.config, size)
        with torch.device(device):
            model = type(model)._from_config(config, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device=device, dtype=dtype).train()
    n_params = sum(p.numel() for p in model.parameters())
    per_row = 6 if size == "tiny" else 10  # about how many samples a row holds
    n = args.samples or per_row * args.rows * (args.warmup + args.steps) + 20
    data = make_records(work, n, args.seed, big=size != "tiny")
    pixels = {} if size == "tiny" else {"min_pixels": 224 * 224, "max_pixels": 448 * 448}
    ds = build_split([{"name": "chatml_dataset", "data_files": data, **pixels}], "train", processor, family,
                     args.max_length, work)
    samples = [ds[i] for i in range(len(ds))]
    steps = step_samples(samples, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, **({"fused": True} if on_gpu else {}))
    where = torch.cuda.get_device_name() if on_gpu else "CPU (smoke run: figures mean nothing)"
    print(f"# Qwen2-VL {size} random init ({n_params / 1e9:.2f}B parameters), {str(dtype)[6:]}, {where}; "
          f"{len(steps) - args.warmup} measured steps of {args.rows} row(s) x {args.max_length} tokens "
          f"(the same samples padded for `padded`); peak {peak_flops(args)} FLOP/s")
    settings = [s for s in args.settings.split(",") if s]
    settings.sort(key=lambda s: "+liger" in s)  # Liger patches functions globally: its settings run last
    if len(steps) <= args.warmup:
        raise SystemExit(f"too few samples for {args.warmup} warm-up and {args.steps} steps; raise --samples")
    for setting in settings:
        reason = why_not(setting, on_gpu)
        if reason:
            print("RESULT " + json.dumps({"size": size, "setting": setting, "skipped": reason}))
            continue
        if "+liger" in setting and not getattr(model, "_mixtune_liger", False):
            from transformers.integrations.liger import apply_liger_kernel

            apply_liger_kernel(model, None)
            model._mixtune_liger = True
        try:
            result = run_setting(setting, model, opt, family, processor.tokenizer.pad_token_id, steps, args,
                                 device, dtype)
        except Exception as e:  # one failing setting must not hide the others
            result = {"setting": setting, "failed": f"{type(e).__name__}: {e}"[:300]}
        if on_gpu:
            torch.cuda.empty_cache()
        print("RESULT " + json.dumps({"size": size, **result}))


if __name__ == "__main__":
    main()
