"""The quality measures on real photos (Kodak tiles) and torchvision's real ImageNet MobileNetV2."""
import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.functional import gaussian_blur

from nanosd_lib import data, quality


@pytest.fixture(scope="module")
def net(study_root):
    return quality.MobileNetFeatures(quality.weights_path(study_root))


@pytest.fixture(scope="module")
def kodak(study_root):
    return data.to_unit(data.kodak_tiles(data.Corpus(study_root), 128))[::3]  # 20 of the 60 tiles, in [0, 1]


def blur(x, level):
    return gaussian_blur(x, kernel_size=4 * level + 1, sigma=float(level))


def jpeg(x, quality_):
    return torch.stack([decode_jpeg(encode_jpeg((t * 255).round().to(torch.uint8), quality=quality_)).float() / 255
                        for t in x])


def noise(x, sigma):
    return (x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


DEGRADATIONS = {"blur": (blur, [1, 2, 4]), "jpeg": (jpeg, [60, 25, 5]), "noise": (noise, [0.04, 0.1, 0.25])}


def test_the_weights_are_torchvisions_imagenet_file(net, study_root):
    coffee = data.to_unit(data.Corpus(study_root).tensor("coffee"))
    p = net.logits(coffee).softmax(-1)[0]
    assert p.argmax().item() == 967 and p.max() > 0.9  # ImageNet class 967: espresso


def test_missing_or_changed_weights_are_refused(tmp_path, study_root):
    with pytest.raises(quality.WeightsError, match="run the gather_photos stage"):
        quality.MobileNetFeatures(tmp_path / "none.pth")
    bad = tmp_path / "mobilenet_v2-b0353104.pth"
    bad.write_bytes(quality.weights_path(study_root).read_bytes()[:-8] + b"12345678")
    with pytest.raises(quality.WeightsError, match="sha256 differs"):
        quality.MobileNetFeatures(bad)


@pytest.mark.parametrize("kind", list(DEGRADATIONS))
def test_every_distance_rises_with_the_strength_of_a_degradation(net, kodak, kind):
    fn, levels = DEGRADATIONS[kind]
    clean = quality.pooled_features(net, kodak)
    rows = []
    for level in levels:
        worse = fn(kodak, level)
        feats = quality.pooled_features(net, worse)
        p = quality.paired(net, worse, kodak)
        rows.append({"lpips_mnv2": p["lpips_mnv2"], "-psnr": -p["psnr"], "1-ssim": 1 - p["ssim"],
                     "1-ms_ssim": 1 - p["ms_ssim"], "taFD[mnv2]": quality.frechet(feats, clean),
                     "taKD[mnv2]": quality.kernel(feats, clean)})
    for key in rows[0]:
        values = [r[key] for r in rows]
        assert values[0] < values[1] < values[2], (kind, key, values)


def test_frechet_is_clean_fids_and_exact_when_the_covariances_are_singular():
    from cleanfid import fid

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 12)), 0.5 + 2.0 * rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    assert quality.frechet(a, b) == pytest.approx(fid.fid_from_feats(a, b), rel=1e-9)  # n > d: well conditioned
    a, b = rng.normal(size=(6, 40)), rng.normal(size=(9, 40)) + 1.0  # n < d: both covariances singular
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.linalg.eigvals(sa @ sb).real.clip(0).__pow__(0.5).sum()  # tr sqrt, from the eigenvalues
    exact = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross
    assert quality.frechet(a, b) == pytest.approx(exact, rel=1e-6)
    assert quality.frechet(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match=r"two \[n >= 2, d\] feature sets of one width"):
        quality.frechet(a, b[:, :10])


def test_fd_between_halves_of_real_crops_is_below_fd_to_blurred_copies(net, kodak):
    a, b = kodak[0::2], kodak[1::2]
    fa = quality.pooled_features(net, a)
    assert quality.frechet(fa, quality.pooled_features(net, b)) < \
        quality.frechet(fa, quality.pooled_features(net, blur(b, 2)))


def test_kernel_distance_is_seeded_and_leaves_numpy_alone(net, kodak):
    fa, fb = quality.pooled_features(net, kodak[:10]), quality.pooled_features(net, kodak[10:])
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    assert quality.kernel(fa, fb, seed=1) == quality.kernel(fa, fb, seed=1)
    assert (np.random.get_state()[1] == before).all()


def test_caption_accuracy_counts_nearest_photos(net, kodak):
    reference, labels = kodak[:12], torch.arange(12) // 3  # 4 "photos", 3 tiles each
    samples = torch.stack([kodak[[0, 1]], kodak[[3, 4]], kodak[[6, 7]], kodak[[0, 2]]])  # last prompt: wrong
    got = quality.caption_accuracy(net, samples, reference, labels)
    assert got["accuracy"] == pytest.approx(0.75) and got["chance"] == 0.25
    assert got["per_prompt"] == [1.0, 1.0, 1.0, 0.0]


