"""The study's parameters: one typed schema per `params.yaml` section, checked before any work starts.

`params.yaml` has a shared `base:` section and one section per stage. Every section is a dataclass
below; a key that is not a field, a value of the wrong type or an impossible value is reported in one
`ParamsError` that names the key and what would be allowed.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCALES = ("smoke", "embedded", "sd15")


class ParamsError(ValueError):
    """Bad parameters; the message lists every offending key and what would be right."""


def _f(why: str, *, choices=None, minimum=None):
    """A schema field: a one-line reason and the values it may take. Values live in params.yaml."""
    return field(metadata={"why": why, "choices": choices, "min": minimum})


@dataclass(frozen=True)
class Base:
    seed: int = _f("one seed for data crops, init, noise and sampling", minimum=0)
    scale: str = _f("smoke (tests), embedded (laptop default) or sd15 (a local SD-1.5)",
                    choices=SCALES)
    threads: int = _f("torch intra-op threads; fixed so that timings are comparable", minimum=1)
    teacher: str = _f("'embedded' trains the small teacher; else a local diffusers folder")


@dataclass(frozen=True)
class MeasureBaselineCost:
    image_width: int = _f("the photo the seed tiles (4K, 12 MP)", minimum=1)
    image_height: int = _f("its height", minimum=1)
    tile_px: int = _f("SD-1.5's native resolution", minimum=8)
    overlap_px: int = _f("overlap between neighbouring tiles, hides seams", minimum=0)
    device_tile_ms: float = _f("the seed's int4 per-tile latency on the SM8750 NPU", minimum=0.0)
    timing_runs: int = _f("timed forwards after warm-up; the median is reported", minimum=1)
    sd15_host_forward: bool = _f("also time the SD-1.5-config U-Net at 64x64 latents (~4 GiB)")


@dataclass(frozen=True)
class TrainTeacher:
    vae_steps: int = _f("AutoencoderKL optimisation steps", minimum=1)
    unet_steps: int = _f("U-Net denoising steps", minimum=1)
    batch_size: int = _f("crops per step", minimum=1)
    vae_lr: float = _f("AdamW learning rate for the VAE", minimum=0.0)
    unet_lr: float = _f("AdamW learning rate for the U-Net", minimum=0.0)
    kl_weight: float = _f("weight of the VAE's KL term, as in SD's autoencoder", minimum=0.0)
    uncond_prob: float = _f("prompt dropout, so that classifier-free guidance works", minimum=0.0)
    crops: int = _f("random crops drawn once from the training photos", minimum=1)
    vae_crop_px: int = _f("VAE trains on smaller crops: it is convolutional, and 4x cheaper", minimum=8)
    sample_steps: int = _f("DDIM steps for the sample grid", minimum=1)
    guidance_scale: float = _f("classifier-free guidance for samples", minimum=0.0)
    samples_per_prompt: int = _f("columns of the sample grid", minimum=1)
    holdout: list = _f("photos kept out of training for restoration")


@dataclass(frozen=True)
class PruneUnet:
    candidates: int = _f("random candidates built from the base, run forward and tabulated", minimum=1)


@dataclass(frozen=True)
class DistillModules:
    heal_steps: int = _f("steps healing the pruned base against the teacher", minimum=1)
    heal_lr: float = _f("AdamW learning rate for healing", minimum=0.0)
    w_task: float = _f("weight of the denoising loss while healing", minimum=0.0)
    w_out: float = _f("weight of output-level KD while healing", minimum=0.0)
    w_feat: float = _f("weight of feature-level KD (kept stages' outputs) while healing", minimum=0.0)
    batch_size: int = _f("samples per step, healing and modules", minimum=1)
    record_batches: int = _f("batches of stage inputs/outputs recorded from the healed base", minimum=1)
    module_steps: int = _f("steps per student module", minimum=1)
    module_lr: float = _f("AdamW learning rate per module, cosine-decayed", minimum=0.0)
    checkpoint_every: int = _f("steps between resumable module checkpoints", minimum=1)
    eval_candidates: int = _f("random candidates compared distilled vs undistilled (>= 16)", minimum=1)
    ranks: int = _f("torchrun processes sharing the 30 module jobs; 1 runs in the notebook", minimum=1)


@dataclass(frozen=True)
class Latency:
    backend: str = _f("whose latencies later stages use", choices=("onnxruntime", "torch", "qai-hub"))


@dataclass(frozen=True)
class MeasureLatency:
    runs: int = _f("timed runs per measurement after 2 warm-up runs; the median is kept", minimum=3)
    candidates: int = _f("random whole candidates that check the table (besides teacher/base/fastest)",
                         minimum=1)
    device_candidates: int = _f("whole models sent to AI Hub when it is configured", minimum=0)
    sd15_width: bool = _f("also time every option at SD-1.5 width, 64x64 latents (slow, ~minutes)")


SECTIONS: dict[str, type] = {
    "base": Base,
    "measure_baseline_cost": MeasureBaselineCost,
    "train_teacher": TrainTeacher,
    "prune_unet": PruneUnet,
    "distill_modules": DistillModules,
    "latency": Latency,
    "measure_latency": MeasureLatency,
}


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def _problems(section: str, values: dict) -> list[str]:
    schema = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(schema)}
    out = []
    for key, value in values.items():
        name = f"{section}.{key}"
        if key not in fields:
            out.append(f"{name}: unknown key; {section} allows {sorted(fields)}")
            continue
        f = fields[key]
        kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list}[f.type]
        meta = f.metadata
        if not _type_ok(value, kind):
            out.append(f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        elif meta["choices"] and value not in meta["choices"]:
            out.append(f"{name}: {value!r} is not one of {list(meta['choices'])}")
        elif meta["min"] is not None and value < meta["min"]:
            strict = "positive" if meta["min"] == 1 else f">= {meta['min']}"
            out.append(f"{name}: must be {strict}, got {value!r}")
    return out


def _teacher_problems(base: dict) -> list[str]:
    teacher, scale = base.get("teacher", "embedded"), base.get("scale", "embedded")
    if teacher == "embedded":
        return ["base.scale: 'sd15' needs base.teacher to name a local SD-1.5 diffusers folder"] \
            if scale == "sd15" else []
    path = Path(teacher).expanduser()
    if not path.is_dir():
        return [f"base.teacher: {teacher!r} does not exist; give 'embedded' or a diffusers folder"]
    missing = [p for p in ("unet/config.json", "vae/config.json") if not (path / p).is_file()]
    if missing:
        return [f"base.teacher: {teacher!r} is not a diffusers model folder (no {', '.join(missing)})"]
    if scale != "sd15":
        return [f"base.scale: a folder teacher runs at scale 'sd15', not {scale!r}"]
    return []


def check(**sections: dict) -> "Params":
    """Validate the given sections (each may hold a subset of its keys) and return them typed.

    Raises one ParamsError naming every bad key before anything else happens.
    """
    problems = []
    for name, values in sections.items():
        if name not in SECTIONS:
            problems.append(f"{name}: unknown section; params.yaml allows {sorted(SECTIONS)}")
        elif not isinstance(values, dict):
            problems.append(f"{name}: expected a mapping of keys, got {type(values).__name__}")
        else:
            problems += _problems(name, values)
    if not problems and "base" in sections and "teacher" in sections["base"]:
        problems += _teacher_problems(sections["base"])
    if problems:
        raise ParamsError("invalid parameters:\n  " + "\n  ".join(problems))
    return Params({k: _Section(k, v) for k, v in sections.items()})


def load(path: str | Path) -> "Params":
    """Read and validate a whole params.yaml: every section, every key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected sections at the top level, got {type(data).__name__}")
    missing = [s for s in SECTIONS if s not in data]
    if missing:
        raise ParamsError(f"{path}: missing sections {missing}")
    absent = [f"{name}.{f.name}" for name, schema in SECTIONS.items() if isinstance(data[name], dict)
              for f in dataclasses.fields(schema) if f.name not in data[name]]
    if absent:
        raise ParamsError(f"{path}: missing keys {absent}")
    return check(**data)


class _Section:
    """Read-only attribute access to one validated section; reading an unlisted key is an error."""

    def __init__(self, name: str, values: dict):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key):
        values = object.__getattribute__(self, "_values")
        if key not in values:
            raise AttributeError(f"{self._name}.{key} was not given to this stage; list it in dvc.yaml")
        return values[key]

    def __setattr__(self, key, value):
        raise AttributeError("parameters are read-only; change params.yaml or the parameters cell")

    def as_dict(self) -> dict:
        return dict(self._values)

    def __repr__(self):
        return f"{self._name}({self._values})"


class Params(dict):
    """Validated sections by name, also reachable as attributes: `params.base.seed`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def seed_everything(seed: int, threads: int) -> None:
    """Fix every source of randomness and the thread count (timings and determinism depend on it)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
