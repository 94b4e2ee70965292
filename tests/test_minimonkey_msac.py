"""MiniMonkey's multi-scale adaptive cropping against PaddleMIX's own (tests/golden/minimonkey, made by
make_golden_paddlemix.py from PaddleMIX's `dynamic_preprocess` / `dynamic_preprocess2` and the tile layouts of its
MiniMonkey finetune script and chat demo): the same detail grid, the same number of tiles in the same order, every
tile equal pixel for pixel, and the same normalised pixel tensor."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mixtune.native.internvl_chat.processing_internvl_chat import closest_grid, tile_grids
from mixtune.native.minimonkey import MiniMonkeyImageProcessor
from mixtune.native.minimonkey.msac import CHAT_LAYOUT, TRAIN_LAYOUT, MsacLayout, avoids_detail_grid, msac_tiles

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "minimonkey", "golden.npz")
N_IMAGES = 9


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.mark.parametrize("layout_name", ["train", "chat"])
@pytest.mark.parametrize("k", range(N_IMAGES))
def test_tiles_equal_paddlemix(golden, k, layout_name):
    layout = TRAIN_LAYOUT if layout_name == "train" else CHAT_LAYOUT
    image = Image.fromarray(golden[f"src{k}"], "RGB")
    tiles, grid = msac_tiles(image, int(golden["tile"]), layout)
    expected = golden[f"{layout_name}{k}_tiles"]
    assert tuple(grid) == tuple(golden[f"{layout_name}{k}_grid"])
    assert len(tiles) == len(expected)
    got = np.stack([np.asarray(t) for t in tiles])
    assert np.array_equal(got, expected), f"tiles differ at {sorted(set(np.nonzero(got != expected)[0]))}"


def test_processor_pixels_equal_paddlemix(golden):
    """The processor (defaults: PaddleMIX's training layout) turns the image into PaddleMIX's pixel tensor."""
    processor = MiniMonkeyImageProcessor(image_size=int(golden["tile"]))
    pixels = processor(Image.fromarray(golden["src1"], "RGB"))["pixel_values"]
    torch.testing.assert_close(pixels, torch.from_numpy(golden["train1_pixel_values"]), rtol=0, atol=1e-6)


def test_the_fixture_covers_both_layers_and_the_ties(golden):
    """The cases the golden images exercise: a detail grid of one tile, adaptive grids chosen by the prior
    rule, and an aspect-ratio tie (25x20 is as near 1:1 as 3:2...)."""
    grids = {tuple(golden[f"train{k}_grid"]) for k in range(N_IMAGES)}
    assert (1, 1) in grids and len(grids) >= 6
    counts = [len(golden[f"chat{k}_tiles"]) for k in range(N_IMAGES)]
    assert min(counts) >= 5 and max(counts) >= 17


def test_a_changed_rule_breaks_the_match(golden):
    """The golden comparison is sharp: Mini-Monkey's own prior rule picks different adaptive grids here."""
    layout = MsacLayout(1, 12, 1, 4, adaptive_first=False, prior_rule="mini_monkey")
    differ = 0
    for k in range(N_IMAGES):
        tiles, _ = msac_tiles(Image.fromarray(golden[f"src{k}"], "RGB"), int(golden["tile"]), layout)
        expected = golden[f"train{k}_tiles"]
        differ += len(tiles) != len(expected) or not np.array_equal(np.stack([np.asarray(t) for t in tiles]),
                                                                     expected)
    assert differ >= 3


def test_prior_rules_by_hand():
    # a 2x3 detail grid: PaddleMIX drops 2x2 (2 divides 2); Mini-Monkey's rule keeps it (2 does not divide 3)
    assert not avoids_detail_grid((2, 2), (2, 3), "paddlemix")
    assert avoids_detail_grid((2, 2), (2, 3), "mini_monkey")
    assert not avoids_detail_grid((1, 2), (3, 5), "paddlemix")  # one column divides anything
    assert closest_grid(3.0, [(1, 1), (3, 1), (2, 2)], 300, 100, 448) == (3, 1)
    assert closest_grid(3.0, [], 300, 100, 448) == (1, 1)  # no adaptive grid left: one tile
    assert len(tile_grids(1, 12)) == sum(1 for i in range(1, 13) for j in range(1, 13) if i * j <= 12)
    with pytest.raises(ValueError, match="prior_rule"):
        MsacLayout(1, 12, 1, 4, adaptive_first=False, prior_rule="other")
    with pytest.raises(ValueError, match="1 <= min <= max"):
        MiniMonkeyImageProcessor(adaptive_min_patch=5, adaptive_max_patch=4)
