"""Tiled inference: restore a photo of any size through a model that sees one fixed-size tile.

A phone runs the restorer compiled for one square tile (`measure_baseline_cost.tile_px`), so a 12 MP
photo goes through it tile by tile, laid out by `baseline.tile_grid`. Each tile is restored without
the context beyond its edge (zero padding in every conv, GroupNorm statistics of the tile alone), so
two neighbours disagree near their shared edge, and pasting them shows a seam. Overlapping the tiles
and blending with a feathered window hides it: a tile's weight rises from ~0 at an edge that lies
inside the photo to 1 past the overlap, so its least trustworthy pixels count least, and the hand-over
from one tile to the next is gradual. Edges on the photo's own border keep full weight: no other tile
covers those pixels, and a ramp there would darken the border (or, once normalised, leave it resting
on a near-zero weight). Weights are divided by their sum, so any overlap blends to a weighted mean.

The cost is the tile count: one photo costs `grid.count` x the per-tile latency, and the overlap buys
seamless output with more tiles (a 4000x3000 photo is 88 tiles of 512 px at 128 px overlap, not 48).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .baseline import TileGrid, tile_grid
from .progress import bar


def pad_to_tile(image: torch.Tensor, tile: int) -> torch.Tensor:
    """Pad each side shorter than `tile` up to `tile` at the bottom/right: reflect where the side is
    long enough to mirror, replicate where it is not (reflect needs padding < side)."""
    for dim in (-2, -1):
        side = image.shape[dim]
        if side < tile:
            pad = (0, 0, 0, tile - side) if dim == -2 else (0, tile - side, 0, 0)
            image = F.pad(image, pad, mode="reflect" if tile - side < side else "replicate")
    return image


def _window(start: int, side: int, tile: int, overlap: int, feather: bool, like: torch.Tensor):
    """1-D weight of one tile along one axis: ramps on edges inside the image, 1 elsewhere."""
    w = torch.ones(tile, dtype=like.dtype, device=like.device)
    if not feather or overlap == 0:
        return w  # box window: each tile counts fully up to its edge, averaged where tiles overlap
    # Raised cosine sampled at pixel centres: strictly positive (every pixel keeps some weight) and
    # symmetric, so two ramps across an overlap of exactly `overlap` px sum to 1 before normalising.
    i = torch.arange(overlap, dtype=like.dtype, device=like.device)
    ramp = 0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / overlap)
    if start > 0:  # left/top edge lies inside the image
        w[:overlap] = torch.minimum(w[:overlap], ramp)
    if start + tile < side:  # right/bottom edge lies inside the image
        w[tile - overlap:] = torch.minimum(w[tile - overlap:], ramp.flip(0))
    return w


def padded_grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    """The layout on the padded image, so a side shorter than a tile is one tile (`.count` is what the
    photo costs in tiles). Height first, as for tensors; `baseline.tile_grid` takes the width first."""
    return tile_grid(max(width, tile), max(height, tile), tile, overlap)


def restore_tiled(image: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int,
                  overlap: int, multiple: int = 8, batch: int = 4, feather: bool = True,
                  progress: bool = False) -> torch.Tensor:
    """`fn` applied to `image` [B, C, H, W] tile by tile, blended, at the input's size.

    `fn` maps [N, C, tile, tile] to a tensor of the same batch and spatial size (channels may differ).
    The tiles of all B images go through it `batch` tiles (B * batch samples) at a time.
    `feather=False` uses a box window instead (a hard cut at every tile edge), for comparison.
    A side shorter than `tile` is padded up to it (`pad_to_tile`) and cropped back: `fn` always sees
    the one shape a device model is compiled for, so `multiple` only checks that `tile` is such a shape.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be [B, C, H, W], got shape {tuple(image.shape)}")
    if tile % multiple:
        raise ValueError(f"tile ({tile}) must be a multiple of {multiple} (the model's stride: the "
                         f"VAE downsamples by 8); e.g. {tile // multiple * multiple or multiple}")
    if batch < 1:
        raise ValueError(f"batch ({batch}) must be at least 1")
    n, _, h, w = image.shape
    padded = pad_to_tile(image, tile)
    ph, pw = padded.shape[-2:]
    grid = padded_grid(h, w, tile, overlap)
    boxes = grid.boxes()
    out = weight = None
    chunks = range(0, len(boxes), batch)
    for first in bar(chunks, desc="tiles", total=len(chunks), disable=not progress):
        chunk = boxes[first:first + batch]
        tiles = torch.cat([padded[..., t:b, l:r] for l, t, r, b in chunk])
        restored = fn(tiles)
        if restored.shape[0] != tiles.shape[0] or restored.shape[-2:] != tiles.shape[-2:]:
            raise ValueError(f"fn must keep batch and tile size {tuple(tiles.shape[-2:])}, "
                             f"got {tuple(restored.shape)} from {tuple(tiles.shape)}")
        if out is None:
            out = restored.new_zeros(n, restored.shape[1], ph, pw)
            weight = restored.new_zeros(1, 1, ph, pw)
        for k, (l, t, r, b) in enumerate(chunk):
            wy = _window(t, ph, tile, overlap, feather, restored)
            wx = _window(l, pw, tile, overlap, feather, restored)
            wt = wy[:, None] * wx[None, :]
            out[..., t:b, l:r] += restored[k * n:(k + 1) * n] * wt
            weight[..., t:b, l:r] += wt
    return (out / weight)[..., :h, :w]


def seam_mask(height: int, width: int, tile: int, overlap: int, band: int = 4) -> torch.Tensor:
    """[H, W] bool: True for pixels near a seam.

    A seam is a tile edge at pixel boundary s (the edge between columns s-1 and s, or rows) with
    0 < s < side, i.e. inside the image. Column j is near it when s - band <= j < s + band: `band`
    columns on each side. Seams span the whole image (the grid's tiles share columns and rows), so a
    pixel is near a seam when its column is near a vertical seam or its row near a horizontal one.
    """
    grid = padded_grid(height, width, tile, overlap)
    mask = torch.zeros(height, width, dtype=torch.bool)
    for l, t, r, b in grid.boxes():
        for s in (l, r):
            if 0 < s < width:
                mask[:, max(s - band, 0):s + band] = True
        for s in (t, b):
            if 0 < s < height:
                mask[max(s - band, 0):s + band, :] = True
    return mask


def seam_error_ratio(output: torch.Tensor, reference: torch.Tensor, tile: int, overlap: int,
                     band: int = 4) -> float:
    """Mean |output - reference| near seams (see `seam_mask`) over the mean everywhere else.

    ~1 means the tiles join without a visible line; an image that fits in one tile has no seams.
    """
    if output.shape != reference.shape:
        raise ValueError(f"output {tuple(output.shape)} and reference {tuple(reference.shape)} differ")
    h, w = output.shape[-2:]
    mask = seam_mask(h, w, tile, overlap, band).to(output.device)
    if not mask.any() or mask.all():
        raise ValueError(f"a {w}x{h} image in {tile} px tiles with {overlap} px overlap and band "
                         f"{band} has no seam pixels or no others; the ratio needs both")
    error = (output - reference).abs().double().mean(dim=tuple(range(output.dim() - 2)))
    near, off = error[mask].mean().item(), error[~mask].mean().item()
    return near / off if off > 0 else (1.0 if near == 0 else math.inf)
