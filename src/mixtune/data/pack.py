"""MixToken: several samples share each row of up to `max_length` tokens, and still never see each other.

Packing: first-fit-decreasing over the samples' token lengths (image tokens included) groups sample
indices into packs; `PackedDataset` serves one pack per item, and the Trainer's seeded sampler reshuffles
the order of packs every epoch. Ties between equal lengths are broken by a seeded shuffle, so the packs
are reproducible from the seed.

Isolation: `PackCollator` concatenates each pack's samples into one row, with each sample's images in
order, and gives every sample position ids that restart at 0 (for M-RoPE families the 3-D positions from
the model's own rope-index function, per sample, concatenated; see `Family.pack_positions`). With no 2-D
attention mask, transformers reads the restarts as sample boundaries: a block-diagonal causal mask for
SDPA / eager / flex, and cu_seqlens for flash-attention varlen, which only does so for a batch of one
row, so under flash-attention the collator joins all rows into one, unpadded. On the CPU, SDPA is
swapped for `PACKED_SDPA`, which runs causal SDPA over the samples alone, gathered into a few padded
batches of similar length (see `isolation_for`, `packed_sdpa_attention`). `use_cache=False`
is sent too: with a cache, transformers skips packed-sequence detection and samples would leak.

Loss: the first label of each sample is masked, so the last token of one sample is never trained to
predict the first token of the next. Every other label is where it was, so the loss (averaged over label
tokens, and the Trainer's `num_items_in_batch` count over `labels[..., 1:]`) covers exactly the tokens
that the same samples unpacked would: per-token losses and gradients match.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mixtune.data.collate import PadCollator, concat_media, pad_stack
from mixtune.data.encode import IGNORE_INDEX, Encoded
from mixtune.errors import DataError

log = logging.getLogger("mixtune")

# attention implementations whose packed path is varlen over one flattened row (cu_seqlens from positions)
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
# mixtune's SDPA for packed rows (registered below): attends within each sample only
PACKED_SDPA = "mixtune_packed_sdpa"


def text_positions(model, sample: Encoded) -> torch.Tensor:
    """`Family.pack_positions` for 1-D RoPE language models: 0..L-1."""
    return torch.arange(len(sample))


def sample_lengths(dataset) -> list[int]:
    """Token length of every sample; the dataset's own (cached) `lengths()` when it has one."""
    if hasattr(dataset, "lengths"):
        return list(dataset.lengths())
    # fallback: encode every sample once (images included), which is what the cached lengths avoid
    return [len(dataset[i]) for i in range(len(dataset))]


