"""SAM as two ONNX files, the way SAM is deployed: the image encoder (run once per image) and the prompt encoder +
mask decoder (run per prompt on the cached embedding), each checked with onnxruntime on the CPU against torch.

    image_encoder.onnx   pixel_values (B, 3, S, S)            -> image_embeddings (B, C, S/p, S/p)
    mask_decoder.onnx    image_embeddings, input_boxes (B, N, 4)          -> pred_masks (B, N, 1, S/p*4, S/p*4),
                         (or input_points (B, N, P, 2) + input_labels)       iou_scores (B, N, 1)

Pixel values and prompts are what SamProcessor gives (boxes and points in the resized image's pixels); the
processor saved beside the files does that preprocessing and `post_process_masks` the upscaling.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mixtune.errors import MixtuneError

TOLERANCE = 1e-3  # the largest |onnxruntime - torch| accepted on the check inputs
OPSET = 17


class ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.get_image_embeddings(pixel_values)


class BoxMaskDecoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, input_boxes):
        out = self.model(image_embeddings=image_embeddings, input_boxes=input_boxes, multimask_output=False)
        return out.pred_masks, out.iou_scores


class PointMaskDecoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_embeddings, input_points, input_labels):
        out = self.model(image_embeddings=image_embeddings, input_points=input_points, input_labels=input_labels,
                         multimask_output=False)
        return out.pred_masks, out.iou_scores


def check_inputs(model, prompt: str, batch: int = 2, objects: int = 3, seed: int = 0) -> tuple[dict, dict]:
    """Random pixel values and in-image prompts of the model's own sizes: the encoder's and decoder's inputs."""
    g = torch.Generator().manual_seed(seed)
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixels)
    if prompt == "box":
        corners = torch.rand(batch, objects, 2, 2, generator=g) * size
        prompts = {"input_boxes": torch.cat([corners.min(2).values, corners.max(2).values], -1)}
    else:
        prompts = {"input_points": torch.rand(batch, objects, 1, 2, generator=g) * size,
                   "input_labels": torch.ones(batch, objects, 1, dtype=torch.int64)}
    return {"pixel_values": pixels}, {"image_embeddings": embeddings, **prompts}


def export_module(module, inputs: dict, path: str, outputs: list[str], dynamic: dict) -> None:
    torch.onnx.export(module, tuple(inputs.values()), path, input_names=list(inputs), output_names=outputs,
                      dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def max_difference(path: str, module, inputs: dict) -> float:
    """The largest |onnxruntime - torch| over the module's outputs, on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = module(**inputs)
    want = want if isinstance(want, tuple) else (want,)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want))


def export_sam(model_dir: str, out_dir: str, prompt: str = "box") -> dict:
    """Write image_encoder.onnx and mask_decoder.onnx (+ the processor) to out_dir; check both with onnxruntime."""
    from transformers import SamModel, SamProcessor

    if prompt not in ("box", "point"):
        raise MixtuneError(f"SAM's ONNX decoder takes box or point prompts, not {prompt!r}")
    model = SamModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    os.makedirs(out_dir, exist_ok=True)
    encoder_inputs, decoder_inputs = check_inputs(model, prompt)
    encoder, decoder = ImageEncoder(model), (BoxMaskDecoder if prompt == "box" else PointMaskDecoder)(model)
    paths = {"image_encoder": os.path.join(out_dir, "image_encoder.onnx"),
             "mask_decoder": os.path.join(out_dir, "mask_decoder.onnx")}
    export_module(encoder, encoder_inputs, paths["image_encoder"], ["image_embeddings"],
                  {"pixel_values": {0: "batch"}, "image_embeddings": {0: "batch"}})
    prompt_axes = {k: {0: "batch", 1: "objects"} for k in decoder_inputs if k != "image_embeddings"}
    export_module(decoder, decoder_inputs, paths["mask_decoder"], ["pred_masks", "iou_scores"],
                  {"image_embeddings": {0: "batch"}, **prompt_axes,
                   "pred_masks": {0: "batch", 1: "objects"}, "iou_scores": {0: "batch", 1: "objects"}})
    SamProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
    # checked on other inputs than the traced ones: another batch size and object count (the dynamic axes)
    enc_check, dec_check = check_inputs(model, prompt, batch=3, objects=2, seed=1)
    differences = {"image_encoder": max_difference(paths["image_encoder"], encoder, enc_check),
                   "mask_decoder": max_difference(paths["mask_decoder"], decoder, dec_check)}
    for name, diff in differences.items():
        if not diff <= TOLERANCE:
            raise MixtuneError(f"the exported {name} differs from torch by {diff:.2e} (over {TOLERANCE:g}): "
                               "the ONNX export is not faithful for this checkpoint")
    return {"format": "onnx", "family": "sam", "prompt": prompt, "files": paths,
            "max_abs_difference": differences, "tolerance": TOLERANCE}
