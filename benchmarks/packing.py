"""Padded vs MixToken-packed training on uneven-length data: prints figures, asserts nothing.

Data: `mixtune make-demo-data` VQA and captions, plus long captions mixed in (a quarter of the samples),
on a tiny Qwen2-VL checkpoint, fp32, SDPA. Samples are encoded once beforehand, so only training is
timed: forward, backward and an AdamW step over one epoch, `--repeats` times per mode, the two modes'
epochs alternating in one process (so load from others on a shared CPU falls on both alike); peak RSS
comes from a separate process per mode running one epoch. Padded: batches of `--batch_size` samples
padded to the longest (mixtune's
PadCollator). Packed: batches of `--rows` rows of up to `--max_length` tokens (first-fit-decreasing).

real_token_fraction: real tokens over row capacity (rows x max_length) for packed; over padded slots for
padded. max_loss_diff: the largest |loss(packed row) - loss(same samples padded)| over the packs.

Torch threads are set to `--threads` (default 1): on a shared CPU more threads gave erratic timings.
Run: PYTHONPATH=src python benchmarks/packing.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial


def make_data(root: str, n_images: int, seed: int) -> str:
    from mixtune.tools.demo_data import make_demo_data

    make_demo_data(root, n_train_images=n_images, n_val_images=1, seed=seed)
    with open(os.path.join(root, "train.json")) as f:
        records = json.load(f)
    rng = random.Random(seed)
    words = ("a small bright shape sits on the left of a plain white picture , drawn with a steady hand , "
             "next to nothing else at all ; the colour is clear and the edges are sharp").split()
    for i in range(len(records) // 3):  # long captions: a quarter of the final set
        n = rng.randint(40, 260)
        caption = " ".join(rng.choice(words) for _ in range(n))
        records.append({"image": f"images/train_{rng.randrange(n_images):04d}.png",
                        "conversations": [["<image>Describe the image in detail.", caption]]})
    rng.shuffle(records)
    path = os.path.join(root, "mixed.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def prepare(work: str, n_images: int, seed: int) -> None:
    import torch

    from mixtune.data.dataset import build_split
    from mixtune.models.registry import get_family
    from mixtune.models.loading import load_model_and_processor

    model_dir = get_family("qwen2_vl").build_tiny(os.path.join(work, "model"))
    data = make_data(os.path.join(work, "data"), n_images, seed)
    family, model, processor = load_model_and_processor(model_dir)
    ds = build_split([{"name": "chatml_dataset", "data_files": data}], "train", processor, family, 4096, work)
    torch.save([ds[i] for i in range(len(ds))], os.path.join(work, "samples.pt"))


def batches(mode: str, samples, model, family, pad_id: int, args, epoch: int):
    from mixtune.data.collate import PadCollator
    from mixtune.data.pack import PackCollator, PackedDataset

    rng = random.Random(args.seed + epoch)
    if mode == "padded":
        order = list(range(len(samples)))
        rng.shuffle(order)
        collate = PadCollator(pad_id)
        for i in range(0, len(order), args.batch_size):
            yield collate([samples[j] for j in order[i: i + args.batch_size]])
    else:
        packed = PackedDataset(samples, args.max_length, args.seed, lengths=[len(s) for s in samples])
        order = list(range(len(packed)))
        rng.shuffle(order)
        collate = PackCollator(pad_id, partial(family.pack_positions, model))
        for i in range(0, len(order), args.rows):
            yield collate([packed[k] for k in order[i: i + args.rows]])


class Trainee:
    """One model + optimizer training in one mode; `epoch()` returns the seconds the training steps took."""

    def __init__(self, mode: str, work: str, args):
        import torch

        from mixtune.data.pack import use_packed_sdpa
        from mixtune.models.loading import load_model_and_processor

        torch.manual_seed(args.seed)
        self.mode, self.args = mode, args
        self.samples = torch.load(os.path.join(work, "samples.pt"), weights_only=False)
        self.family, self.model, processor = load_model_and_processor(os.path.join(work, "model"), "sdpa")
        if mode == "packed":
            use_packed_sdpa(self.model)  # what `mixtoken: true` does with SDPA on the CPU
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.pad_id = processor.tokenizer.pad_token_id
        self.slots = self.capacity = 0
        for inputs in list(self.batches(epoch=-1))[:2]:  # warm-up
            self.step(inputs)

    def batches(self, epoch: int):
        return batches(self.mode, self.samples, self.model, self.family, self.pad_id, self.args, epoch)

    def step(self, inputs) -> None:
        self.model(**inputs).loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def epoch(self, epoch: int) -> float:
        todo = list(self.batches(epoch))  # collation is not timed
        self.slots = sum(b["input_ids"].numel() for b in todo)
        self.capacity = sum(b["input_ids"].shape[0] for b in todo) * self.args.max_length
        start = time.perf_counter()
        for inputs in todo:
            self.step(inputs)
        return time.perf_counter() - start

    def real_token_fraction(self) -> float:
        real = sum(len(s) for s in self.samples)
        return real / (self.capacity if self.mode == "packed" else self.slots)


def peak_rss(mode: str, work: str, args) -> dict:
    """Run in a child process: one epoch of one mode, so the peak RSS is that mode's alone."""
    import torch

    torch.set_num_threads(args.threads)
    Trainee(mode, work, args).epoch(0)
    return {"mode": mode, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def max_loss_diff(work: str, args) -> float:
    import torch

    from mixtune.data.collate import PadCollator
    from mixtune.data.pack import PackCollator, PackedDataset, use_packed_sdpa
    from mixtune.models.loading import load_model_and_processor

    torch.set_num_threads(args.threads)
    samples = torch.load(os.path.join(work, "samples.pt"), weights_only=False)
    family, model, processor = load_model_and_processor(os.path.join(work, "model"), "sdpa")
    model.eval()
    packed_model = load_model_and_processor(os.path.join(work, "model"), "sdpa")[1].eval()
    use_packed_sdpa(packed_model)
    pad_id = processor.tokenizer.pad_token_id
    packed = PackedDataset(samples, args.max_length, args.seed, lengths=[len(s) for s in samples])
    pack_rows = PackCollator(pad_id, partial(family.pack_positions, model))
    worst = 0.0
    with torch.no_grad():
        for k in range(min(len(packed), args.check_packs or len(packed))):
            got = packed_model(**pack_rows([packed[k]])).loss
            ref = model(**PadCollator(pad_id)(packed[k])).loss
            worst = max(worst, abs(got.item() - ref.item()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=48, help="demo images; 5 samples each plus long captions")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8, help="padded: samples per step")
    p.add_argument("--rows", type=int, default=1, help="packed: rows per step")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--check_packs", type=int, default=0, help="packs checked for max_loss_diff; 0: all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small data, one repeat")
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.images, args.repeats, args.check_packs = 12, 1, 3
    if args.mode:  # child process: one mode's peak RSS, JSON on the last line
        print(json.dumps(peak_rss(args.mode, args.work, args)))
        return
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        prepare(work, args.images, args.seed)
        rss = {}
        for mode in ("padded", "packed"):
            cmd = [sys.executable, __file__, "--mode", mode, "--work", work] + sys.argv[1:]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rss[mode] = json.loads(out.strip().splitlines()[-1])["peak_rss_mib"]
        # both modes in one process, epochs alternating (and which goes first too), so that load from
        # other processes on a shared machine falls on both alike
        trainees = {mode: Trainee(mode, work, args) for mode in ("padded", "packed")}
        times = {mode: [] for mode in trainees}
        for epoch in range(args.repeats):
            for mode in (("padded", "packed") if epoch % 2 == 0 else ("packed", "padded")):
                times[mode].append(trainees[mode].epoch(epoch))
        diff = max_loss_diff(work, args)
    n = len(trainees["padded"].samples)
    real = sum(len(s) for s in trainees["padded"].samples)
    print(f"torch threads: {args.threads}; tiny Qwen2-VL, fp32, SDPA; {n} samples, {real} tokens; padded batch "
          f"{args.batch_size} samples, packed {args.rows} row(s) of {args.max_length} tokens; median of "
          f"{args.repeats} alternating epochs")
    print(f"{'mode':<8}{'samples/s':>11}{'tokens/s':>11}{'real frac':>11}{'epoch s':>9}{'peak RSS MiB':>14}")
    rate = {}
    for mode, t in trainees.items():
        sec = statistics.median(times[mode])
        rate[mode] = n / sec
        print(f"{mode:<8}{rate[mode]:>11.1f}{real / sec:>11.0f}{t.real_token_fraction():>11.3f}{sec:>9.2f}"
              f"{rss[mode]:>14.0f}   (epochs: {', '.join(f'{x:.2f}' for x in times[mode])})")
    print(f"RESULT speedup={rate['packed'] / rate['padded']:.2f} "
          f"real_token_fraction={trainees['packed'].real_token_fraction():.4f} max_loss_diff={diff:.2e}")


if __name__ == "__main__":
    main()
