"""Evaluating models against the teacher: shared-noise samples, distances, dominance, interpolation.

Every model is sampled on the same fixed (prompt, noise) pairs as the teacher (a fresh draw, disjoint
from the search's), so distribution distances (`taFD[mnv2]`, `taKD[mnv2]`) and paired ones (PSNR,
`lpips_mnv2` against the teacher's image of the same pair) both compare like with like.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from . import quality, training

OBJECTIVES = ("quality", "latency_ms", "params")  # all minimised, as in the search


def pairs(teacher, prompts: list[str], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`n` (prompt index, text state, starting noise) triples: every prompt in turn, noise from `seed`."""
    g = torch.Generator().manual_seed(seed)
    index = torch.arange(n) % len(prompts)
    text = teacher.encode_prompts(list(prompts))[index]
    px = teacher.latent_px
    return index, text, torch.randn(n, teacher.unet.config.in_channels, px, px, generator=g)


@dataclass(frozen=True)
class Target:
    """The teacher's images of the evaluation pairs and what every model is compared with there: their
    pooled features and their `lpips_mnv2` taps, each computed once for all the models."""
    images: torch.Tensor
    feats: np.ndarray
    taps: list[torch.Tensor]


@torch.no_grad()
def target(net, teacher_images: torch.Tensor) -> Target:
    return Target(teacher_images, quality.pooled_features(net, teacher_images),
                  quality.lpips_taps(net, teacher_images.clamp(0, 1).float()))


@torch.no_grad()
def score(net, images: torch.Tensor, target: Target, prompt_index: torch.Tensor, reference: torch.Tensor,
          reference_labels: torch.Tensor, seed: int) -> dict[str, float]:
    """Distribution and paired distances to the teacher's images, and caption accuracy.

    The images' pooled features are computed once and serve both the distances and caption accuracy;
    of the paired measures only PSNR and `lpips_mnv2` are reported, so SSIM is not computed."""
    feats = quality.pooled_features(net, images)
    lpips = float(quality.lpips_between(quality.lpips_taps(net, images.clamp(0, 1).float()), target.taps).mean())
    p = int(prompt_index.max()) + 1
    each = min(int((prompt_index == i).sum()) for i in range(p))  # N need not divide by the prompts
    rows = torch.cat([torch.nonzero(prompt_index == i).flatten()[:each] for i in range(p)]).numpy()
    caption = quality.caption_accuracy(net, feats[rows].reshape(p, each, -1), reference, reference_labels)
    return {"taFD[mnv2]": quality.frechet(feats, target.feats),
            "taKD[mnv2]": quality.kernel(feats, target.feats, seed=seed),
            "psnr_vs_teacher": quality.mean_psnr(images, target.images), "lpips_mnv2_vs_teacher": lpips,
            "caption_accuracy_mnv2": caption["accuracy"]}


def dominance(table: pd.DataFrame, members: list[str], baselines: list[str],
              objectives=OBJECTIVES) -> pd.DataFrame:
    """For each baseline and member: does the member strictly dominate the baseline (no worse on every
    objective, better on at least one)? One row per baseline, one column per member."""
    out = {}
    for b in baselines:
        row = {}
        for m in members:
            mine, theirs = table.loc[m, list(objectives)], table.loc[b, list(objectives)]
            row[m] = bool((mine <= theirs).all() and (mine < theirs).any())
        out[b] = row
    return pd.DataFrame.from_dict(out, orient="index")


def slerp(a: torch.Tensor, b: torch.Tensor, frames: int) -> torch.Tensor:
    """Spherical interpolation between two noise tensors (Gaussian noise lives near a sphere, so a
    straight line would pass through lower-norm, off-distribution latents)."""
    fa, fb = a.flatten(), b.flatten()
    omega = torch.acos((fa @ fb / (fa.norm() * fb.norm())).clamp(-1, 1))
    ts = torch.linspace(0, 1, frames)
    if omega.abs() < 1e-6:
        return torch.stack([(1 - t) * a + t * b for t in ts])
    return torch.stack([(torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
                        for t in ts])


@torch.no_grad()
def interpolation(teacher, unet, net, text: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
                  frames: int, steps: int, guidance: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Frames of one prompt along a slerp between two noises, and their smoothness: the mean and the
    largest lpips_mnv2 between consecutive frames, each over the distance between the end frames (a
    smooth path moves in small, even steps; a jump shows as a large max)."""
    noise = slerp(noise_a, noise_b, frames)
    images = training.generate(teacher, unet, text.expand(frames, -1, -1), noise, steps, guidance)
    steps_d = quality.lpips_mnv2(net, images[:-1], images[1:])
    ends = float(quality.lpips_mnv2(net, images[:1], images[-1:]))
    ends = max(ends, 1e-8)
    return images, {"mean_step_over_ends": float(steps_d.mean()) / ends,
                    "max_step_over_ends": float(steps_d.max()) / ends, "ends": ends}


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    r = spearmanr(a, b).statistic
    return float(r) if not math.isnan(r) else float("nan")


def sd15_params(found: dict, names: list[str]) -> dict[str, int]:
    """Each model's parameters at SD-1.5 width, built on the meta device: the teacher (and the
    step-reduced teacher), the family members (as the search counted them), BK-SDM-Tiny's layout, and
    the uniform U-Net scaled to Prime's SD-1.5-width count."""
    from diffusers import UNet2DConditionModel

    from . import baselines
    from .baseline import SD15_UNET, count_params

    with torch.device("meta"):
        sd = UNet2DConditionModel(**SD15_UNET)
        bk = UNet2DConditionModel(**baselines.bk_tiny_config(sd.config))
    _, _, uniform = baselines.match_widths(sd.config, int(found["prime"]["sd15_params"]))
    known = {"teacher": count_params(sd), "step_reduced": count_params(sd), "bk_tiny": count_params(bk),
             "uniform": uniform, **{m: int(found[m]["sd15_params"]) for m in found}}
    return {n: known[n] for n in names}
