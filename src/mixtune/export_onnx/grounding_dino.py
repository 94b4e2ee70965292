"""Grounding DINO to ONNX: one graph from (pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids)
to (logits, pred_boxes), checked against torch with onnxruntime on the same inputs."""

from __future__ import annotations

import os

import torch

INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("logits", "pred_boxes")


class DetectionGraph(torch.nn.Module):
    """The model with plain tensor inputs and outputs, as the exporter traces it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask, token_type_ids):
        out = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids,
                         attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        return out.logits, out.pred_boxes


def phrase_masks_without_cummax(input_ids: torch.LongTensor, special_tokens: torch.LongTensor):
    """transformers' `generate_masks_with_special_tokens_and_transfer_map` (each token attends within its
    phrase; positions restart after each delimiter) with the same results, written without `cummax` /
    `cummin` / `isin`, which ONNX has no operator for, and without a boolean `eye`, which onnxruntime lacks:
    the previous and next delimiter of each position are a max / min over a (positions x positions)
    comparison instead of a running scan."""
    batch_size, seq_len = input_ids.shape
    device = input_ids.device
    special_mask = (input_ids[..., None] == special_tokens.to(device)).any(-1)
    indices = torch.arange(seq_len, device=device)
    at_or_before = indices[None, :] <= indices[:, None]  # [i, j]: j <= i
    # previous delimiter strictly before i: the latest j < i that is special (-1 if none)
    before = (indices[None, :] < indices[:, None])[None] & special_mask[:, None, :]
    prev_special = torch.where(before, indices[None, None, :], -1).amax(-1)
    # next delimiter at or after i (seq_len if none)
    after = (~at_or_before | (indices[None, :] == indices[:, None]))[None] & special_mask[:, None, :]
    next_special = torch.where(after, indices[None, None, :], seq_len).amin(-1)
    valid_block = (next_special != 0) & (next_special != seq_len - 1) & (next_special != seq_len)
    attention_mask = (next_special[:, :, None] == next_special[:, None, :]) & valid_block[:, None, :]
    attention_mask = (indices[None, :] == indices[:, None])[None] | attention_mask  # (no bool EyeLike in onnxruntime)
    position_ids = indices[None, :] - prev_special - 1
    position_ids = torch.where(valid_block, position_ids, torch.zeros_like(position_ids))
    return attention_mask, torch.clamp(position_ids, min=0).to(torch.long)


class exportable_phrase_masks:
    """Within the block, Grounding DINO computes its phrase masks with `phrase_masks_without_cummax`."""

    def __enter__(self):
        from transformers.models.grounding_dino import modeling_grounding_dino as m

        self.module, self.original = m, m.generate_masks_with_special_tokens_and_transfer_map
        m.generate_masks_with_special_tokens_and_transfer_map = phrase_masks_without_cummax
        return self

    def __exit__(self, *exc):
        self.module.generate_masks_with_special_tokens_and_transfer_map = self.original
        return False


def example_inputs(processor) -> dict:
    """A batch of two (noise images, prompts of different lengths): noise so that the two-stage query selection
    has no ties (on a blank image many scores are equal, and torch and onnxruntime may pick different ones)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    size = processor.image_processor.size
    side = size.get("height") or size.get("shortest_edge") or 224
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(2)]
    return dict(processor(images=images, text=["a . b .", "a ."], padding=True, return_tensors="pt"))


def export_grounding_dino(model_dir: str, out_dir: str, check: bool = True) -> dict:
    """`model.onnx` (+ the processor files) in out_dir; with `check`, onnxruntime's outputs on example inputs
    compared with torch's (`max_abs_diff`)."""
    from transformers import AutoProcessor, GroundingDinoForObjectDetection

    # the default attention: with attn_implementation="eager" transformers 5.24's BERT adds the boolean phrase
    # mask to its scores instead of masking (tokens then see other phrases), and the outputs change
    model = GroundingDinoForObjectDetection.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = example_inputs(processor)
    args = tuple(inputs[k] for k in INPUTS)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "model.onnx")
    graph = DetectionGraph(model).eval()
    dynamic = {"pixel_values": {0: "batch", 2: "height", 3: "width"}, "pixel_mask": {0: "batch", 1: "height",
               2: "width"}, **{k: {0: "batch", 1: "text"} for k in INPUTS[2:]},
               **{k: {0: "batch"} for k in OUTPUTS}}
    # the TorchScript exporter (dynamo=False). torch 2.14's torch.export path (dynamo=True) fails here: at the
    # Swin backbone's attention ("Cannot view a tensor with shape [4, 16, 2, 32] ... as (4, 16, 64)" while
    # decomposing), and with eager attention at aten._is_all_true, a runtime check with no ONNX operator
    with exportable_phrase_masks(), torch.no_grad():
        torch.onnx.export(graph, args, path, input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=dynamic, opset_version=17, dynamo=False)
    processor.save_pretrained(out_dir)
    report = {"onnx": path, "inputs": list(INPUTS), "outputs": list(OUTPUTS)}
    if check:
        report["max_abs_diff"] = compare_with_torch(graph, path, inputs)
    return report


def run_onnx(path: str, inputs: dict) -> list:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUTS), {k: inputs[k].numpy() for k in INPUTS})


@torch.no_grad()
def compare_with_torch(graph, path: str, inputs: dict) -> float:
    """The largest absolute difference between onnxruntime's and torch's outputs, over finite entries (logits
    past the prompt are -inf in both)."""
    import numpy as np

    expected = graph(*(inputs[k] for k in INPUTS))
    worst = 0.0
    for got, want in zip(run_onnx(path, inputs), expected):
        want = want.numpy()
        finite = np.isfinite(want)
        if not np.array_equal(finite, np.isfinite(got)):
            return float("inf")
        worst = max(worst, float(np.abs(got[finite] - want[finite]).max()))
    return worst
