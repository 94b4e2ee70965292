"""GPU check of MixToken packing: packed vs unpacked loss, per-token loss and gradients, and step times.

For tiny Qwen2-VL and LLaVA checkpoints on CUDA, for each attention path MixToken can take (SDPA with the
block-diagonal mask, mixtune's per-sample SDPA, flash-attention-2 varlen over one flattened row when
flash-attn is installed) in fp32 and bf16: the same samples are run padded (the reference, with the
same attention implementation, or SDPA for mixtune's) and packed; prints max |diff| of the loss, of the
per-token losses and of the parameter gradients, and fwd+bwd times. Asserts nothing; the last line
sums up. Takes well under a minute on an H100.

Run: PYTHONPATH=src python benchmarks/packing_gpu_check.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import tempfile
import time
from functools import partial

import torch
from PIL import Image

from mixtune.data.collate import PadCollator
from mixtune.data.dataset import build_split
from mixtune.data.encode import IGNORE_INDEX
from mixtune.data.pack import PACKED_SDPA, PACKED_VARLEN, PackCollator, PackedDataset, use_packed_sdpa
from mixtune.models.registry import get_family
from mixtune.models.loading import load_model_and_processor

FP32_TOL = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of this script only


def samples_for(model_dir: str, root: str, n: int = 24):
    import json
    import random

    family, _, processor = load_model_and_processor(model_dir)
    Image.new("RGB", (112, 112), (220, 30, 30)).save(os.path.join(root, "sq.png"))
    Image.new("RGB", (112, 56), (30, 30, 220)).save(os.path.join(root, "wide.png"))
    rng = random.Random(0)
    records = []
    for i in range(n):
        reply = " ".join(rng.choice(["red", "square", "on", "the", "left", "a", "blue", "shape"])
                         for _ in range(rng.choice([1, 3, 20, 120])))
        if i % 5 == 4:
            records.append({"messages": [{"role": "user", "content": "Say something."},
                                         {"role": "assistant", "content": reply}]})
        else:
            records.append({"image": rng.choice(["sq.png", "wide.png"]),
                            "conversations": [["<image>Describe the image.", reply]]})
    path = os.path.join(root, "data.json")
    with open(path, "w") as f:
        json.dump(records, f)
    ds = build_split([{"name": "chatml_dataset", "data_files": path}], "train", processor, family, 4096, root)
    return family, processor, [ds[i] for i in range(len(ds))]


def to_device(batch: dict, dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(DEVICE)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def run(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), out.logits.float().detach(), grads


def token_losses(logits, labels, spans):
    res = []
    for row, start, length in spans:
        lb = labels[row, start + 1: start + length]
        keep = lb != IGNORE_INDEX
        res.append(torch.nn.functional.cross_entropy(logits[row, start: start + length - 1][keep], lb[keep],
                                                     reduction="none"))
    return torch.cat(res)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(model, batch, repeats: int = 10) -> float:
    for _ in range(3):
        model(**batch).loss.backward()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        model(**batch).loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def check(model_dir, family, processor, samples, attn: str, dtype, max_length: int = 1024) -> dict:
    pad_id = processor.tokenizer.pad_token_id
    ref_attn = "sdpa" if attn in (PACKED_SDPA, PACKED_VARLEN, "sdpa") else attn
    model = load_model_and_processor(model_dir, ref_attn, dtype=dtype)[1].to(DEVICE).eval()
    packs = PackedDataset(samples, max_length, lengths=[len(s) for s in samples])
    rows = [packs[k] for k in range(len(packs))]
    order = [s for row in rows for s in row]
    flatten = attn.startswith("flash_attention")
    padded = PadCollator(pad_id)(order)
    ref_loss, ref_logits, ref_grads = run(model, to_device(padded, dtype))
    ref_time = timed(model, to_device(padded, dtype))
    if attn in (PACKED_SDPA, PACKED_VARLEN):
        use_packed_sdpa(model, attn)
    packed = PackCollator(pad_id, partial(family.pack_positions, model), flatten)(rows)
    loss, logits, grads = run(model, to_device(packed, dtype))
    packed_time = timed(model, to_device(packed, dtype))
    spans = []
    for r, row in enumerate([order] if flatten else rows):
        offset = 0
        for s in row:
            spans.append((r, offset, len(s)))
            offset += len(s)
    ref_tok = token_losses(ref_logits, padded["labels"].to(DEVICE), [(i, 0, len(s)) for i, s in enumerate(order)])
    got_tok = token_losses(logits, packed["labels"].to(DEVICE), spans)
    return {"loss_diff": abs(loss - ref_loss), "token_diff": (got_tok - ref_tok).abs().max().item(),
            "grad_diff": max((grads[k] - ref_grads[k]).abs().max().item() for k in grads),
            "padded_ms": 1e3 * ref_time, "packed_ms": 1e3 * packed_time,
            "shapes": f"{tuple(padded['input_ids'].shape)} -> {tuple(packed['input_ids'].shape)}"}


def main() -> None:
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must mean fp32 for the 1e-5 comparison
    torch.backends.cudnn.allow_tf32 = False
    flash = importlib.util.find_spec("flash_attn") is not None
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "no GPU: CPU smoke run"
    print(f"{where}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"flash_attn installed: {flash}")
    worst_fp32, rows = 0.0, []
    with tempfile.TemporaryDirectory() as root:
        for name in ("qwen2_vl", "llava"):
            model_dir = get_family(name).build_tiny(os.path.join(root, name))
            family, processor, samples = samples_for(model_dir, root)
            cases = [("sdpa", torch.float32), (PACKED_SDPA, torch.float32), ("eager", torch.float32),
                     ("sdpa", torch.bfloat16), (PACKED_SDPA, torch.bfloat16)]
            if DEVICE == "cuda":  # torch's own varlen flash attention: fp16 / bf16 only, as flash-attn
                cases.append((PACKED_VARLEN, torch.bfloat16))
            if flash:  # flash-attn runs fp16 / bf16 only: fp32 exactness is shown by the SDPA paths
                cases.append(("flash_attention_2", torch.bfloat16))
            if name == "llava" and DEVICE == "cuda":  # the Qwen-VL classes do not take flex_attention
                cases.append(("flex_attention", torch.float32))
            for attn, dtype in cases:
                try:
                    r = check(model_dir, family, processor, samples, attn, dtype)
                except Exception as e:  # report and go on: one failing path must not hide the others
                    print("RESULT " + json.dumps({"check": "packing", "family": name, "attn": attn,
                                                  "dtype": str(dtype)[6:], "failed": f"{type(e).__name__}: {e}"[:300]}))
                    print(f"{name:<9}{attn:<21}{str(dtype)[6:]:<9} FAILED {type(e).__name__}: {e}")
                    rows.append(False)
                    continue
                if dtype == torch.float32:
                    worst_fp32 = max(worst_fp32, r["token_diff"], r["grad_diff"], r["loss_diff"])
                rows.append(True)
                print("RESULT " + json.dumps({"check": "packing", "family": name, "attn": attn,
                                              "dtype": str(dtype)[6:], **{k: v for k, v in r.items()}}))
                print(f"{name:<9}{attn:<21}{str(dtype)[6:]:<9} loss {r['loss_diff']:.2e}  per-token "
                      f"{r['token_diff']:.2e}  grads {r['grad_diff']:.2e}  fwd+bwd padded {r['padded_ms']:.1f} ms"
                      f" packed {r['packed_ms']:.1f} ms  {r['shapes']}")
    print(f"RESULT GPU_CHECK paths_ok={sum(rows)}/{len(rows)} max_fp32_diff={worst_fp32:.2e} "
          f"fp32_exact={worst_fp32 <= FP32_TOL} flash_attn={flash}")


if __name__ == "__main__":
    main()
