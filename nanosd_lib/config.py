"""The study's parameters: one pydantic model per `params.yaml` section, checked before any work starts.

`params.yaml` has a shared `base:` section and one section per stage. Each section below is a strict
pydantic model (`extra="forbid"`: an unknown key is an error; strict types: `"600"` is not an int); each
field's description says why it exists. Every problem in the file is reported in one `ParamsError` that
names the key and what would be allowed. `dvc repro` runs the same check as its first stage
(`check_params`), so a bad file stops the pipeline before any stage has touched an output.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Each choice is spelt once, as the type a field checks against; the tuples are for code and messages.
Scale = Literal["smoke", "embedded", "sd15"]
HostBackend = Literal["torch", "onnxruntime"]  # timed on this machine (`timing`)
LatencyBackend = Literal[HostBackend, "qai-hub"]  # or read from the phone's measurements (`devicecache`)
HOST_BACKENDS, LATENCY_BACKENDS = get_args(HostBackend), get_args(LatencyBackend)


class ParamsError(ValueError):
    """Bad parameters; the message lists every offending key and what would be right."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _f(why: str, **limits):
    return Field(description=why, **limits)


class Base(Section):
    seed: int = _f("one seed for data crops, init, noise and sampling", ge=0, lt=2 ** 32)
    scale: Scale = _f("smoke (tests), embedded (laptop default) or sd15 (a local SD-1.5)")
    threads: int = _f("torch intra-op threads; fixed so that timings are comparable", ge=1)
    teacher: str = _f("'embedded' trains the small teacher; else a local diffusers folder")
    latency_backend: LatencyBackend = _f("whose latency table the search and the evaluation read")


