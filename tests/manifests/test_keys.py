"""manifests.keys: key index → region, against a naive enumeration of the grid and the text slots."""

import pytest

from manifests.keys import ImageGrid, TextKey, image_grid, key_region, text_kind
from manifests.models import PRESET_GEOMETRY


def _naive_cells(frames, rows, cols):
    """Every (frame, row, col) in flattening order, and its region from the number of in-grid 4-neighbours."""
    cells = []
    for f in range(frames):
        for r in range(rows):
            for c in range(cols):
                neighbours = sum(0 <= r + dr < rows and 0 <= c + dc < cols for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
                cells.append((f, r, c, {2: "corner", 3: "edge", 4: "interior"}[neighbours]))
    return cells


@pytest.mark.parametrize("frames,rows,cols", [(1, 4, 4), (1, 3, 5), (2, 4, 6), (3, 2, 2)])
def test_image_keys_match_a_naive_enumeration(frames, rows, cols):
    grid = ImageGrid(rows=rows, cols=cols, frames=frames)
    for index, (f, r, c, region) in enumerate(_naive_cells(frames, rows, cols)):
        got = key_region(index, grid.count, grid, ())
        assert (got.frame, got.row, got.col, got.region, got.modality) == (f, r, c, region, "image")
        assert got.label == f"image:{region}"


def test_grid_for_tokens_covers_unet_scales_and_aspect_ratios():
    assert ImageGrid.for_tokens(64 * 64, 1024, 1024) == ImageGrid(64, 64)
    assert ImageGrid.for_tokens(4 * 6 * 2, 64, 96, frames=2) == ImageGrid(4, 6, 2)
    # SDXL-like: latent 13×13 (104 px), down-sampled by strided convs (ceil): 7×7, 4×4
    assert ImageGrid.for_tokens(49, 104, 104) == ImageGrid(7, 7)
    assert ImageGrid.for_tokens(16, 104, 104) == ImageGrid(4, 4)
    assert image_grid(PRESET_GEOMETRY["tiny-sd3"], 64, 64) == ImageGrid(4, 4)
    with pytest.raises(ValueError, match="do not tile"):
        ImageGrid.for_tokens(7, 64, 64)


def test_text_keys_follow_the_image_keys():
    text = tuple(TextKey("clip", i, tok, text_kind(att, spec)) for i, (tok, att, spec) in enumerate(
        [("<|startoftext|>", True, True), ("cat", True, False), ("<|endoftext|>", True, True), (",", False, False)]))
    grid = ImageGrid(2, 2)
    kinds = [key_region(4 + i, 4, grid, text) for i in range(4)]
    assert [k.region for k in kinds] == ["special", "content", "special", "padding"]
    assert [k.token for k in kinds] == ["<|startoftext|>", "cat", "<|endoftext|>", ","]
    assert all(k.modality == "text" and k.segment == "clip" for k in kinds)
    with pytest.raises(ValueError, match="past the 4 image and 4 text keys"):
        key_region(8, 4, grid, text)
