import pytest
import torch

from nanosd_lib import data


@pytest.fixture(scope="module")
def corpus(study_root):
    return data.Corpus(study_root)


def test_splits_and_captions(corpus):
    assert len(corpus.names("train")) == 36 and corpus.names("heldout") == ["stereo_motorcycle", "china"]
    assert corpus.names("test") == ["kodim03", "kodim04", "kodim06", "kodim08", "kodim19"]
    assert len(set(corpus.captions("train"))) == 36  # one distinct prompt per training photo
    with pytest.raises(KeyError, match="unknown split 'valid'"):
        corpus.names("valid")
    with pytest.raises(KeyError, match="unknown photo 'lena'"):
        corpus.load("lena")


def test_photos_load_as_rgb(corpus):
    for name in ("coffee", "kodim19", "gold_fish"):
        img = corpus.load(name)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype.name == "uint8" and min(img.shape[:2]) >= 300


def test_crops_are_seeded_in_range_and_span_zooms(corpus):
    photos = [corpus.tensor(n) for n in ("chelsea", "coffee")]
    a, la = data.random_crops(photos, 6, 32, torch.Generator().manual_seed(3))
    b, lb = data.random_crops(photos, 6, 32, torch.Generator().manual_seed(3))
    assert a.shape == (6, 3, 32, 32) and torch.equal(a, b) and torch.equal(la, lb)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1 and set(la.tolist()) <= {0, 1}
    # whole-scene crops of one photo vary less between each other than pixel-scale crops do
    wide, _ = data.random_crops(photos[:1], 32, 32, torch.Generator().manual_seed(0), zoom=(1.0, 1.0))
    close, _ = data.random_crops(photos[:1], 32, 32, torch.Generator().manual_seed(0), zoom=(9.0, 9.0))
    assert wide.std(0).mean() < close.std(0).mean()


def test_kodak_tiles_cover_each_photo(corpus):
    tiles = data.kodak_tiles(corpus, 128)
    assert tiles.shape == (60, 3, 128, 128)  # 5 photos of 512x384, 4x3 tiles each
    torch.testing.assert_close(tiles[0], corpus.tensor("kodim03")[0, :, :128, :128])
