"""The study's photos as tensors: the corpus `gather_photos` wrote, crops for training, Kodak tiles.

Images are float tensors in [-1, 1] (the range SD's VAE works in) unless a function says otherwise.
"""
from __future__ import annotations

import json
import math
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class Corpus:
    """`data/photos/` under a study root: the manifest, and each photo by name."""

    def __init__(self, root: str | Path = "."):
        from .outputs import repo_root

        root = Path(root) if Path(root).is_absolute() else repo_root() / root
        self.folder = root / "data" / "photos"
        if not (self.folder / "manifest.json").is_file():
            raise FileNotFoundError(f"{self.folder}/manifest.json: no photo corpus; run the "
                                    "gather_photos stage (`dvc repro gather_photos`)")

    @cached_property
    def manifest(self) -> list[dict]:
        return json.loads((self.folder / "manifest.json").read_text())

    def names(self, split: str) -> list[str]:
        from .photos import SPLITS

        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; the corpus has {list(SPLITS)}")
        return [r["name"] for r in self.manifest if r["split"] == split]

    def caption(self, name: str) -> str:
        return self._row(name)["caption"]

    def captions(self, split: str) -> list[str]:
        return [self.caption(n) for n in self.names(split)]

    def _row(self, name: str) -> dict:
        for r in self.manifest:
            if r["name"] == name:
                return r
        raise KeyError(f"unknown photo {name!r}; the corpus has {[r['name'] for r in self.manifest]}")

    def load(self, name: str) -> np.ndarray:
        """One photo as an HxWx3 uint8 array."""
        from PIL import Image

        return np.asarray(Image.open(self.folder / self._row(name)["file"]).convert("RGB"))

    def tensor(self, name: str) -> torch.Tensor:
        return to_tensor(self.load(name))


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float in [-1, 1]."""
    return torch.tensor(img).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the range the quality measures and degradations take."""
    return images.add(1).div(2).clamp(0, 1)


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the VAE's range."""
    return images * 2 - 1


def random_crops(photos: list[torch.Tensor], n: int, size: int, generator: torch.Generator,
                 zoom: tuple[float, float] | str | None = None, shift: float = 1.0,
                 flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` square crops of side `size` from 1x3xHxW photos, with their photo indices.

    Each crop first shrinks its photo so the short side is `z x size`, with z log-uniform in `zoom`;
    the default runs from the whole scene (z = 1) to the photo's own pixels (z = short side / size),
    so a model sees both layout and texture; "native" keeps the photo's own pixels (restoration).
    A crop's position is uniform within `shift` x the free range around the centre (1: anywhere), and
    with `flip` it is mirrored left-right half the time.
    """
    labels = torch.randint(len(photos), (n,), generator=generator)
    u = torch.rand(n, generator=generator)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[labels[i]]
        h, w = photo.shape[-2:]
        native = max(1.0, min(h, w) / size)
        lo, hi = (native, native) if zoom == "native" else zoom or (1.0, native)
        z = math.exp(math.log(lo) + u[i].item() * (math.log(hi) - math.log(lo)))
        scale = z * size / min(h, w)
        if abs(scale - 1.0) > 1e-3:
            small = F.interpolate(photo, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                                  mode="bilinear", antialias=True, align_corners=False)
        else:
            small = photo
        where = torch.rand(2, generator=generator)
        top, left = (round((free / 2) * (1 + shift * (2 * u.item() - 1)))
                     for free, u in zip((small.shape[-2] - size, small.shape[-1] - size), where))
        crop = small[0, :, top:top + size, left:left + size]
        if torch.rand(1, generator=generator).item() < 0.5 and flip:
            crop = crop.flip(-1)
        out[i] = crop
    return out.clamp(-1, 1), labels


def tiles(photo: torch.Tensor, size: int) -> torch.Tensor:
    """Non-overlapping `size` tiles covering a 1x3xHxW photo (a partial last row/column is dropped)."""
    h, w = photo.shape[-2:]
    return torch.stack([photo[0, :, y:y + size, x:x + size]
                        for y in range(0, h - size + 1, size) for x in range(0, w - size + 1, size)])


def kodak_tiles(corpus: Corpus, size: int = 128) -> torch.Tensor:
    """The test split's photos cut into `size`-px tiles (5 Kodak photos at 512x384: 60 tiles of 128)."""
    return torch.cat([tiles(corpus.tensor(n), size) for n in corpus.names("test")])


def bicubic_down_up(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic downscaling by `factor` (antialiased) and back: the simplest codec to compare with."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(h // factor, w // factor), mode="bicubic", antialias=True,
                          align_corners=False)
    return F.interpolate(small, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)
