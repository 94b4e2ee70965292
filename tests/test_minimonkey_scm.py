"""MiniMonkey's model path against PaddleMIX's own `MiniMonkeyChatModel` (tests/golden/minimonkey/scm_golden.npz,
made by make_golden_scm_paddlemix.py with PaddlePaddle 3.3.1 CPU + PaddleNLP 2.8.1): a published-style folder
(MiniMonkey's auto_map, no processor files) is claimed by the minimonkey family; an image cut with PaddleMIX's chat
layout gives the same pixels; the forward (InternVL2's, which MiniMonkey keeps) gives the same logits (fp32, 1e-4);
and generation with the Scale Compression Mechanism hands the language model the same compressed prompt and
produces the same greedy tokens."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mixtune.models.registry import family_for_checkpoint
from mixtune.native.minimonkey import MiniMonkeyChatModel, MiniMonkeyImageProcessor
from mixtune.native.minimonkey.msac import CHAT_LAYOUT, msac_tiles

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "minimonkey")
IMG_CONTEXT_ID = 127  # the fixture's <IMG_CONTEXT> (V - 1)
TILE = 56


def golden():
    return np.load(os.path.join(GOLDEN, "scm_golden.npz"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("minimonkey_golden")
    data = golden()
    state = {}
    for name in data.files:
        if name.startswith("w:"):
            key = name[2:]
            value = data[f"offset:{key}"] + data[name].astype(np.float32) * data[f"scale:{key}"]
            state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(GOLDEN, "scm_config.json")) as f:
        (path / "config.json").write_text(f.read())
    return str(path)


@pytest.fixture(scope="module")
def model(folder):
    loaded = MiniMonkeyChatModel.from_pretrained(folder, dtype=torch.float32)
    loaded.config.img_context_token_id = IMG_CONTEXT_ID
    return loaded.eval()


@pytest.fixture(scope="module")
def pixels_and_grid():
    image = Image.fromarray(golden()["image_u8"], "RGB")
    tiles, grid = msac_tiles(image, TILE, CHAT_LAYOUT)
    to_tensor = MiniMonkeyImageProcessor(image_size=TILE).to_tensor
    return torch.stack([to_tensor(t) for t in tiles]), grid


def test_published_folder_is_claimed_by_minimonkey(folder):
    assert family_for_checkpoint(folder).name == "minimonkey"
    raw = json.loads(open(os.path.join(folder, "config.json")).read())
    del raw["architectures"], raw["auto_map"]
    plain = os.path.join(folder, "plain")
    os.makedirs(plain, exist_ok=True)
    with open(os.path.join(plain, "config.json"), "w") as f:
        json.dump(raw, f)
    assert family_for_checkpoint(plain).name == "internvl_chat"  # InternVL2 itself stays InternVL2


def test_chat_layout_pixels_equal_paddlemix(pixels_and_grid):
    pixels, grid = pixels_and_grid
    assert tuple(grid) == tuple(golden()["detail_grid"]) == (3, 3)
    assert pixels.shape[0] == 14  # 4 adaptive tiles, 9 detail tiles, the thumbnail
    torch.testing.assert_close(pixels.sum((2, 3)), torch.from_numpy(golden()["pixel_sums"]), rtol=0, atol=2e-3)


def test_logits_match_paddlemix(model, pixels_and_grid):
    ids = torch.from_numpy(golden()["input_ids"].astype(np.int64))
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels_and_grid[0], attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits, torch.from_numpy(golden()["logits"]), rtol=0, atol=1e-4)


def scm_generate(model, pixels, grid):
    ids = torch.from_numpy(golden()["input_ids"].astype(np.int64))
    captured = {}
    language_generate = model.language_model.generate

    def spy(**kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].clone()
        return language_generate(**kwargs)

    model.language_model.generate = spy
    try:
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), use_scm=True,
                             target_aspect_ratio=grid, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    finally:
        del model.language_model.generate
    return out, captured["embeds"]


def test_scm_generation_matches_paddlemix(model, pixels_and_grid):
    out, embeds = scm_generate(model, *pixels_and_grid)
    expected = torch.from_numpy(golden()["scm_embeds"])
    assert embeds.shape == expected.shape == (1, 73 - 18 - 1, 64)  # half of 36 ranked image tokens kept, 1 dropped
    torch.testing.assert_close(embeds, expected, rtol=0, atol=1e-4)
    assert out.tolist() == golden()["scm_generated"].tolist()


def test_scm_follows_the_second_layer(model, pixels_and_grid):
    """The ranking reads layer 1's attention: another layer-1 key projection keeps other image tokens."""
    weight = model.language_model.model.layers[1].attention.wqkv.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(-1.5)
        _, embeds = scm_generate(model, *pixels_and_grid)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert (embeds - torch.from_numpy(golden()["scm_embeds"])).abs().max() > 1e-3


def test_scm_refuses_what_paddlemix_cannot_do(model, pixels_and_grid):
    ids = torch.from_numpy(golden()["input_ids"].astype(np.int64))
    with pytest.raises(ValueError, match="target_aspect_ratio"):
        model.generate(input_ids=ids, pixel_values=pixels_and_grid[0], use_scm=True, max_new_tokens=1)
    with pytest.raises(ValueError, match="batch of one"):
        model.generate(input_ids=ids.repeat(2, 1), pixel_values=pixels_and_grid[0].repeat(2, 1, 1, 1),
                       use_scm=True, target_aspect_ratio=(3, 3), max_new_tokens=1)
