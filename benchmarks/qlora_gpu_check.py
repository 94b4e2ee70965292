"""GPU check of QLoRA (`quantization: 4bit | 8bit`) and of labelled-logits / vision checkpointing on CUDA.

1. For 4bit (NF4, double quantisation) and 8bit: `mixtune train` of a tiny Qwen2-VL with LoRA on the quantised
   language model (vision tower and projector unquantised), 40 steps; prints the first and last logged loss.
   Then `merge-lora` writes a full-precision merged checkpoint; prints max |logits(merged, fp32) -
   logits(adapters on the quantised base)| over a batch, against max |logits| (the quantisation tolerance).
2. labelled_logits_only on vs off in bf16 and fp32 on the GPU: |loss diff|.
Asserts nothing; prints RESULT lines. Needs bitsandbytes (pip install 'mixtune[qlora]'). Under a minute on an H100.

Run: PYTHONPATH=src python benchmarks/qlora_gpu_check.py
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from PIL import Image


def write_data(root: str) -> str:
    Image.new("RGB", (112, 112), (220, 30, 30)).save(os.path.join(root, "red.png"))
    Image.new("RGB", (112, 112), (30, 30, 220)).save(os.path.join(root, "blue.png"))
    records = [{"image": f"{c}.png", "conversations": [["<image>What colour is the shape?", c]]}
               for c in ("red", "blue") for _ in range(16)]
    path = os.path.join(root, "train.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main() -> None:
    from mixtune.config import build_config
    from mixtune.data.collate import PadCollator
    from mixtune.models.loading import load_model_and_processor
    from mixtune.models.registry import get_family
    from mixtune.tools.merge_lora import load_adapter_model, merge_lora
    from mixtune.train.loss import keep_labelled_positions
    from mixtune.train.qlora import Quantization
    from mixtune.train.run import train

    import transformers

    print("RESULT " + json.dumps({"check": "versions", "torch": torch.__version__,
                                  "transformers": transformers.__version__}))
    root = tempfile.mkdtemp(prefix="qlora_gpu_")
    model_dir = get_family("qwen2_vl").build_tiny(os.path.join(root, "model"))
    data = write_data(root)
    import importlib.util

    for bits in ("4bit", "8bit") if importlib.util.find_spec("bitsandbytes") else ():
        out = os.path.join(root, f"out_{bits}")
        raw = {"model_name_or_path": model_dir, "dataset": {"train": [{"name": "chatml_dataset", "data_files": data}]},
               "output_dir": out, "lora": True, "quantization": bits, "per_device_train_batch_size": 4,
               "learning_rate": 5e-3, "max_steps": 40, "logging_steps": 1, "save_strategy": "no",
               "disable_tqdm": True, "report_to": "none", "lora_dropout": 0.0}
        try:
            train(build_config(raw, root))
        except Exception as e:  # report and go on to the next setting
            print("RESULT " + json.dumps({"check": "qlora_train", "bits": bits, "error": f"{type(e).__name__}: {e}"}))
            continue
        with open(os.path.join(out, "trainer_state.json")) as f:
            losses = [h["loss"] for h in json.load(f)["log_history"] if "loss" in h]
        merged_dir = merge_lora(out, os.path.join(root, f"merged_{bits}"))
        family, merged, processor = load_model_and_processor(merged_dir)
        merged = merged.cuda().eval()
        _, base, _ = load_model_and_processor(model_dir, quantization=Quantization(bits))
        adapted = load_adapter_model(base, out).eval()
        from mixtune.data.dataset import build_split

        ds = build_split([{"name": "chatml_dataset", "data_files": data}], "train", processor, family, 512, root)
        batch = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)([ds[0], ds[20]])
        batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.no_grad():
            a, m = adapted(**batch).logits.float(), merged(**batch).logits.float()
        print("RESULT " + json.dumps({"check": "qlora", "bits": bits, "loss_first": losses[0], "loss_last": losses[-1],
                                      "merged_dtype": str(merged.dtype),
                                      "merged_vs_adapter_max_abs": (a - m).abs().max().item(),
                                      "max_abs_logit": m.abs().max().item()}))
    family, model, processor = load_model_and_processor(model_dir, "sdpa")
    from mixtune.data.dataset import build_split

    ds = build_split([{"name": "chatml_dataset", "data_files": data}], "train", processor, family, 512, root)
    batch = PadCollator(processor.tokenizer.pad_token_id, family.collate_media)([ds[0], ds[20], ds[3]])
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    from mixtune.train.loss import accepts_logits_to_keep

    if not accepts_logits_to_keep(model):
        print("RESULT " + json.dumps({"check": "labelled_logits_only", "supported": False}))
        return
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to("cuda", dtype).train()
        plain = m(**batch).loss.item()
        cut = m(**keep_labelled_positions(batch)).loss.item()
        print("RESULT " + json.dumps({"check": "labelled_logits_only", "dtype": str(dtype), "loss_plain": plain,
                                      "loss_labelled": cut, "abs_diff": abs(plain - cut)}))


if __name__ == "__main__":
    main()
