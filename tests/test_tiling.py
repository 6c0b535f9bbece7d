import pytest
import torch
from skimage import data

from nanosd_lib import tiling

TILE, OVERLAP = 128, 32  # the study's 512 / 128 at a quarter of the size


def photo(height: int, width: int) -> torch.Tensor:
    """A real photo crop as [1, 3, H, W] in [0, 1]."""
    crop = data.astronaut()[100:100 + height, 100:100 + width]
    return torch.from_numpy(crop).permute(2, 0, 1)[None] / 255.0


def conv_net(seed: int) -> torch.nn.Module:
    """A random conv net with zero padding and GroupNorm, like the VAE: a tile's output depends on its
    borders (zero padding) and on the whole tile (statistics), so tiles disagree where they meet."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.GroupNorm(4, 16), torch.nn.SiLU(),
        torch.nn.Conv2d(16, 3, 3, padding=1)).eval()


@pytest.mark.parametrize("size", [(100, 60), (128, 128), (60, 128), (7, 5)])
def test_one_tile_is_identical_to_untiled(size):
    image, net = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0)), conv_net(0)
    with torch.no_grad():
        tiled = tiling.restore_tiled(image, net, TILE, OVERLAP)
        untiled = net(tiling.pad_to_tile(image, TILE))[..., :size[0], :size[1]]
    assert tiled.shape == image.shape
    assert torch.equal(tiled, untiled)


def test_identity_fn_returns_the_input_so_weights_cover_and_sum_to_one():
    image = torch.rand(1, 3, 300, 200, generator=torch.Generator().manual_seed(1))
    for feather in (True, False):
        out = tiling.restore_tiled(image, lambda x: x.clone(), TILE, OVERLAP, feather=feather)
        torch.testing.assert_close(out, image, atol=1e-6, rtol=0)


def test_feathering_hides_seams_that_a_hard_cut_shows():
    image, ratios = photo(200, 300), []
    for seed in range(4):
        net = conv_net(seed)
        with torch.no_grad():
            reference = net(image)
            ratios.append([tiling.seam_error_ratio(tiling.restore_tiled(image, net, TILE, OVERLAP,
                                                                        feather=feather),
                                                   reference, TILE, OVERLAP)
                           for feather in (True, False)])
    assert all(feathered < hard for feathered, hard in ratios)
    mean_feathered = sum(r[0] for r in ratios) / len(ratios)
    mean_hard = sum(r[1] for r in ratios) / len(ratios)
    assert mean_feathered <= 1.10 and mean_hard >= 1.2, ratios


@pytest.mark.parametrize("size", [(257, 193), (193, 257), (129, 300)])
def test_odd_sizes_keep_their_shape(size):
    image = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = tiling.restore_tiled(image, conv_net(0), TILE, OVERLAP)
    assert out.shape == image.shape and torch.isfinite(out).all()


def test_batching_tiles_matches_one_at_a_time():
    image, net = photo(200, 300).repeat(2, 1, 1, 1), conv_net(1)
    with torch.no_grad():
        one = tiling.restore_tiled(image, net, TILE, OVERLAP, batch=1)
        many = tiling.restore_tiled(image, net, TILE, OVERLAP, batch=4, progress=True)
    torch.testing.assert_close(many, one, atol=1e-6, rtol=0)


def test_seam_mask_marks_band_around_interior_tile_edges():
    # 300 px wide: tiles at x = 0, 96, 172, so interior edges at 96, 128, 172 and 224.
    mask = tiling.seam_mask(100, 300, TILE, OVERLAP, band=4)
    columns = mask.all(dim=0).nonzero().flatten().tolist()
    assert columns == [c for s in (96, 128, 172, 224) for c in range(s - 4, s + 4)]
    assert not mask[:, 0].any()  # one row of tiles: no horizontal seams


def test_bad_tile_and_seamless_image_are_refused():
    with pytest.raises(ValueError, match="tile \\(100\\) must be a multiple of 8"):
        tiling.restore_tiled(torch.zeros(1, 3, 64, 64), lambda x: x, 100, 16)
    with pytest.raises(ValueError, match="overlap_px \\(128\\) must be below tile_px \\(128\\)"):
        tiling.restore_tiled(torch.zeros(1, 3, 300, 300), lambda x: x, 128, 128)
    with pytest.raises(ValueError, match="no seam pixels"):
        tiling.seam_error_ratio(torch.zeros(1, 3, 100, 60), torch.ones(1, 3, 100, 60), TILE, OVERLAP)
