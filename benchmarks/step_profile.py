"""Where a training step's time goes: prints figures, asserts nothing.

Per step, in milliseconds (median over `--steps` steps after `--warmup`):
  data       encoding the batch's samples (dataset __getitem__: images read and processed, text tokenised)
             and collating them, as the Trainer's loader does in the main process with 0 workers
  vision     the vision tower's forward (the family's vision module, projector included where it lives inside)
  language   the language model's forward (decoder layers, no head)
  head_loss  the rest of the forward: embedding merge, lm_head logits and the loss
  backward   loss.backward()
  optimizer  AdamW step and zero_grad
  step       the sum
RESULT lines add the fastest step (`min_step_ms`), the figure least disturbed by other processes.
Each setting trains its own copy of the same initial weights on the same batches; the settings' steps run
interleaved (one step of each in turn), so load from other processes on a shared CPU falls on all alike.

Models: `tiny` is the family's tiny checkpoint (`mixtune make-tiny-model`, hidden 64, 2 layers, vocab ~2000);
`mid` is a random-init model of the same family with hidden 512, 4 language layers, a 4-layer vision tower of
width 256 and a 32000-token vocabulary, so that the logits and attention carry real weight.
Data: VQA-style samples (an image, a short question, a one-to-three-word answer) with one in four a long
caption, so most positions are prompt and image tokens, as in VQA SFT.

Torch threads are set to `--threads` (default 1): on a shared CPU more threads gave erratic timings.
Run: PYTHONPATH=src python benchmarks/step_profile.py [--model tiny|mid] [--family qwen2_vl|llava]
     [--settings plain,labelled,...] [--steps 8]
Settings (comma-joined flags, `+` between flags): plain (everything off), labelled (logits and loss only at
labelled positions), freeze_vision, lora, recompute (transformers' activation checkpointing of every part, as
`recompute: true` runs it, a frozen vision tower kept out of autograd), hf_frozen (with recompute: without
that, transformers' own behaviour), recompute_lm (language model only), recompute_vision (vision tower only),
packed (MixToken rows), packed_loop (MixToken rows under the packed SDPA before session 3, one SDPA call per
sample: the before of the batched per-sample attention).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import tempfile
import time
from functools import partial

PHASES = ("data", "vision", "language", "head_loss", "backward", "optimizer", "step")


def make_records(root: str, n: int, seed: int) -> str:
    from PIL import Image

    rng = random.Random(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    sizes = [(112, 112), (224, 112), (168, 168)]
    for name, rgb in colours.items():
        for w, h in sizes:
            Image.new("RGB", (w, h), rgb).save(os.path.join(root, f"{name}_{w}x{h}.png"))
    words = "a plain picture with one bright colour filling it from edge to edge , nothing else".split()
    records = []
    for i in range(n):
        name = rng.choice(list(colours))
        w, h = rng.choice(sizes)
        if i % 4 == 3:
            answer = " ".join(rng.choice(words) for _ in range(rng.randint(30, 120)))
            question = "<image>Describe the image in detail."
        else:
            answer = rng.choice([name, f"{name}, mostly", f"it is {name}"])
            question = "<image>What colour fills this picture? Answer in a word or two."
        records.append({"image": f"{name}_{w}x{h}.png", "conversations": [[question, answer]]})
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def mid_config(config, family: str):
    """The tiny checkpoint's config at mid size (random init): hidden 512, 4 layers, vocab 32000."""
    d = config.to_dict()
    text, vision = d["text_config"], d["vision_config"]
    for sub in (text, vision):
        for derived in ("layer_types", "head_dim"):  # recomputed from the new sizes
            sub.pop(derived, None)
    text.update(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000)
    if family == "qwen2_vl":
        text["rope_parameters"]["mrope_section"] = [8, 12, 12]  # sums to head_dim / 2 = 32
        vision.update(embed_dim=256, depth=4, num_heads=4, hidden_size=512)
    else:
        vision.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    config = type(config).from_dict(d)
    return config


def setup_model(setting: set, base_model, family, args):
    import torch

    from mixtune.config import MixtuneArgs
    from mixtune.data.pack import use_packed_sdpa
    from mixtune.train.freeze import apply_freeze
    from mixtune.train.recompute import keep_frozen_vision_out_of_autograd, set_part_checkpointing

    model = copy.deepcopy(base_model)
    if "lora" in setting:
        from mixtune.train.lora import apply_lora

        torch.manual_seed(args.seed)
        model = apply_lora(model, family, MixtuneArgs(lora=True, lora_dropout=0.0))
    elif "freeze_vision" in setting:
        apply_freeze(model, None, None, family, ("vision",))
    if "packed" in setting:
        use_packed_sdpa(model)
    elif "packed_loop" in setting:  # the packed SDPA before session 3: one SDPA call per sample (for comparison)
        import sys

        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from packed_attention import register_loop_sdpa

        use_packed_sdpa(model, register_loop_sdpa())
    if "recompute" in setting:  # what the Trainer does for `recompute: true`
        if "hf_frozen" not in setting:  # what mixtune adds (train/recompute.py)
            keep_frozen_vision_out_of_autograd(model, family)
        model.activation_checkpointing_enable()
    elif "recompute_lm" in setting or "recompute_vision" in setting:
        set_part_checkpointing(model, family, language="recompute_lm" in setting,
                               vision="recompute_vision" in setting)
    model.train()
    return model


