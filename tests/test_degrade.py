import pytest
import torch
import torch.nn.functional as F
from skimage import data
from skimage.metrics import peak_signal_noise_ratio

from nanosd_lib import data as study_data, degrade


def photo(size: int = 256) -> torch.Tensor:
    return torch.from_numpy(data.astronaut()[:size, :size]).permute(2, 0, 1)[None] / 255.0


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_sr_x4_is_a_quarter_of_each_side_in_range():
    hq = torch.cat([photo(), photo().flip(-1)])[..., :256, :196]
    lq = degrade.sr_x4(hq, seeded(0))
    assert lq.shape == (2, 3, 64, 49)
    assert 0 <= lq.min() and lq.max() <= 1
    assert degrade.bicubic_up(lq, (256, 196)).shape == hq.shape


def test_same_seed_same_pairs_other_seed_other_pairs():
    hq = photo(128)
    for task in degrade.TASKS:
        first, again = degrade.degrade(hq, task, seeded(3)), degrade.degrade(hq, task, seeded(3))
        other = degrade.degrade(hq, task, seeded(4))
        assert torch.equal(first, again)
        assert (first - other).abs().mean() > 1e-3


def test_denoise_adds_unclipped_noise_of_the_asked_std():
    flat = torch.full((1, 3, 256, 256), 0.5)
    noisy = degrade.denoise(flat, seeded(0))
    assert (noisy - flat).std().item() == pytest.approx(25 / 255, rel=0.02)
    assert abs((noisy - flat).mean().item()) < 1e-3
    black = degrade.denoise(torch.zeros(1, 3, 64, 64), seeded(0))
    assert black.min() < 0  # not clipped: the noise stays zero-mean at black


def test_second_order_degrades_more_than_plain_bicubic():
    hq = photo()
    plain = degrade.bicubic_up(F.interpolate(hq, scale_factor=0.25, mode="bicubic", antialias=True),
                               (256, 256))
    lq = degrade.bicubic_up(degrade.sr_x4(hq, seeded(0)), (256, 256))
    psnr = [peak_signal_noise_ratio(hq[0].numpy(), x[0].numpy(), data_range=1.0) for x in (plain, lq)]
    assert psnr[1] < psnr[0] - 0.5, psnr


def test_bad_task_size_and_range_are_refused():
    with pytest.raises(ValueError, match="unknown task 'sr_x2'; allowed: 'sr_x4', 'denoise'"):
        degrade.degrade(photo(64), "sr_x2", seeded(0))
    with pytest.raises(ValueError, match="divisible by 4, got 63x64; crop the HQ image first"):
        degrade.sr_x4(photo(64)[..., :63, :], seeded(0))
    assert degrade.crop_to_multiple(photo(64)[..., :63, :62]).shape[-2:] == (60, 60)
    with pytest.raises(ValueError, match="must lie in \\[0, 1\\], got \\[-1.000"):
        degrade.sr_x4(study_data.to_signed(photo(64)), seeded(0))
    with pytest.raises(ValueError, match="first_scale must lie in \\(1/4, 1\\]"):
        degrade.SecondOrder(first_scale=(0.2, 0.9))
