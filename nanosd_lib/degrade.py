"""Degradations that make (low-quality, high-quality) pairs for one-step restoration.

Two tasks. `sr_x4` is a simplified second-order degradation in the style of Real-ESRGAN and OSEDiff:
two rounds of blur -> resize down -> Gaussian noise -> JPEG, because a phone photo has been through
a lens, a sensor, a resampler and a codec, often twice (shared, re-saved), and a model trained on
plain bicubic downsampling fails on such photos. `denoise` adds white Gaussian noise at one sigma,
the classic benchmark. Every random draw comes from the caller's `torch.Generator`, so a seed gives
the same pairs on every run.

Images are float tensors [B, C, H, W] in [0, 1] (C = 1 or 3, what JPEG encodes); the VAE wants
[-1, 1], and `data.to_unit` / `data.to_signed` convert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.io import decode_jpeg, encode_jpeg

SCALE = 4  # sr_x4: the low-quality image is H/4 x W/4
DENOISE_SIGMA = 25 / 255  # the usual AWGN benchmark level (BSD68, sigma = 25 on 0-255)


@dataclass(frozen=True)
class SecondOrder:
    """Ranges each round draws from uniformly; modest, so a 512 px tile still has detail to recover."""

    blur_sigma: tuple[float, float] = (0.2, 1.5)  # Gaussian blur, px at the round's input scale: lens/AA
    # round 1's size / HQ's: between LQ's 1/4 and HQ's 1, so both rounds shrink and round 2 ends at H/4
    first_scale: tuple[float, float] = (0.3, 0.9)
    noise_sigma: tuple[float, float] = (1 / 255, 10 / 255)  # additive Gaussian std: sensor noise
    jpeg_quality: tuple[int, int] = (50, 95)  # below 50 the blocks dominate what the model must undo
    resize_modes: tuple[str, ...] = ("area", "bilinear", "bicubic")  # random, so no kernel is learnt

    def __post_init__(self):
        for name in ("blur_sigma", "first_scale", "noise_sigma", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"SecondOrder.{name} must be (low, high) with 0 <= low <= high, "
                                 f"got {(lo, hi)}")
        if not (1 / SCALE < self.first_scale[0] and self.first_scale[1] <= 1):
            raise ValueError(f"SecondOrder.first_scale must lie in (1/{SCALE}, 1], "
                             f"got {self.first_scale}")


def crop_to_multiple(image: torch.Tensor, multiple: int = SCALE) -> torch.Tensor:
    """Crop the bottom/right so H and W divide by `multiple`; do this to HQ before `sr_x4`."""
    h, w = image.shape[-2:]
    return image[..., :h - h % multiple, :w - w % multiple]


def _check(hq: torch.Tensor) -> None:
    if hq.dim() != 4 or not hq.is_floating_point():
        raise ValueError(f"hq must be a float tensor [B, C, H, W], got {hq.dtype} {tuple(hq.shape)}")
    low, high = hq.min().item(), hq.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"hq must lie in [0, 1], got [{low:.3f}, {high:.3f}]; "
                         f"convert a [-1, 1] image with data.to_unit")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device=generator.device).item()


def _round(x, size, ranges: SecondOrder, generator: torch.Generator) -> torch.Tensor:
    """One round: blur, resize to `size`, add noise, JPEG. Draws in a fixed order (reproducible)."""
    sigma = _uniform(generator, *ranges.blur_sigma)
    mode = ranges.resize_modes[int(torch.randint(len(ranges.resize_modes), (), generator=generator,
                                                 device=generator.device))]
    noise = _uniform(generator, *ranges.noise_sigma)
    quality = round(_uniform(generator, *ranges.jpeg_quality))
    k = 2 * math.ceil(3 * sigma) + 1  # +-3 sigma holds 99.7% of the kernel's mass
    x = TF.gaussian_blur(x, [k, k], [sigma, sigma])
    x = F.interpolate(x, size=size, mode=mode, antialias=mode != "area")
    x = x + noise * torch.randn(x.shape, generator=generator, device=generator.device).to(x)
    # JPEG takes 8-bit: clipping and quantising here is what a camera's pipeline does too.
    u8 = (x[0] * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return (decode_jpeg(encode_jpeg(u8, quality=quality)).to(x) / 255)[None]


def sr_x4(hq: torch.Tensor, generator: torch.Generator,
          ranges: SecondOrder = SecondOrder()) -> torch.Tensor:
    """HQ [B, C, H, W] -> LQ [B, C, H/4, W/4], each image with its own draws, values in [0, 1].

    H and W must divide by 4 (`crop_to_multiple` first): cropping here would misalign LQ and HQ.
    """
    _check(hq)
    h, w = hq.shape[-2:]
    if h % SCALE or w % SCALE:
        raise ValueError(f"sr_x4 needs H and W divisible by {SCALE}, got {h}x{w}; "
                         f"crop the HQ image first with crop_to_multiple(hq, {SCALE})")
    out = []
    for image in hq.split(1):
        scale = _uniform(generator, *ranges.first_scale)
        first = (max(round(h * scale), h // SCALE), max(round(w * scale), w // SCALE))
        x = _round(image, first, ranges, generator)
        out.append(_round(x, (h // SCALE, w // SCALE), ranges, generator))
    return torch.cat(out)


def bicubic_up(lq: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """LQ -> (H, W) by bicubic interpolation: the one-step model's input and the bicubic reference.
    Clamped to [0, 1], since bicubic overshoots at edges."""
    return F.interpolate(lq, size=size, mode="bicubic", align_corners=False).clamp(0, 1)


def denoise(hq: torch.Tensor, generator: torch.Generator, sigma: float = DENOISE_SIGMA) -> torch.Tensor:
    """HQ + N(0, sigma^2) per pixel and channel, NOT clipped: clipping at 0 and 1 would bias the
    noise and shrink its std in dark and bright areas, and the benchmarks this matches add it unclipped.
    The result leaves [0, 1] slightly; the VAE takes that without harm."""
    _check(hq)
    return hq + sigma * torch.randn(hq.shape, generator=generator, device=generator.device).to(hq)


TASKS = {"sr_x4": sr_x4, "denoise": denoise}


def degrade(hq: torch.Tensor, task: str, generator: torch.Generator) -> torch.Tensor:
    """The degraded image for `task`: LQ at H/4 x W/4 for 'sr_x4', noisy HQ-size for 'denoise'."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(repr(t) for t in TASKS)}")
    return TASKS[task](hq, generator)