def test_layout_accuracy_finds_the_photo_by_its_colours_in_their_places(kodak):
    reference, labels = kodak[:12], torch.arange(12) // 3
    soft = blur(kodak[:12], 4)  # the detail gone, the colour layout kept
    samples = torch.stack([soft[[0, 1]], soft[[3, 4]], soft[[6, 7]], soft[[0, 2]]])  # last prompt: wrong
    got = quality.layout_accuracy(samples, reference, labels)
    assert got["accuracy"] == pytest.approx(0.75) and got["per_prompt"] == [1.0, 1.0, 1.0, 0.0]


def test_layout_accuracy_sees_where_the_colours_are_only_above_one_pixel():
    split, grey = torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.45)
    split[..., 4:] = 0.8  # photo 0: dark left, bright right (mean 0.5); photo 1: flat grey (mean 0.45)
    drawn = torch.full((3, 8, 8), 0.1)
    drawn[..., 4:] = 0.8  # photo 0's layout, photo 1's mean colour
    samples, reference = torch.stack([drawn, grey])[:, None], torch.stack([split, grey])
    assert quality.layout_accuracy(samples, reference, torch.tensor([0, 1]), px=4)["per_prompt"] == [1.0, 1.0]
    assert quality.layout_accuracy(samples, reference, torch.tensor([0, 1]), px=1)["per_prompt"] == [0.0, 1.0]


class _Layers(torch.nn.Module):
    """Stands in for clean-fid's Inception trunk: [B, 3, 299, 299] -> [B, 2048, 1, 1]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2048, 16, stride=16)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x)), 1)


class _Inception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = _Layers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def test_real_metrics_are_computed_when_their_weights_are_on_disk(tmp_path, monkeypatch):
    """The real metrics' code path through clean-fid and lpips themselves. Their weights cannot be had
    offline, so stand-ins with random weights are put where the packages look (a TorchScript module
    with clean-fid's interface, torchvision's AlexNet file name): the values are meaningless, the
    calls, resizing and pairing are the real ones."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    torch.manual_seed(0)
    images = {"teacher": torch.rand(6, 3, 32, 32)}
    images["same"] = images["teacher"]
    images["copy"] = images["teacher"].clone()
    images["other"] = (images["teacher"] + 0.3 * torch.randn(6, 3, 32, 32)).clamp(0, 1)
    assert quality.real_metrics() == {"inception": None, "alexnet": None} and quality.real_scores(images) == {}

    hub.mkdir(parents=True)
    torch.jit.script(_Inception()).save(str(hub / quality.INCEPTION))
    assert quality.real_metrics()["inception"] == str(hub / quality.INCEPTION)
    scores = quality.real_scores(images, batch=4)
    assert set(scores) == set(images) and all(set(r) == {"taFID"} for r in scores.values())
    assert abs(scores["teacher"]["taFID"]) < 1e-6 and abs(scores["copy"]["taFID"]) < 1e-6
    assert scores["other"]["taFID"] > 1e-3

    torch.save(torchvision.models.alexnet().state_dict(), hub / quality.ALEXNET)
    scores = quality.real_scores(images, batch=4)
    assert all(set(r) == {"taFID", "LPIPS"} for r in scores.values())
    assert scores["teacher"]["LPIPS"] == 0 and scores["same"] == scores["teacher"]
    assert scores["other"]["LPIPS"] > 0
    (hub / quality.ALEXNET).unlink()  # 244 MB that pytest would otherwise keep among its last three runs


@pytest.mark.parametrize("side, scales", [(128, 4), (384, 5), (176, 5), (175, 4), (99, 4), (98, 3), (88, 3), (44, 3),
                                          (43, 2)])
def test_ms_ssim_takes_every_scale_the_size_allows(study_root, side, scales):
    assert quality.ms_ssim_scales(side) == scales
    corpus = data.Corpus(study_root)
    photo = data.to_unit(corpus.tensor(corpus.names("test")[0]))  # a Kodak photo, 384 x 512
    crop = photo[..., :side, :side]  # torchmetrics refuses a scale too many
    score = quality.paired(None, (crop + 0.05).clamp(0, 1), crop)["ms_ssim"]
    assert 0.5 < score < 1.0
    if scales < 5:  # one scale more is refused
        from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as ms_ssim
        with pytest.raises(ValueError):
            ms_ssim(crop, crop, data_range=1.0, betas=(1 / (scales + 1),) * (scales + 1))