def part_modules(model, family):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision_root = family.vision[0].rstrip(".*")
    return base.get_submodule(vision_root), base.model.language_model


class Timer:
    """Forward times of one module, from forward pre-/post-hooks; `active` ignores recomputation in backward."""

    def __init__(self, module):
        self.total, self.active, self._start = 0.0, False, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, *_):
        if self.active:
            self._start = time.perf_counter()

    def _post(self, *_):
        if self.active:
            self.total += time.perf_counter() - self._start


class Trainee:
    def __init__(self, name: str, base_model, family, dataset, collate, args):
        import torch

        self.name, self.setting = name, set(name.split("+"))
        self.model = setup_model(self.setting, base_model, family, args)
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        vision, language = part_modules(self.model, family)
        self.vision, self.language = Timer(vision), Timer(language)
        self.dataset, self.collate = dataset, collate
        self.times = {k: [] for k in PHASES}
        self.losses = []

    def step(self, indices, record: bool) -> None:
        from mixtune.train.loss import keep_labelled_positions

        t0 = time.perf_counter()
        items = [self.dataset[i] for i in indices]
        inputs = self.collate(items)
        if "labelled" in self.setting:
            inputs = keep_labelled_positions(inputs)
        t1 = time.perf_counter()
        self.vision.total = self.language.total = 0.0
        self.vision.active = self.language.active = True
        loss = self.model(**inputs).loss
        self.vision.active = self.language.active = False
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if record:
            forward = t2 - t1
            got = dict(data=t1 - t0, vision=self.vision.total, language=self.language.total,
                       head_loss=forward - self.vision.total - self.language.total, backward=t3 - t2,
                       optimizer=t4 - t3, step=t4 - t0)
            for k, v in got.items():
                self.times[k].append(v * 1000)
            self.losses.append(loss.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "mid"), default="tiny")
    parser.add_argument("--family", choices=("qwen2_vl", "llava"), default="qwen2_vl")
    parser.add_argument("--settings", default="plain,labelled")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=1024, help="row length of packed settings")
    parser.add_argument("--packed_rows", type=int, default=1, help="rows per batch of packed settings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mixtune.data.collate import PadCollator
    from mixtune.data.dataset import build_split
    from mixtune.data.pack import PackCollator, PackedDataset
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import get_family

    work = tempfile.mkdtemp(prefix="step_profile_")
    model_dir = get_family(args.family).build_tiny(os.path.join(work, "model"))
    data = make_records(work, args.samples, args.seed)
    family, model, processor = load_model_and_processor(model_dir, "sdpa")
    if args.model == "mid":
        torch.manual_seed(args.seed)
        model = type(model)(mid_config(model.config, args.family))
    model.float()
    ds = build_split([{"name": "chatml_dataset", "data_files": data}], "train", processor, family, 4096, work)
    pad = processor.tokenizer.pad_token_id
    settings = args.settings.split(",")
    trainees = []
    for name in settings:
        packed = bool({"packed", "packed_loop"} & set(name.split("+")))
        if packed:
            dataset = PackedDataset(ds, args.max_length, args.seed, lengths=ds.lengths())
            collate = None  # needs the trainee's model (positions), set below
        else:
            dataset, collate = ds, PadCollator(pad, family.collate_media)
        t = Trainee(name, model, family, dataset, collate, args)
        if packed:
            t.collate = PackCollator(pad, partial(family.pack_positions, t.model), collate_media=family.collate_media)
        trainees.append(t)
    n_params = sum(p.numel() for p in model.parameters())
    for t in trainees:  # the same batches for every padded setting (and for every packed one)
        rows = args.batch_size if isinstance(t.collate, PadCollator) else args.packed_rows
        rng = random.Random(args.seed)
        t.batches = [rng.sample(range(len(t.dataset)), min(rows, len(t.dataset)))
                     for _ in range(args.warmup + args.steps)]
    for step in range(args.warmup + args.steps):
        for t in trainees:
            t.step(t.batches[step], record=step >= args.warmup)
    print(f"# {args.family} {args.model} ({n_params / 1e6:.1f}M parameters), batch {args.batch_size}, "
          f"{args.steps} steps, torch threads {args.threads}, fp32, SDPA; ms per step (median)")
    print(f"# {'setting':<34}" + "".join(f"{k:>10}" for k in PHASES))
    for t in trainees:
        med = {k: statistics.median(v) for k, v in t.times.items()}
        print(f"  {t.name:<36}" + "".join(f"{med[k]:>10.1f}" for k in PHASES))
    for t in trainees:
        med = {k: round(statistics.median(v), 2) for k, v in t.times.items()}
        print("RESULT " + json.dumps({"family": args.family, "model": args.model, "setting": t.name,
                                      "threads": args.threads, "batch_size": args.batch_size,
                                      "ms": med, "min_step_ms": round(min(t.times["step"]), 2),
                                      "mean_loss": round(statistics.mean(t.losses), 5)}))


if __name__ == "__main__":
    main()
