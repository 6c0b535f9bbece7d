"""Latency is measured, not estimated: warm-up, then the median of N timed runs at a fixed thread count."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls.

    CUDA work is synchronised around each call so that the clock sees the kernels, not the launch.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def unet_forward_ms(unet: torch.nn.Module, latent_px: int, text_len: int, runs: int,
                    batch: int = 1) -> float:
    """One denoising step of a U-Net at its latent size (batch 1: one tile), inputs of SD's shapes."""
    cfg = unet.config
    device = next(unet.parameters()).device
    sample = torch.randn(batch, cfg.in_channels, latent_px, latent_px, device=device)
    text = torch.randn(batch, text_len, cfg.cross_attention_dim, device=device)
    t = torch.full((batch,), 500, device=device)
    return median_ms(lambda: unet(sample, t, encoder_hidden_states=text), runs)