def first_fit_decreasing(lengths: Sequence[int], capacity: int, seed: int = 0) -> list[list[int]]:
    """Pack item indices into bins of `capacity`: longest first, each into the first bin it fits.

    A max-tree over the bins' free space finds the first fitting bin in O(log n), so a million samples
    pack in seconds. Within a bin, indices keep the order they were placed in.
    """
    n = len(lengths)
    too_long = [i for i in range(n) if lengths[i] > capacity]
    if too_long:
        raise ValueError(f"sample {too_long[0]} has {lengths[too_long[0]]} tokens, over the row size {capacity}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the seeded order
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = [0] * (2 * size)  # tree[size + b] = free space of bin b; unopened bins count as full capacity
    for b in range(size):
        tree[size + b] = capacity
    for node in range(size - 1, 0, -1):
        tree[node] = max(tree[2 * node], tree[2 * node + 1])
    bins: list[list[int]] = []
    for i in order:
        need, node = lengths[i], 1
        while node < size:  # descend to the leftmost leaf with enough room
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


class PackedDataset(torch.utils.data.Dataset):
    """A dataset of packs: item k is the list of samples first-fit-decreasing put into row k."""

    def __init__(self, dataset, max_length: int, seed: int = 0, lengths: Sequence[int] | None = None):
        self.dataset = dataset
        self.max_length = max_length
        self.seed = seed
        self.epoch = 0
        self.lengths = list(lengths) if lengths is not None else sample_lengths(dataset)
        self.packs = self.pack()

    def pack(self) -> list[list[int]]:
        try:
            return first_fit_decreasing(self.lengths, self.max_length, self.seed + self.epoch)
        except ValueError as e:
            raise DataError(f"{e}; raise max_length or shorten the sample") from None

    def set_epoch(self, epoch: int) -> None:
        """Re-pack for a new epoch: a dataset that redraws its samples per epoch (a weighted mixture) is
        redrawn first, and ties between equal lengths fall differently, so rows mix samples anew."""
        if epoch == self.epoch:
            return
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
            self.lengths = sample_lengths(self.dataset)
        self.packs = self.pack()

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[Encoded]:
        return [self.dataset[i] for i in self.packs[k]]

    def fill(self) -> float:
        """Real tokens over row capacity, across all packs."""
        return sum(self.lengths) / max(len(self.packs) * self.max_length, 1)


@dataclass
class PackCollator:
    """Packs -> one row each, positions restarting per sample; plain samples (eval) -> padded batch."""

    pad_token_id: int
    # sample -> its position ids, (L,) or (rows, L): `partial(family.pack_positions, model)`
    positions: Callable[[Encoded], torch.Tensor]
    flatten: bool = False  # flash-attention varlen: one row of all samples, no padding
    unpacked: Callable | None = None  # the collator for plain samples (eval); default PadCollator
    collate_media: Callable | None = None  # the family's, when pixel shapes vary per sample

    def __call__(self, batch: list) -> dict[str, torch.Tensor]:
        if batch and isinstance(batch[0], Encoded):
            return (self.unpacked or PadCollator(self.pad_token_id))(batch)
        rows: list[list[Encoded]] = [list(pack) for pack in batch]
        if self.flatten:
            rows = [[s for row in rows for s in row]]
        built = [self.build_row(row) for row in rows]
        length = max(r["input_ids"].shape[0] for r in built)
        inputs = {
            "input_ids": pad_stack([r["input_ids"] for r in built], length, self.pad_token_id),
            "labels": pad_stack([r["labels"] for r in built], length, IGNORE_INDEX),
            # the pad tail gets positions of its own, 0.., so it reads as one more (label-free) sample
            "position_ids": torch.stack([_pad_positions(r["position_ids"], length) for r in built], dim=-2),
            "use_cache": False,
        }
        for key in rows[0][0].token_fields:
            inputs[key] = pad_stack([r["token_fields"][key] for r in built], length, 0)
        # images travel in the same order as their tokens appear in the batch: row by row, sample by sample
        inputs.update((self.collate_media or concat_media)([s.media for row in rows for s in row]))
        return inputs

    def build_row(self, samples: list[Encoded]) -> dict:
        labels = []
        for s in samples:
            lab = s.labels.clone()
            lab[0] = IGNORE_INDEX  # the previous sample's last token must not learn to predict this one
            labels.append(lab)
        return {
            "input_ids": torch.cat([s.input_ids for s in samples]),
            "labels": torch.cat(labels),
            "position_ids": torch.cat([self.positions(s) for s in samples], dim=-1),
            "token_fields": {k: torch.cat([s.token_fields[k] for s in samples]) for k in samples[0].token_fields},
        }


def _pad_positions(pos: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - pos.shape[-1]
    if pad == 0:
        return pos
    tail = torch.arange(pad, dtype=pos.dtype).expand(*pos.shape[:-1], pad)
    return torch.cat([pos, tail], dim=-1)


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """SDPA over each packed sample alone, causal, found from where its positions restart.

    A block-diagonal mask is exact but still pays for every cross-sample block (cost L^2 per row); this
    pays about sum(len^2) and computes no cross-sample terms at all: the CPU/SDPA counterpart of
    flash-attention varlen. The samples of all rows are gathered into a few padded batches of similar
    length (`PackedLayout`), one causal SDPA call each, and the outputs gathered back into row order:
    a handful of tensor ops per layer however many samples a row holds, and the layout is worked out
    once per forward (not per layer). Padding sits at the end of each sample, where causal attention
    keeps it out of every real token's view. Anything that is not a packed row (eval batches,
    generation, the vision tower) goes to transformers' own SDPA unchanged, with its mask.
    """
    layout = packed_layout(position_ids, query) if query.shape[2] == key.shape[2] else None
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    batch, heads, length = query.shape[:3]

    def tokens(t):  # (B, heads, L, D) -> (B * L, heads, D)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[-1])

    q, k, v = tokens(query), tokens(key), tokens(value)
    outs = []
    for index in layout.buckets:  # (samples, longest) token indices: one padded batch of similar lengths
        out = sdpa_attention_forward(module, q[index].transpose(1, 2), k[index].transpose(1, 2),
                                     v[index].transpose(1, 2), None, is_causal=True, **kwargs)[0]
        outs.append(out.reshape(-1, heads, out.shape[-1]))  # (samples * longest, heads, D)
    out = torch.cat(outs)[layout.inverse]  # each token's output, back in row order
    return out.reshape(batch, length, heads, out.shape[-1]), None  # as sdpa_attention_forward returns


# how much longer than the shortest sample of a length bucket its longest may be: padding within a bucket
# costs at most BUCKET_SPREAD^2 times a sample's own attention, and fewer buckets mean fewer kernel calls
BUCKET_SPREAD = 2.0
MAX_BUCKETS = 4


@dataclass
class PackedLayout:
    """Where the packed samples of a batch go: `buckets[j]` is a (samples, longest) tensor of token indices
    into the flattened (B * L) batch, each sample's tokens in order then its own first token repeated as
    padding; `inverse[t]` is token t's slot in the buckets' outputs concatenated."""

    buckets: list[torch.Tensor]
    inverse: torch.Tensor
    cu_seqlens: torch.Tensor  # (S + 1,) int32: where each sample starts in the flattened batch, then its end
    longest: int  # the longest sample's length


def sample_layout(position_ids: torch.Tensor, rows: int, length: int) -> PackedLayout | None:
    """The layout of a batch from its positions, or None when no row holds more than one sequence
    (transformers' own rule, `find_packed_sequence_indices`: a sample starts where positions do not
    follow on by 1)."""
    if position_ids is None or position_ids.shape[-1] != length or position_ids.numel() != rows * length:
        return None
    pos = position_ids.reshape(rows, length)
    new = torch.ones_like(pos, dtype=torch.bool)
    new[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    if not new[:, 1:].any():
        return None
    device, new = pos.device, new.reshape(-1)
    total = rows * length
    starts = new.nonzero().flatten()  # (S,) first token of each sample (each row starts one)
    lengths = torch.diff(starts, append=torch.tensor([total], device=device))
    sample_of = new.cumsum(0) - 1  # (B * L,) which sample each token belongs to
    offset = torch.arange(total, device=device) - starts[sample_of]
    # buckets of similar length, longest first; the only Python here runs over buckets, not samples
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order].tolist()
    bounds, first = [], 0
    while first < len(sorted_lengths):
        longest = sorted_lengths[first]
        end = len(sorted_lengths) if len(bounds) == MAX_BUCKETS - 1 else \
            first + sum(1 for n in sorted_lengths[first:] if n * BUCKET_SPREAD >= longest)
        bounds.append((first, end, longest))
        first = end
    slot = torch.empty_like(starts)  # each sample's first slot in the concatenated bucket outputs
    buckets, base = [], 0
    for first, end, longest in bounds:
        members = order[first:end]
        steps = torch.arange(longest, device=device)
        inside = steps[None, :] < lengths[members][:, None]
        buckets.append(torch.where(inside, starts[members][:, None] + steps[None, :], starts[members][:, None]))
        slot[members] = base + torch.arange(end - first, device=device) * longest
        base += (end - first) * longest
    cu_seqlens = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    return PackedLayout(buckets, slot[sample_of] + offset, cu_seqlens, sorted_lengths[0])


_last_layout: tuple = (None, None)  # (weakref to the position ids, their layout): one per forward


def packed_layout(position_ids, query) -> PackedLayout | None:
    """`sample_layout`, worked out once for the position ids that every layer of a forward receives (the
    same tensor, recomputation under activation checkpointing included) and reused by the other layers."""
    global _last_layout
    if position_ids is None:
        return None
    ref, layout = _last_layout
    if ref is not None and ref() is position_ids:
        return layout
    layout = sample_layout(position_ids, query.shape[0], query.shape[2])
    _last_layout = (weakref.ref(position_ids), layout)
    return layout


def packed_varlen_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """torch's own varlen flash attention (`torch.nn.attention.varlen.varlen_attn`: CUDA, fp16 / bf16) over
    the packed samples of all rows at once, from the cu_seqlens of `PackedLayout`: flash-attention varlen
    without the flash-attn package, and without joining the rows into one. Elsewhere (not packed, CPU, fp32)
    it is transformers' SDPA. GPU only, so checked by benchmarks/packing_gpu_check.py, not by the CPU tests."""
    layout = packed_layout(position_ids, query) if query.shape[2] == key.shape[2] else None
    if layout is None or not query.is_cuda or query.dtype not in (torch.float16, torch.bfloat16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    batch, heads, length = query.shape[:3]

    def tokens(t):  # (B, heads, L, D) -> (B * L, heads, D)
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], t.shape[-1])

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # torch >= 2.12 / older
    if key.shape[1] != heads and "enable_gqa" not in params:
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // key.shape[1])
    elif key.shape[1] != heads:
        causal["enable_gqa"] = True
    out = varlen_attn(tokens(query), tokens(key), tokens(value), layout.cu_seqlens, layout.cu_seqlens,
                      layout.longest, layout.longest, scale=kwargs.get("scaling"), **causal)
    return out.reshape(batch, length, heads, out.shape[-1]), None


# torch's varlen attention for packed rows on a GPU (see packed_varlen_attention); not a default yet
PACKED_VARLEN = "mixtune_packed_varlen"

AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # the SDPA mask, for batches that are not packed
AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)
AttentionMaskInterface.register(PACKED_VARLEN, sdpa_mask)


