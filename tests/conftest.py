"""Shared fixtures: real tiny models, real files, two threads (heavy tests never run in parallel)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nanosd_lib import photos, teacher

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "build" / "test-study"  # kept between sessions: the photo corpus takes ~10 s to build
torch.set_num_threads(2)
# BoTorch compiles its qLogNEHVI kernel once per environment; `make` keeps it with the venv, and so does
# a bare `pytest` run inside one (else it would compile it again under the user's cache).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


@pytest.fixture(scope="session")
def study_root():
    """A scratch study holding the real photo corpus and MobileNetV2 weights (fetched and checked by
    the same code as the gather_photos stage; rebuilt when the catalogue changed)."""
    manifest = STUDY / "data" / "photos" / "manifest.json"
    have = [(r["name"], r["caption"]) for r in json.loads(manifest.read_text())] if manifest.is_file() else []
    if have != [(p.name, p.caption) for p in photos.CATALOGUE.values()]:
        photos.build(STUDY / "data" / "photos", STUDY / "data" / "archives", ["china", "stereo_motorcycle"])
    return STUDY


@pytest.fixture(scope="session")
def smoke_teacher():
    """A freshly built smoke-scale teacher (untrained): SD-1.5 topology at tiny width."""
    return teacher.build(teacher.SPECS["smoke"], photos.captions(), seed=0)


@pytest.fixture(scope="session")
def smoke_teacher_dir(smoke_teacher, tmp_path_factory):
    """That teacher written by `save_pretrained` into a diffusers folder."""
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    smoke_teacher.save(path)
    return path


@pytest.fixture
def study(tmp_path):
    """A scratch copy of the study's control files (params, dvc.yaml, notebooks) to run against."""
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "notebooks", tmp_path / "notebooks")
    return tmp_path
