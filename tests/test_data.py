import pytest
import torch

from nanosd_lib import data


@pytest.mark.parametrize("name", list(data.CAPTIONS))
def test_every_bundled_photo_loads_offline(name):
    img = data.load_photo(name)
    assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8"
    assert min(img.shape[:2]) >= 300


def test_split_and_errors():
    train, held = data.split(["china"])
    assert held == ["china"] and "china" not in train and len(train) == len(data.CAPTIONS) - 1
    with pytest.raises(KeyError, match="unknown photos \\['lena'\\]"):
        data.split(["lena"])
    with pytest.raises(ValueError, match="holds out every photo"):
        data.split(list(data.CAPTIONS))


def test_crops_are_seeded_and_in_range():
    a, la = data.random_crops(["chelsea", "coffee"], 6, 32, torch.Generator().manual_seed(3))
    b, lb = data.random_crops(["chelsea", "coffee"], 6, 32, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    assert set(la.tolist()) <= {0, 1}
