"""Packed-row attention alone, forward + backward: prints figures, asserts nothing.

Three ways to keep packed samples apart under SDPA, on the same rows (fp32, CPU unless --device):
  loop     one SDPA call per sample per row (mixtune's packed SDPA before session 3: Python per sample)
  batched  mixtune's PACKED_SDPA now: samples gathered into a few padded batches of similar length
  mask     one SDPA call per row with the block-diagonal causal mask (what transformers builds from restarting
           positions; cost L^2 per row)
Rows hold samples drawn from `--lengths` (min,max tokens), first-fit into `--rows` rows of `--length` tokens.
Timings alternate between the three (one call each in turn), median of `--repeats`; max_diff is against loop.
Torch threads are set to `--threads` (default 1): on a shared CPU more threads gave erratic timings.
Run: PYTHONPATH=src python benchmarks/packed_attention.py [--length 4096] [--lengths 16,400] [--heads 8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from types import SimpleNamespace


def loop_attention(query, key, value, lengths_per_row, groups):
    import torch

    rows = []
    for b, lengths in enumerate(lengths_per_row):
        parts, start = [], 0
        for n in lengths:
            k = key[b:b + 1, :, start:start + n].repeat_interleave(groups, dim=1)
            v = value[b:b + 1, :, start:start + n].repeat_interleave(groups, dim=1)
            parts.append(torch.nn.functional.scaled_dot_product_attention(
                query[b:b + 1, :, start:start + n], k, v, is_causal=True).transpose(1, 2))
            start += n
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


# the packed SDPA mixtune had before session 3 (one SDPA call per sample per row per layer), registered as an
# attention implementation so that benchmarks/step_profile.py can run it beside the batched one (`packed_loop`)
LOOP_SDPA = "mixtune_bench_loop_sdpa"


def loop_packed_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    cuts = None
    if position_ids is not None and position_ids.shape[-1] == length and query.shape[2] == key.shape[2]:
        pos = position_ids.reshape(-1, length)
        new = torch.ones_like(pos, dtype=torch.bool)
        new[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
        if new[:, 1:].any():
            cuts = [row.nonzero().flatten().tolist() + [length] for row in new]
    if cuts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    rows = []
    for b, row in enumerate(cuts):
        parts = [sdpa_attention_forward(module, query[b:b + 1, :, s:e], key[b:b + 1, :, s:e],
                                        value[b:b + 1, :, s:e], None, is_causal=True, **kwargs)[0]
                 for s, e in zip(row[:-1], row[1:])]
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows, dim=0), None


def register_loop_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(LOOP_SDPA, loop_packed_sdpa)
    AttentionMaskInterface.register(LOOP_SDPA, sdpa_mask)
    return LOOP_SDPA


def mask_attention(query, key, value, positions, groups):
    import torch

    seq = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 1).cumsum(-1)  # sample id per token
    length = positions.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal  # (B, L, L)
    k, v = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask[:, None]).transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--lengths", default="16,400", help="min,max sample length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch

    from mixtune.data import pack

    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    lo, hi = map(int, args.lengths.split(","))
    lengths_per_row = []
    for _ in range(args.rows):
        row, free = [], args.length
        while free > 0:
            n = min(rng.randint(lo, hi), free)
            row.append(n)
            free -= n
        lengths_per_row.append(row)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row]).to(args.device)
    torch.manual_seed(args.seed)
    shape = (args.rows, args.heads, args.length, args.head_dim)
    kv_shape = (args.rows, args.kv_heads, args.length, args.head_dim)
    q = torch.randn(shape, device=args.device, requires_grad=True)
    k = torch.randn(kv_shape, device=args.device, requires_grad=True)
    v = torch.randn(kv_shape, device=args.device, requires_grad=True)
    groups = args.heads // args.kv_heads
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)

    def batched():
        pos = positions.clone()  # a new batch each call: the layout is worked out every time, as per forward
        return pack.packed_sdpa_attention(module, q, k, v, None, position_ids=pos,
                                          scaling=args.head_dim ** -0.5)[0]

    ways = {"loop": lambda: loop_attention(q, k, v, lengths_per_row, groups), "batched": batched,
            "mask": lambda: mask_attention(q, k, v, positions, groups)}
    ref = ways["loop"]().detach()
    diffs = {name: (fn().detach() - ref).abs().max().item() for name, fn in ways.items()}
    times = {name: [] for name in ways}
    for _ in range(args.repeats + 1):
        for name, fn in ways.items():
            q.grad = k.grad = v.grad = None
            if args.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn().sum().backward()
            if args.device != "cpu":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1000)
    samples = sum(len(r) for r in lengths_per_row)
    print(f"# {args.rows} rows x {args.length} tokens, {samples} samples of {lo}-{hi} tokens; heads {args.heads} "
          f"(kv {args.kv_heads}) x {args.head_dim}; fp32 on {args.device}, torch threads {args.threads}; "
          f"fwd+bwd ms, median of {args.repeats} (first call dropped)")
    for name in ways:
        ms = statistics.median(times[name][1:])
        print(f"  {name:<8}{ms:>10.1f} ms   max_diff {diffs[name]:.1e}")
        print("RESULT " + json.dumps({"way": name, "rows": args.rows, "length": args.length, "samples": samples,
                                      "lengths": args.lengths, "ms": round(ms, 2), "max_diff": diffs[name]}))


if __name__ == "__main__":
    main()