class GatherPhotos(Section):
    holdout: list[str] = _f("photos kept out of training, aside for validation (stage 08 scores its restorers on them)")

    @field_validator("holdout")
    @classmethod
    def _known(cls, value):
        from .photos import check_holdout

        problems = check_holdout(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value


class MeasureBaselineCost(Section):
    image_width: int = _f("the photo the seed tiles (4K, 12 MP)", ge=1)
    image_height: int = _f("its height", ge=1)
    tile_px: int = _f("SD-1.5's native resolution", ge=8)
    overlap_px: int = _f("overlap between neighbouring tiles, hides seams (< tile_px)", ge=0)
    device_tile_ms: float = _f("the seed's int4 per-tile latency on the SM8750 NPU", ge=0)
    timing_runs: int = _f("timed forwards after warm-up; the median is reported", ge=1)
    sd15_host_forward: bool = _f("also time the SD-1.5-config U-Net at 64x64 latents (~4 GiB)")


class TuneLeg(Section):
    """A VAE's second training leg (`training.tune_phase`): larger crops, a fresh one-cycle run."""

    steps: int = _f("optimiser steps of the leg (0: none)", ge=0)
    crop_px: int = _f("side of its crops; their count keeps the first leg's pixels", ge=8, multiple_of=8)
    batch_size: int = _f("crops per step", ge=1)
    lr: float = _f("AdamW peak learning rate (fresh optimizer)", gt=0)


class TrainTeacher(Section):
    vae_steps: int = _f("AutoencoderKL optimisation steps", ge=1)
    unet_steps: int = _f("U-Net denoising steps", ge=1)
    batch_size: int = _f("crops per U-Net step", ge=1)
    vae_batch_size: int = _f("crops per VAE step (small crops: many fit)", ge=1)
    vae_lr: float = _f("AdamW peak learning rate for the VAE (one-cycle)", gt=0)
    unet_lr: float = _f("AdamW peak learning rate for the U-Net (one-cycle)", gt=0)
    kl_weight: float = _f("weight of the VAE's KL term, as in SD's autoencoder", ge=0)
    perceptual_weight: float = _f("weight of the lpips_mnv2 term in the VAE loss", ge=0)
    perceptual_every: int = _f("the lpips_mnv2 term is added on every n-th VAE step (it doubles a step)",
                               ge=1)
    uncond_prob: float = _f("prompt dropout, so that classifier-free guidance works", ge=0, le=1)
    min_snr_gamma: float = _f("Min-SNR loss weighting's gamma (0: plain MSE)", ge=0)
    high_noise_share: float = _f("share of each batch drawn from the noisiest 40 % of timesteps", ge=0, le=1)
    crops: int = _f("random crops drawn once from the training photos (U-Net latents)", ge=1)
    vae_crops: int = _f("random crops drawn once for the VAE", ge=1)
    vae_crop_px: int = _f("VAE trains on small crops: it is convolutional, and many times cheaper",
                          ge=8, multiple_of=8)
    vae_tune: TuneLeg = _f("then a second leg on larger crops, so that the inside of a tile decodes like "
                           "a crop's border")
    sample_steps: int = _f("DDIM steps for the sample grid and caption accuracy", ge=1)
    guidance_scale: float = _f("classifier-free guidance for samples", ge=0)
    samples_per_prompt: int = _f("samples per prompt for the grid and caption accuracy", ge=1)


class PruneUnet(Section):
    candidates: int = _f("random candidates built from the base, run forward and tabulated", ge=1)


class DistillModules(Section):
    heal_steps: int = _f("steps healing the pruned base against the teacher", ge=1)
    heal_lr: float = _f("AdamW learning rate for healing", gt=0)
    w_task: float = _f("weight of the denoising loss while healing", ge=0)
    w_out: float = _f("weight of output-level KD while healing", ge=0)
    w_feat: float = _f("weight of feature-level KD (kept stages' outputs) while healing", ge=0)
    batch_size: int = _f("samples per step, healing and modules", ge=1)
    record_batches: int = _f("batches of stage inputs/outputs recorded from the healed base", ge=1)
    module_steps: int = _f("steps per student module", ge=1)
    module_lr: float = _f("AdamW learning rate per module, cosine-decayed", gt=0)
    checkpoint_every: int = _f("steps between resumable module checkpoints", ge=1)
    eval_candidates: int = _f("random candidates compared distilled vs undistilled (>= 16)", ge=1)
    ranks: int = _f("torchrun processes sharing the 30 module jobs; 1 runs in the notebook", ge=1)


class MeasureLatency(Section):
    backends: list[HostBackend] = _f("host backends timed (ONNX Runtime, the deployment runtime, is the "
                                     "main one whenever listed)", min_length=1)
    rounds: int = _f("interleaved rounds; an item's latency is its median over rounds (two halves "
                     "give the noise floor)", ge=2)
    runs: int = _f("timed calls per item per round, after one warm-up call; the median is kept", ge=1)
    fit_models: int = _f("whole models the per-option costs are fitted on", ge=10)
    check_models: int = _f("whole models held out from the fit: the reported error", ge=2)
    sd15_width: bool = _f("also time every option at SD-1.5 width, 64x64 latents (slow, ~minutes)")


class SearchArchitectures(Section):
    pairs: int = _f("(prompt, noise) pairs per quality evaluation: images per candidate", ge=2)
    steps: int = _f("DDIM steps of the teacher's sampler in the quality probe", ge=1)
    guidance: float = _f("classifier-free guidance in the quality probe", ge=0)
    metric: Literal["taFD[mnv2]", "taKD[mnv2]"] = _f("the quality objective; the stability check "
                                                     "reports both")
    stability_candidates: int = _f("random candidates scored on two noise sets to check the "
                                   "objective's ranking (>= 12 for the study)", ge=3)
    seeds: int = _f("independent runs of every method", ge=1)
    evaluations: int = _f("distinct candidates every method may evaluate per run: the shared budget",
                          ge=4)
    n_init: int = _f("random first designs, the same for every method at a seed", ge=2)
    q: int = _f("candidates per round (EHVI's batch, NSGA-II's offspring)", ge=1)
    pool: int = _f("unevaluated candidates EHVI scores per round (all 32,768 cost ~1 min a round)", ge=1)
    quality_quantile: float = _f("family rule: Latency and Params must have quality within this "
                                 "quantile of every evaluated candidate's", gt=0, le=1)
    prime_rule: Literal["quality_knee", "knee"] = _f("family rule for Prime: 'quality_knee', the knee of the "
                                                     "front members better on quality than Latency and "
                                                     "Params; 'knee', the knee of the whole front")

    @model_validator(mode="after")
    def _budget(self):
        if self.n_init > self.evaluations:
            raise ValueError(f"n_init ({self.n_init}) must not exceed evaluations ({self.evaluations}): the "
                             f"random first designs are part of the budget")
        if self.pool < self.q:
            raise ValueError(f"pool ({self.pool}) must be at least q ({self.q}): a round picks q of the pool")
        return self


class SlimVae(Section):
    option: str = _f("the slim VAE kept, a name from nanosd_lib.vae.OPTIONS (the table shows why)")
    table_steps: int = _f("distillation steps per option for the comparison table", ge=1)
    steps: int = _f("distillation steps of the chosen option", ge=1)
    batch_size: int = _f("crops per distillation step", ge=1)
    lr: float = _f("AdamW peak learning rate (one-cycle)", gt=0)
    crops: int = _f("training crops drawn once from the train split", ge=1)
    crop_px: int = _f("crop side (small: the VAE is convolutional)", ge=8, multiple_of=8)
    tune: TuneLeg = _f("then a second leg of the chosen option on larger crops, as the teacher's VAE ends")
    w_latent: float = _f("weight of latent match (mean and log-variance vs the teacher's)", ge=0)
    w_kl: float = _f("weight of the KL term, as in SD's autoencoder", ge=0)
    w_recon: float = _f("weight of L1 reconstruction", ge=0)
    w_perceptual: float = _f("weight of lpips_mnv2", ge=0)
    w_decoder: float = _f("weight of decoder match on the teacher's latents", ge=0)
    latents: int = _f("generated latents per U-Net for the compatibility check", ge=2)
    train_latents: int = _f("teacher-generated latents (other noise) the decoder match also trains on; 0: "
                            "the teacher's encodings of photo crops only", ge=0)
    runs: int = _f("interleaved timing rounds at the study's width (a warm-up and a timed call of each "
                   "VAE per round), median kept", ge=1)
    sd15_timing: bool = _f("also time both VAEs at SD-1.5 width (random weights, ~2 min)")
    sd15_runs: int = _f("interleaved timing rounds at SD-1.5 width, one call of each VAE per round (seconds "
                        "each); the first round also warms up, so from 3 the median is a warm call", ge=1)

    @field_validator("option")
    @classmethod
    def _known_option(cls, value):
        from .vae_options import OPTIONS

        if value not in [o.name for o in OPTIONS]:
            raise ValueError(f"unknown option {value!r}; choose from {[o.name for o in OPTIONS]}")
        return value


class RestorePhotos(Section):
    steps: int = _f("fine-tuning steps, the same for every backbone and task", ge=1)
    batch_size: int = _f("HQ crops per fine-tuning step", ge=1)
    crop_px: int = _f("HQ crop side: a multiple of 8 (VAE) and of 4 (x4 SR)", ge=8, multiple_of=8)
    lr: float = _f("AdamW learning rate, cosine-decayed", gt=0)
    perceptual_weight: float = _f("weight of lpips_mnv2 beside L2", ge=0)
    timestep: int = _f("the fixed timestep the LQ latent is read at (OSEDiff: one step)", ge=0, le=999)
    tile_px: int = _f("restoration tile (pixels), a multiple of 8", ge=8, multiple_of=8)
    overlap_px: int = _f("overlap between tiles, blended with a feathered window (< tile_px)", ge=0)
    crops: int = _f("HQ crops drawn once from the train split", ge=1)
    runs: int = _f("timed runs per tile latency, median kept", ge=1)
    photos: int = _f("Kodak test photos restored at full size (all 5 for the study); also caps the held-out "
                      "photos scored", ge=1, le=5)
    seed_photo: bool = _f("also cost the seed's 4000x3000 photo at SD-1.5 width (needs slim_vae's "
                          "sd15_timing; builds SD-1.5-width U-Nets, ~1 min)")


class EvaluateFamily(Section):
    images: int = _f("fresh (prompt, noise) pairs per model, disjoint from the search's (>= 256 for "
                     "the study)", ge=2)
    kd_lr: float = _f("AdamW learning rate of the baselines' whole-model KD", gt=0)
    kd_pool: int = _f("batches drawn up front, the teacher run once on each, that KD steps draw from "
                      "(0: a fresh batch and teacher forward every step)", ge=0)
    interp_frames: int = _f("frames along each slerp between two noises", ge=3)
    grid_prompts: int = _f("prompts (columns) in the sample grid", ge=1)

    @model_validator(mode="after")
    def _grid(self):
        if self.grid_prompts > self.images:
            raise ValueError(f"grid_prompts ({self.grid_prompts}) must not exceed images ({self.images}): "
                             f"the grid shows the first pairs")
        return self


class ProfileOnDevice(Section):
    calibration_prompts: int = _f("sampling runs whose U-Net inputs calibrate INT8", ge=1)
    sample_steps: int = _f("DDIM steps of those runs and of the INT8 quality probe", ge=1)
    held_out_prompts: int = _f("other runs whose inputs check INT8 against fp32", ge=1)
    runs: int = _f("timed calls per model after warm-up; the median is kept", ge=3)
    quality_pairs: int = _f("(prompt, noise) pairs for the INT8 taFD[mnv2]", ge=2)
    guidance: float = _f("classifier-free guidance of the calibration runs and of the INT8 quality probe",
                         ge=0)


SECTIONS: dict[str, type[Section]] = {
    "base": Base,
    "gather_photos": GatherPhotos,
    "measure_baseline_cost": MeasureBaselineCost,
    "train_teacher": TrainTeacher,
    "prune_unet": PruneUnet,
    "distill_modules": DistillModules,
    "measure_latency": MeasureLatency,
    "search_architectures": SearchArchitectures,
    "slim_vae": SlimVae,
    "evaluate_family": EvaluateFamily,
    "restore_photos": RestorePhotos,
    "profile_on_device": ProfileOnDevice,
}


def _model_at(section: str, loc: tuple) -> type[Section]:
    """The model of a section, or of the group reached by `loc` inside it."""
    model = SECTIONS[section]
    for part in loc:
        model = model.model_fields[part].annotation
    return model


def _describe(section: str, err: dict) -> str:
    """One line for one pydantic error, in the study's words."""
    key = ".".join([section, *map(str, err["loc"])])
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "extra_forbidden":
        group = ".".join([section, *map(str, err["loc"][:-1])])  # a key inside a group (slim_vae.tune)
        return f"{key}: unknown key; {group} allows {sorted(_model_at(section, err['loc'][:-1]).model_fields)}"
    if kind == "model_type":
        return (f"{key}: expected a group of keys {sorted(_model_at(section, err['loc']).model_fields)}, "
                f"got {type(value).__name__} {value!r}")
    if kind == "missing":
        return f"{key}: missing"
    if kind.endswith("_type") or kind in ("int_from_float", "bool_parsing", "int_parsing"):
        want = kind.split("_")[0].replace("string", "str")
        return f"{key}: expected {want}, got {type(value).__name__} {value!r}"
    if kind == "literal_error":
        return f"{key}: {value!r} is not one of {ctx.get('expected')}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than", "multiple_of"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<", "multiple_of": "a multiple of"}[kind]
        bound = next(iter(ctx.values()))
        return f"{key}: must be {op} {bound}, got {value!r}"
    if kind == "value_error":
        return f"{key}: {str(ctx.get('error', err['msg']))}"
    return f"{key}: {err['msg']} (got {value!r})"


def _section_problems(section: str, values, partial: bool) -> list[str]:
    if section not in SECTIONS:
        return [f"{section}: unknown section; params.yaml allows {sorted(SECTIONS)}"]
    if not isinstance(values, dict):
        return [f"{section}: expected a mapping of keys, got {type(values).__name__}"]
    try:
        SECTIONS[section].model_validate(values)
    except ValidationError as err:
        return [_describe(section, e) for e in err.errors(include_url=False)
                if not (partial and e["type"] == "missing" and len(e["loc"]) == 1)]  # a group comes whole
    return []


def _cross_problems(sections: dict, root: Path | None) -> list[str]:
    """Checks that span keys: overlap below tile, the teacher folder and its scale, the device table."""
    out = []
    cost = sections.get("measure_baseline_cost") or {}
    if isinstance(cost.get("overlap_px"), int) and isinstance(cost.get("tile_px"), int) \
            and cost["overlap_px"] >= cost["tile_px"]:
        out.append(f"measure_baseline_cost.overlap_px: {cost['overlap_px']} must be below tile_px "
                   f"({cost['tile_px']})")
    restore = sections.get("restore_photos") or {}
    if isinstance(restore.get("overlap_px"), int) and isinstance(restore.get("tile_px"), int) \
            and restore["overlap_px"] >= restore["tile_px"]:
        out.append(f"restore_photos.overlap_px: {restore['overlap_px']} must be below tile_px "
                   f"({restore['tile_px']})")
    base = sections.get("base") or {}
    timed = (sections.get("measure_latency") or {}).get("backends")
    if isinstance(timed, list) and base.get("latency_backend") in HOST_BACKENDS \
            and base["latency_backend"] not in timed:
        out.append(f"base.latency_backend: {base['latency_backend']!r} is not among "
                   f"measure_latency.backends {timed}")
    if base.get("latency_backend") == "qai-hub" and isinstance(timed, list) and "onnxruntime" not in timed:
        out.append(f"base.latency_backend: 'qai-hub' also needs 'onnxruntime' in measure_latency.backends "
                   f"(slim_vae reads the host table beside the phone's), got {timed}")
    if (sections.get("restore_photos") or {}).get("seed_photo") is True \
            and (sections.get("slim_vae") or {}).get("sd15_timing") is False:
        out.append("restore_photos.seed_photo: true needs slim_vae.sd15_timing: true (the seed photo's "
                   "cost uses both VAEs timed at SD-1.5 width)")
    device = sections.get("profile_on_device") or {}
    holdout = (sections.get("gather_photos") or {}).get("holdout")
    if isinstance(holdout, list) and all(isinstance(device.get(k), int)
                                         for k in ("calibration_prompts", "held_out_prompts")):
        from .photos import train_names

        train = len(train_names(holdout))
        if device["calibration_prompts"] + device["held_out_prompts"] > train:
            out.append(f"profile_on_device: calibration_prompts + held_out_prompts "
                       f"({device['calibration_prompts']} + {device['held_out_prompts']}) must not exceed the "
                       f"{train} training prompts (the held-out runs use prompts calibration did not)")
    if isinstance(base.get("teacher"), str):
        out += _teacher_problems(base)
    if base.get("latency_backend") == "qai-hub" and root is not None:
        from .devicecache import device_table_status

        status = device_table_status(root / "data" / "device" / "sm8750.json")
        if status:
            out.append(f"base.latency_backend: 'qai-hub' has no complete SM8750 table yet: {status}")
    return out


def _teacher_problems(base: dict) -> list[str]:
    teacher, scale = base["teacher"], base.get("scale", "embedded")
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


def _message(problems: list[str]) -> str:
    """One line for one problem; a count and one line each for several."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems:\n  " + "\n  ".join(problems)


def check(root: str | Path | None = None, **sections: dict) -> "Params":
    """Validate the given sections (each may hold a subset of its keys) and return them typed.

    Raises one ParamsError naming every bad key before anything else happens.
    """
    problems = [p for name, values in sections.items() for p in _section_problems(name, values, True)]
    if not problems:
        problems = _cross_problems(sections, Path(root) if root else None)
    if problems:
        raise ParamsError(_message(problems))
    return Params({k: _Section(k, v) for k, v in sections.items()})


def load(path: str | Path) -> "Params":
    """Read and validate a whole params.yaml: every section, every key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected sections at the top level, got {type(data).__name__}")
    problems = [f"{name}: missing section" for name in SECTIONS if name not in data]
    problems += [p for name, values in data.items() for p in _section_problems(name, values, False)]
    if not problems:
        problems = _cross_problems(data, path.parent)
    if problems:
        raise ParamsError(_message(problems))
    return Params({k: _Section(k, v) for k, v in data.items()})


class _Section:
    """Read-only attribute access to one validated section; reading an unlisted key is an error."""

    def __init__(self, name: str, values: dict):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, key):
        values = object.__getattribute__(self, "_values")
        if key not in values:
            raise AttributeError(f"{self._name}.{key} was not given to this stage; list it in dvc.yaml")
        value = values[key]  # a nested group (e.g. slim_vae.tune) reads the same way: cfg.tune.steps
        return _Section(f"{self._name}.{key}", value) if isinstance(value, dict) else value

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
            raise AttributeError(f"no params section {name!r} here; given: {sorted(self)}") from None


def seed_everything(seed: int, threads: int) -> None:
    """Fix every source of randomness and the thread count (timings and determinism depend on it)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
