"""The slim VAE's named options: a small table, each row with the reason it is worth measuring.

Kept apart from `vae.py` (which needs torch and diffusers) so that the params check can name the
allowed options without loading either.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class VaeOption:
    name: str
    width: Fraction  # every block's channels relative to the teacher's
    max_layers: int | None  # resnets per encoder block, at most (the decoder has one more); None = teacher's
    mid_attention: bool  # self-attention in the mid blocks (one switch for encoder and decoder)
    groups: Fraction  # GroupNorm groups relative to the teacher's; equal to `width`, it keeps channels
    # per group, so with leading-channel copying each slim group holds the channels of one teacher group
    why: str


OPTIONS = (
    VaeOption("w1/2", Fraction(1, 2), None, True, Fraction(1, 2),
              "half width, every layer kept: about 1/4 of the conv weights and MACs"),
    VaeOption("w1/2-l1", Fraction(1, 2), 1, True, Fraction(1, 2),
              "also one resnet per block where SD has two (decoder 3 -> 2); the embedded teacher has one"),
    VaeOption("w1/2-l1-na", Fraction(1, 2), 1, False, Fraction(1, 2),
              "also no mid-block self-attention: 4096 tokens at a 512-px tile, memory-bound on NPUs"),
    VaeOption("w1/4-l1", Fraction(1, 4), 1, True, Fraction(1, 4),
              "quarter width, one resnet per block: toward TAESD's size at SD-1.5 width"),
    VaeOption("w1/4-l1-na", Fraction(1, 4), 1, False, Fraction(1, 4),
              "quarter width and no mid-block attention: the cheapest option"),
)


def option(name: str) -> VaeOption:
    for o in OPTIONS:
        if o.name == name:
            return o
    raise KeyError(f"unknown slim VAE option {name!r}; allowed: {[o.name for o in OPTIONS]}")
