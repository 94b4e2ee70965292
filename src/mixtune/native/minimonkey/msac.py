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

from PIL import Image

# InternVL2's grid search, shared with mixtune's InternVL2 port: candidates in PaddleMIX's order, nearest aspect
from mixtune.native.internvl_chat.processing_internvl_chat import closest_grid, tile_grids

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
    candidates = tile_grids(min_tiles, max_tiles)
    if detail is not None:
        candidates = [g for g in candidates if avoids_detail_grid(g, detail, rule)]
    grid = closest_grid(image.width / image.height, candidates, image.width, image.height, tile_size)
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
