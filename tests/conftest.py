"""Shared fixtures: real tiny models, real files, one thread (heavy tests never run in parallel)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from nanosd_lib import data, teacher

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smoke_teacher():
    """A freshly built smoke-scale teacher (untrained): SD-1.5 topology at tiny width."""
    return teacher.build(teacher.SPECS["smoke"], list(data.CAPTIONS.values()), seed=0)


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