def use_packed_sdpa(model, attention: str = PACKED_SDPA) -> None:
    """Switch the language model (only) from SDPA to `PACKED_SDPA` (or `PACKED_VARLEN`); not saved with the
    checkpoint."""
    subs = getattr(model.config, "sub_configs", {})
    # a language model at the config's top level with encoder sub-configs (InternLM-XComposer2's CLIP): "" is it alone
    target = {"text_config": attention} if "text_config" in subs else ({"": attention} if subs else attention)
    model.set_attn_implementation(target)


def isolation_for(attn_implementation: str | None, on_gpu: bool) -> str:
    """How packed samples are kept apart under an attention implementation:
    'varlen' (flash-attention: cu_seqlens from positions, one flattened row), 'per_sample_sdpa' (SDPA on
    CPU: switched to `PACKED_SDPA`), or 'mask' (eager, flex, and SDPA on a GPU: the block-diagonal causal
    mask transformers builds from the positions).

    Why SDPA differs by device: on the CPU, per-sample SDPA took a packed epoch from 1.1x to 2.5x the
    padded one's speed (benchmarks/packing.py); on an H100 with tiny models the per-sample kernel
    launches (one per sample then; now a few per layer, by length bucket) cost more than the masked
    blocks (85 vs 35 ms a step), and flash-attention is the GPU path. Whether the batched per-sample SDPA
    now beats the mask on a GPU is for benchmarks/gpu_throughput.py (`sdpa_packed` vs `sdpa`) to show.
    """
    if attn_implementation in VARLEN_ATTENTION:
        return "varlen"
    if attn_implementation in (PACKED_SDPA, PACKED_VARLEN) or (attn_implementation == "sdpa" and not on_gpu):
        return "per_sample_sdpa"
    return "mask"


def pack_for_training(train_set, family, model, pad_token_id: int, max_length: int, seed: int,
                      on_gpu: bool = False, unpacked: Callable | None = None):
    """The train set as packs, and the collator that builds their rows for this model (whose language
    model moves to `PACKED_SDPA` when it runs SDPA on the CPU)."""
    packed = PackedDataset(train_set, max_length, seed)
    text_config = getattr(model.config, "text_config", None) or model.config
    isolation = isolation_for(getattr(text_config, "_attn_implementation", None), on_gpu)
    if isolation == "per_sample_sdpa":
        use_packed_sdpa(model)
    collator = PackCollator(pad_token_id, partial(family.pack_positions, model), flatten=isolation == "varlen",
                            unpacked=unpacked, collate_media=family.collate_media)
    log.info("MixToken: %d samples packed into %d rows of up to %d tokens (%.1f%% of row capacity used; "
             "per_device_train_batch_size counts rows); samples kept apart by %s",
             len(train_set), len(packed), max_length, 100 * packed.fill(),
             {"varlen": "flash-attention varlen over one flattened row", "mask": "a block-diagonal causal mask",
              "per_sample_sdpa": "SDPA run per sample"}[isolation])
    return packed, collator
