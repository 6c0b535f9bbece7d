import numpy as np
import pytest

from nanosd_lib import baseline


def test_seed_tiling_is_88_tiles():
    grid = baseline.tile_grid(4000, 3000, 512, 128)
    assert (grid.cols, grid.rows, grid.count) == (11, 8, 88)


def test_tiles_cover_the_photo_and_stay_inside():
    grid = baseline.tile_grid(4000, 3000, 512, 128)
    boxes = grid.boxes()
    assert len(boxes) == grid.count
    assert all(0 <= l < r <= 4000 and 0 <= t < b <= 3000 for l, t, r, b in boxes)
    assert max(r for _, _, r, _ in boxes) == 4000 and max(b for *_, b in boxes) == 3000
    covered = np.zeros((3000, 4000), dtype=bool)
    for l, t, r, b in boxes:
        covered[t:b, l:r] = True
    assert covered.all()  # every pixel of the photo lies in some tile

def test_small_photo_is_one_tile_and_bad_overlap_is_refused():
    assert baseline.tile_grid(300, 200, 512, 128).count == 1
    with pytest.raises(ValueError, match="overlap_px \\(512\\) must be below tile_px \\(512\\)"):
        baseline.tile_grid(4000, 3000, 512, 512)


def test_sd15_params_from_real_configs_on_meta():
    models = baseline.sd15_on_meta()
    assert baseline.count_params(models["unet"]) == 859_520_964
    assert baseline.count_params(models["vae"]) == 83_653_863
    assert baseline.count_params(models["text_encoder"]) == 123_060_480
    assert next(models["unet"].parameters()).is_meta


def test_memory_table():
    gb = baseline.memory_table(859_520_964)
    assert gb["fp32"] == pytest.approx(3.438, abs=1e-3)
    assert gb["int4"] == pytest.approx(gb["fp32"] / 8)
