"""GPU check of `use_liger_kernel`: Liger on gives the same loss and gradients as off, padded and MixToken-packed.

For tiny Qwen2-VL and LLaVA checkpoints on CUDA, fp32 (TF32 off) and bf16: the same batch through the model
as loaded and through a copy patched by transformers' own `apply_liger_kernel` (what the Trainer does for
`use_liger_kernel: true`), both in train mode (Liger's fused linear + cross-entropy runs only when training
with labels; the tiny configs have no dropout). Prints |loss diff| and max |grad diff| per case, then a
`mixtune train` of 20 steps with `use_liger_kernel: true` (first and last logged loss). Asserts nothing;
RESULT lines. Needs liger-kernel (pip install 'mixtune[liger]'; in gpu_session.sh its wheel travels in .whl/).
Well under a minute on an H100. Run: PYTHONPATH=src python benchmarks/liger_gpu_check.py
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import tempfile
from functools import partial

import torch

TOL = 1e-4  # the bar for Liger on vs off (fp32)


def main() -> None:
    import transformers
    from transformers.integrations.liger import apply_liger_kernel

    from mixtune.data.collate import PadCollator
    from mixtune.data.pack import PackCollator, PackedDataset
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import get_family
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its sibling, for the same samples
    from packing_gpu_check import samples_for, to_device

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print("RESULT " + json.dumps({"check": "liger_versions", "torch": torch.__version__,
                                  "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
                                  "liger": importlib.util.find_spec("liger_kernel") is not None}))
    if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
        print("RESULT " + json.dumps({"check": "liger", "skipped": "needs a CUDA GPU and liger-kernel"}))
        return
    root = tempfile.mkdtemp(prefix="liger_gpu_")
    worst = 0.0
    for name in ("qwen2_vl", "llava"):
        model_dir = get_family(name).build_tiny(os.path.join(root, name))
        family, processor, samples = samples_for(model_dir, root)
        pad = processor.tokenizer.pad_token_id
        for dtype in (torch.float32, torch.bfloat16):
            model = load_model_and_processor(model_dir, "sdpa", dtype=dtype)[1].to("cuda").train()
            patched = copy.deepcopy(model)
            apply_liger_kernel(patched, None)
            packs = PackedDataset(samples[:12], 1024, lengths=[len(s) for s in samples[:12]])
            pack_rows = PackCollator(pad, partial(family.pack_positions, model), collate_media=family.collate_media)
            batches = {"padded": PadCollator(pad, family.collate_media)(samples[:6]),
                       "packed": pack_rows([packs[k] for k in range(len(packs))])}
            for kind, batch in batches.items():
                got = {}
                for which, m in (("off", model), ("on", patched)):
                    try:
                        m.zero_grad(set_to_none=True)
                        loss = m(**to_device(batch, dtype)).loss
                        loss.backward()
                        got[which] = (loss.item(), {n: p.grad.float().clone() for n, p in m.named_parameters()
                                                    if p.grad is not None})
                    except Exception as e:
                        print("RESULT " + json.dumps({"check": "liger", "family": name, "dtype": str(dtype)[6:],
                                                      "batch": kind, "liger": which,
                                                      "failed": f"{type(e).__name__}: {e}"[:300]}))
                if len(got) < 2:
                    continue
                loss_diff = abs(got["on"][0] - got["off"][0])
                grad_diff = max((got["on"][1][k] - got["off"][1][k]).abs().max().item() for k in got["off"][1])
                if dtype == torch.float32:
                    worst = max(worst, loss_diff)
                print("RESULT " + json.dumps({"check": "liger", "family": name, "dtype": str(dtype)[6:], "batch": kind,
                                              "loss_off": got["off"][0], "loss_diff": loss_diff,
                                              "grad_diff": grad_diff}))
    print("RESULT " + json.dumps({"check": "liger_fp32_loss", "max_diff": worst, "within_1e-4": worst <= TOL}))
    train_with_liger(root)


def train_with_liger(root: str) -> None:
    """`mixtune train` with use_liger_kernel: true, 20 steps: the Trainer patches the model and the loss falls."""
    from mixtune.config import build_config
    from mixtune.train.run import train

    data = os.path.join(root, "train.json")
    with open(os.path.join(root, "data.json")) as f:
        records = json.load(f)
    with open(data, "w") as f:
        json.dump(records, f)
    out = os.path.join(root, "out_liger")
    raw = {"model_name_or_path": os.path.join(root, "qwen2_vl"),
           "dataset": {"train": [{"name": "chatml_dataset", "data_files": data}]}, "output_dir": out,
           "use_liger_kernel": True, "bf16": True, "per_device_train_batch_size": 4, "learning_rate": 5e-3,
           "max_steps": 20, "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True, "report_to": "none"}
    try:
        train(build_config(raw, root))
        with open(os.path.join(out, "trainer_state.json")) as f:
            losses = [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]
        print("RESULT " + json.dumps({"check": "liger_train", "first_loss": losses[0], "last_loss": losses[-1]}))
    except Exception as e:
        print("RESULT " + json.dumps({"check": "liger_train", "failed": f"{type(e).__name__}: {e}"[:300]}))


if __name__ == "__main__":
    main()
