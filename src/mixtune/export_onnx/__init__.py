"""`mixtune export --format onnx`: a checkpoint to ONNX graphs checked with onnxruntime, one module per family
(the ONNX packages are the optional extra `onnx`: pip install 'mixtune[onnx]')."""

from __future__ import annotations

import importlib
import importlib.util

from mixtune.errors import MixtuneError

# family name -> "module:function", the function (model_dir, out_dir) -> report dict
EXPORTERS = {
    "grounding_dino": "mixtune.export_onnx.grounding_dino:export_grounding_dino",
    "sam": "mixtune.export_onnx.sam:export_sam",
}


def export_onnx(model_dir: str, out_dir: str) -> dict:
    from mixtune.models.registry import family_for_checkpoint

    family = family_for_checkpoint(model_dir)
    if family.name not in EXPORTERS:
        raise MixtuneError(f"ONNX export is not available for {family.name} checkpoints; families with it: "
                           f"{', '.join(sorted(EXPORTERS))}")
    missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise MixtuneError(f"ONNX export needs {' and '.join(missing)}: pip install 'mixtune[onnx]'")
    module, function = EXPORTERS[family.name].split(":")
    return getattr(importlib.import_module(module), function)(model_dir, out_dir)
