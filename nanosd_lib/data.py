"""Real photos that ship inside PyPI packages (scikit-image, scikit-learn), with a caption each.

Nothing is downloaded: every photo here is bundled with its package. The captions are the prompts of
the study, so each photo is one 'concept' the teacher must learn to tell apart from the others.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# name -> caption. Order is fixed: prompt indices in figures follow it.
CAPTIONS: dict[str, str] = {
    "astronaut": "an astronaut portrait",
    "chelsea": "a tabby cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket on the launch pad",
    "hubble_deep_field": "distant galaxies",
    "immunohistochemistry": "a stained tissue sample",
    "retina": "a retina fundus photo",
    "stereo_motorcycle": "a red motorcycle",
    "china": "a chinese temple",
    "flower": "a pink flower",
}


def load_photo(name: str) -> np.ndarray:
    """One photo as an HxWx3 uint8 array."""
    if name not in CAPTIONS:
        raise KeyError(f"unknown photo {name!r}; choose from {list(CAPTIONS)}")
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"))
    from skimage import data

    img = getattr(data, name)()
    if name == "stereo_motorcycle":  # (left, right, disparity): the left view is the photo
        img = img[0]
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def split(holdout: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(training photos, held-out photos), both in CAPTIONS order."""
    unknown = [h for h in holdout if h not in CAPTIONS]
    if unknown:
        raise KeyError(f"train_teacher.holdout: unknown photos {unknown}; choose from {list(CAPTIONS)}")
    train = [n for n in CAPTIONS if n not in holdout]
    if not train:
        raise ValueError("train_teacher.holdout holds out every photo; keep at least one to train on")
    return train, [n for n in CAPTIONS if n in holdout]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 1x3xHxW float in [-1, 1], the range SD's VAE works in."""
    return torch.tensor(img).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)


def random_crops(names: list[str], n: int, size: int, generator: torch.Generator,
                 zoom: tuple[float, float] = (1.0, 1.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` square crops of side `size`, with their photo indices.

    Each photo is first shrunk so its short side is `zoom x size` (a random zoom per crop), so a crop
    shows most of the scene rather than a texture patch; crops are flipped left-right half the time.
    """
    photos = [to_tensor(load_photo(name)) for name in names]
    labels = torch.randint(len(names), (n,), generator=generator)
    zooms = torch.empty(n).uniform_(*zoom, generator=generator)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[labels[i]]
        h, w = photo.shape[-2:]
        scale = zooms[i].item() * size / min(h, w)
        small = F.interpolate(photo, size=(max(size, round(h * scale)), max(size, round(w * scale))),
                              mode="bilinear", antialias=True, align_corners=False)
        top = torch.randint(small.shape[-2] - size + 1, (1,), generator=generator).item()
        left = torch.randint(small.shape[-1] - size + 1, (1,), generator=generator).item()
        crop = small[0, :, top:top + size, left:left + size]
        if torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop
    return out.clamp(-1, 1), labels
