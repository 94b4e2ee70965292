"""MiniMonkey's multi-scale adaptive cropping (MSAC): one image -> the tiles MiniMonkey's vision tower reads.

InternVL2 cuts an image into a grid of square tiles whose shape best fits the image's aspect ratio (the "detail"
layer), plus one thumbnail of the whole image. MiniMonkey adds a second, coarser grid (the "adaptive" layer) chosen
among grids whose lines do not coincide with the detail grid's, so that objects cut by one grid are whole in the
other. What is computed here follows PaddleMIX (paddlemix/datasets/internvl_dataset.py `dynamic_preprocess`,
`dynamic_preprocess2`; the layouts of paddlemix/examples/minimonkey/minimonkey_chat_finetune.py and
chat_demo_minimonkey.py), checked tile for tile by tests/test_minimonkey_msac.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Grid = tuple[int, int]  # (columns, rows)


def _paddlemix_rule(grid: Grid, detail: Grid) -> bool:
    return detail[0] % grid[0] != 0 and detail[1] % grid[1] != 0


def _mini_monkey_rule(grid: Grid, detail: Grid) -> bool:
    return detail[0] % grid[0] != 0 or detail[1] % grid[1] != 0


# PaddleMIX keeps an adaptive grid only if it divides the detail grid in neither direction (so any grid with one
# column or one row is out); Mini-Monkey's own code (github.com/Yuliang-Liu/Monkey, project/mini_monkey) keeps
# it unless it divides the detail grid in both directions.
PRIOR_RULES = {"paddlemix": _paddlemix_rule, "mini_monkey": _mini_monkey_rule}


@dataclass(frozen=True)
class MsacLayout:
    """Tile counts of the two layers and their order. `adaptive_first`: PaddleMIX's chat demo puts the adaptive
    tiles first; its training set puts the detail tiles first. `prior_rule` says which adaptive grids are allowed
    next to a detail grid (see `avoids_detail_grid`)."""

    detail_min_tiles: int
    detail_max_tiles: int
    adaptive_min_tiles: int
    adaptive_max_tiles: int
    adaptive_first: bool
    thumbnail: bool = True
    prior_rule: str = "paddlemix"

    def __post_init__(self):
        if self.prior_rule not in PRIOR_RULES:
            raise ValueError(f"prior_rule must be one of {sorted(PRIOR_RULES)}, not {self.prior_rule!r}")
        for low, high in ((self.detail_min_tiles, self.detail_max_tiles),
                          (self.adaptive_min_tiles, self.adaptive_max_tiles)):
            if not 1 <= low <= high:
                raise ValueError(f"tile counts must satisfy 1 <= min <= max, got min {low}, max {high}")


# PaddleMIX's minimonkey finetune shell (min_dynamic_patch 1, max_dynamic_patch 12; adaptive layer 1..4) and its
# chat demo (load_image min 4 max 12; load_image2 min 3 max 7).
TRAIN_LAYOUT = MsacLayout(1, 12, 1, 4, adaptive_first=False)
CHAT_LAYOUT = MsacLayout(4, 12, 3, 7, adaptive_first=True)


def grid_candidates(min_tiles: int, max_tiles: int) -> list[Grid]:
    """Every grid with min..max tiles, fewest tiles first. Grids with equal tile counts keep the order of the
    Python set PaddleMIX builds them in: `closest_grid` breaks ties by that order, so it must be the same."""
    grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_tiles <= i * j <= max_tiles}
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, candidates: list[Grid], tile_size: int) -> Grid:
    """The candidate whose aspect ratio is nearest the image's. On a tie a later (larger) grid wins when the
    image has more than half its pixels. No candidate at all gives a single tile (1, 1)."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in candidates:
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid
    return best


def avoids_detail_grid(grid: Grid, detail: Grid, rule: str = "paddlemix") -> bool:
    return PRIOR_RULES[rule](grid, detail)


def cut_tiles(image: Image.Image, grid: Grid, tile_size: int) -> list[Image.Image]:
    """Resize to the grid (bicubic) and cut it into tiles, row by row."""
    cols, rows = grid
    resized = image.resize((cols * tile_size, rows * tile_size), Image.Resampling.BICUBIC)
    return [resized.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
            for r in range(rows) for c in range(cols)]


def grid_tiles(image: Image.Image, min_tiles: int, max_tiles: int, tile_size: int, thumbnail: bool,
               detail: Grid | None = None, rule: str = "paddlemix") -> tuple[list[Image.Image], Grid]:
    """One layer: the best-fitting grid's tiles, then the thumbnail (the whole image as one tile) when asked for
    and the grid has more than one tile. With `detail`, only grids that avoid that detail grid are candidates."""
    candidates = grid_candidates(min_tiles, max_tiles)
    if detail is not None:
        candidates = [g for g in candidates if avoids_detail_grid(g, detail, rule)]
    grid = closest_grid(image.width, image.height, candidates, tile_size)
    tiles = cut_tiles(image, grid, tile_size)
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles, grid


def msac_tiles(image: Image.Image, tile_size: int, layout: MsacLayout) -> tuple[list[Image.Image], Grid]:
    """All tiles of one image in the order MiniMonkey reads them, and the detail grid (PaddleMIX's
    `target_aspect_ratio`, which its chat path hands to the Scale Compression Mechanism).

    Training: detail tiles, adaptive tiles, then the detail layer's last image (the thumbnail when the detail grid
    has several tiles). Chat: adaptive tiles, detail tiles, then the adaptive layer's last image (its thumbnail,
    or its only tile: the whole image either way)."""
    image = image.convert("RGB")
    detail, grid = grid_tiles(image, layout.detail_min_tiles, layout.detail_max_tiles, tile_size, layout.thumbnail)
    if layout.adaptive_first:
        adaptive, _ = grid_tiles(image, layout.adaptive_min_tiles, layout.adaptive_max_tiles, tile_size,
                                 layout.thumbnail, detail=grid, rule=layout.prior_rule)
        return adaptive[:-1] + detail[:-1] + adaptive[-1:], grid
    adaptive, _ = grid_tiles(image, layout.adaptive_min_tiles, layout.adaptive_max_tiles, tile_size, False,
                             detail=grid, rule=layout.prior_rule)
    return detail[:-1] + adaptive + detail[-1:], grid


def tiles_to_pixels(tiles: list[Image.Image], tile_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(n_tiles, 3, tile_size, tile_size) float32: each tile resized to tile_size (bicubic; tiles already are),
    scaled to 0..1 and normalised, as PaddleMIX's `build_transform` (is_train=False) does."""
    arrays = []
    for tile in tiles:
        if tile.size != (tile_size, tile_size):
            tile = tile.resize((tile_size, tile_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(tile.convert("RGB"), dtype=np.float32) / np.float32(255.0))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((pixels - mean_t) / std_t).contiguous()
