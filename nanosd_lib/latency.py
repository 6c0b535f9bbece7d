"""Latency tables: what a candidate U-Net costs a tile, measured, not estimated (how things are timed:
`timing`).

A candidate's latency is read from a table, `fixed_ms` + one cost per chosen (stage, option), so all
32,768 architectures can be ranked without timing them. The costs are fitted on whole-model
measurements with the per-module timings as the prior (`fit_table`), and checked on whole models the
fit never saw. Modules and whole models are timed interleaved, in shuffled rounds
(`timing.interleaved_timings`), so that whatever drifts on a machine (clock, neighbours, thermal state) hits
both alike and one cold run gives the table, its check and its noise floor.
"""
from __future__ import annotations

import copy
import json
import math
import platform
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr
from torch import nn

from .baseline import count_params
from .config import LATENCY_BACKENDS
from .progress import bar
from .space import DECODERS, STAGES, Arch, enumerate_space, option_names, options
from .space import sample as sample_space
from .timing import (BACKENDS, count_flops, example_inputs, host_call, interleaved_timings, median_ms, summarise,
                     torch_call, torch_threads)

# --- What is timed: every (stage, option), the fixed parts, whole models ---------------------------
#
# Every stage option is timed on the exact inputs it receives inside the deployed model (recorded by
# hooks on the base-architecture student), each as its own callable: torch eager, or an ONNX Runtime
# session of its own export.


class _EncoderCall(nn.Module):
    def __init__(self, stage):
        super().__init__()
        self.stage = stage

    def forward(self, h, temb, text):
        h, skips = self.stage(h, temb, text)
        return (h, *skips)


class _DecoderCall(nn.Module):
    def __init__(self, stage, upsample_size):
        super().__init__()
        self.stage, self.size = stage, upsample_size

    def forward(self, h, temb, text, *skips):
        return self.stage(h, list(skips), temb, text, upsample_size=self.size)


class _FixedCall(nn.Module):
    """conv_in, the time embedding and the output head: the parts every candidate shares."""

    def __init__(self, unet):
        super().__init__()
        # only the shared parts, not the whole U-Net: an export then carries their weights alone
        for name in ("conv_in", "time_proj", "time_embedding", "conv_norm_out", "conv_act", "conv_out"):
            setattr(self, name, getattr(unet, name))

    def forward(self, sample, t, last):
        temb = self.time_embedding(self.time_proj(t).to(sample.dtype))
        return self.conv_in(sample), temb, self.conv_out(self.conv_act(self.conv_norm_out(last)))


class WholeCall(nn.Module):
    """A U-Net as a plain (sample, timestep, text) -> noise callable, for export and timing."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, text):
        return self.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]


class _Lazy(Mapping):
    """name -> module, built when asked for: at SD-1.5 width all 37 at once would need ~14 GB."""

    def __init__(self, builders: dict):
        self._builders = builders

    def __getitem__(self, name):
        return self._builders[name]()

    def __iter__(self):
        return iter(self._builders)

    def __len__(self):
        return len(self._builders)


@torch.no_grad()
def stage_callables(base, inputs: dict) -> tuple[Mapping, dict]:
    """(callables, their positional inputs) for every (stage, option) and for the fixed parts.

    The callables are built on demand, each from a fresh copy of the base's block."""
    from . import student, surgery
    from .recorder import Recorder

    ref, _ = student.from_base(base, Arch.teacher())
    with Recorder(ref, [f"stages.{s}" for s in STAGES]) as rec:
        out = ref(*inputs.values()).sample
    assert out.shape == inputs["sample"].shape
    builders, args = {}, {}
    cfg = dict(ref.config)

    def build(stage, i, size):
        block = base.get_submodule(surgery.BASE_MODULES[stage])
        mod = student.build_stage(stage, i, copy.deepcopy(block), cfg).eval()
        return _DecoderCall(mod, size) if stage in DECODERS else _EncoderCall(mod)

    for stage in STAGES:
        (a, kw, _), = rec.calls[f"stages.{stage}"]
        for i in range(len(options(stage))):
            name = f"{stage}/{i}"
            builders[name] = lambda s=stage, i=i, size=kw.get("upsample_size"): build(s, i, size)
            if stage in DECODERS:
                h, skips, temb, text = a
                args[name] = (h, temb, text, *skips)
            else:
                args[name] = tuple(a)
    builders["fixed"] = lambda: _FixedCall(ref)
    args["fixed"] = (inputs["sample"], inputs["timestep"], rec.calls["stages.D1"][0][2])
    return _Lazy(builders), args


# --- Fitting the table on whole models ----------------------------------------------------------
#
# Why this form. A whole model is not the sum of its modules timed alone: inside it, every stage
# runs with the other stages' activations and skips in cache, and one call's overhead replaces
# seven. One context factor set on one model did not carry from one machine to another (6 % MAPE
# on one, 16 % on the other), and how much the context costs differs by stage (it grows with the
# activations a stage keeps alive). Least squares on the option indicators alone (31 free costs)
# needs far more than 48 noisy whole models to pin every option down. So the costs are fitted as
#     whole(arch) = a + sum_s (b + e_s) * module_ms[s, c_s] + d[s, c_s]
# an intercept a and a common scale b, free (the affine calibration of the module sum), a per-stage
# scale deviation e_s and a per-option correction d, both ridged toward 0: the table moves away from
# the calibrated module timings only as far as the whole-model data insist. The two penalty
# strengths are chosen by leave-one-out error on the fit models (exact in closed form for a linear
# smoother), from grids that include infinity (no deviation), with the one-standard-error rule.
# Residuals are weighted by 1/measured, so the fit minimises relative error, which MAPE reports.

LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, math.inf)


def _design(archs: Sequence[Arch], module_ms: Mapping[str, float]) -> np.ndarray:
    """Columns: intercept, module sum, the chosen option's module time per stage, one indicator
    per option."""
    names = option_names()
    index = {n: j for j, n in enumerate(names)}
    x = np.zeros((len(archs), 2 + len(STAGES) + len(names)))
    x[:, 0] = 1.0
    for r, arch in enumerate(archs):
        for k, (stage, choice) in enumerate(zip(STAGES, arch.choices)):
            x[r, 2 + k] = module_ms[f"{stage}/{choice}"]
            x[r, 2 + len(STAGES) + index[f"{stage}/{choice}"]] = 1.0
    x[:, 1] = x[:, 2:2 + len(STAGES)].sum(1)
    return x


def _ridge(x: np.ndarray, y: np.ndarray, penalty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least squares weighted by 1/y^2, each coefficient pulled to 0 by its penalty (0: free,
    infinity: fixed at 0). Returns (coefficients, leave-one-out relative errors)."""
    keep = np.isfinite(penalty)
    xk, w = x[:, keep], 1.0 / y ** 2
    a_inv = np.linalg.pinv(xk.T @ (w[:, None] * xk) + np.diag(penalty[keep]))  # pinv: an option
    beta = np.zeros(x.shape[1])                                                 # never drawn
    beta[keep] = a_inv @ xk.T @ (w * y)
    hat = np.einsum("ij,jk,ik->i", xk, a_inv, xk) * w
    loo = (y - x @ beta) / np.clip(1.0 - hat, 1e-9, None) / y
    return beta, loo


def fit_table(module_ms: Mapping[str, float], archs: Sequence[Arch], measured_ms: Sequence[float],
              stage_lambdas: Sequence[float] = LAMBDAS, option_lambdas: Sequence[float] = LAMBDAS,
              prior: bool = True) -> dict:
    """`fixed_ms` and `modules` fitted on whole-model measurements (see the note above), and the
    fit's provenance. `prior=False` drops the module timings: least squares on the option
    indicators alone (a tiny ridge keeps it defined), kept for comparison."""
    n_stage, names = len(STAGES), option_names()
    if len(archs) != len(measured_ms) or len(archs) < 10:
        raise ValueError(f"fit_table needs one measurement per architecture and at least 10 of "
                         f"them; got {len(archs)} architectures, {len(measured_ms)} measurements")
    y = np.asarray(measured_ms, dtype=float)
    x = _design(archs, module_ms)
    grid = [(ls, lo) for ls in stage_lambdas for lo in option_lambdas]
    if not prior:
        grid = [(math.inf, 1e-6)]

    def penalty(ls, lo):
        p = np.concatenate([[0.0, 0.0 if prior else math.inf], np.full(n_stage, ls),
                            np.full(len(names), lo / y.mean() ** 2)])  # d in ms, relative to mean
        return p

    loo = {g: 100 * np.abs(_ridge(x, y, penalty(*g))[1]) for g in grid}
    score = {g: float(e.mean()) for g, e in loo.items()}
    lowest = min(grid, key=score.get)
    # One-standard-error rule: of the penalties whose leave-one-out error is within one standard
    # error of the lowest, the strongest (option corrections first: they are 36 numbers, the stage
    # deviations 6). With fewer fit models than coefficients the lowest LOO error is optimistic.
    within = score[lowest] + loo[lowest].std(ddof=1) / math.sqrt(len(y))
    best = max((g for g in grid if score[g] <= within), key=lambda g: (g[1], g[0]))
    beta, _ = _ridge(x, y, penalty(*best))
    scale = {s: float(beta[1] + beta[2 + k]) for k, s in enumerate(STAGES)}
    modules = {n: float(scale[n.split("/")[0]] * module_ms[n] + beta[2 + n_stage + j])
               for j, n in enumerate(names)}
    method = ("calibrated module timings: free intercept and common scale, per-stage scale and "
              "per-option corrections ridged toward 0, weighted by 1/measured, penalties by "
              "leave-one-out" if prior else "option indicators, weighted least squares, no prior")
    return {"fixed_ms": float(beta[0]), "modules": modules,
            "fit": {"method": method, "lambda_stage": best[0], "lambda_option": best[1],
                    "loo_mape_%": score[best], "stage_scale": scale,
                    "loo_mape_by_lambda_%": {f"{a}/{b}": v for (a, b), v in score.items()},
                    "models": [a.id for a in archs]}}


def fastest(table: dict) -> Arch:
    """The architecture the table predicts fastest, out of all 32,768."""
    return min(enumerate_space(), key=lambda a: predict_ms(table, a))


def predict_ms(table: dict, arch: Arch) -> float:
    """fixed + the cost of each chosen option."""
    return table["fixed_ms"] + sum(table["modules"][f"{s}/{c}"] for s, c in zip(STAGES, arch.choices))


def whole_model_sets(fit_models: int, check_models: int, seed: int) -> tuple[list[Arch], list[Arch]]:
    """(fit, check) architectures, disjoint.

    Fit: the base, then a balanced design (each stage's options drawn equally often, in shuffled
    combinations), so that every option is seen about fit/8 times or more. Check: uniform draws from
    the space, the distribution the search will ask about."""
    rng = random.Random(seed)
    for _ in range(100):
        columns = []
        for stage in STAGES:
            col = [i % len(options(stage)) for i in range(fit_models - 1)]
            rng.shuffle(col)
            columns.append(col)
        fit = [Arch.teacher()] + [Arch(tuple(row)) for row in zip(*columns)]
        if len(set(fit)) == len(fit):
            break
    else:
        raise RuntimeError(f"could not draw {fit_models} distinct fit architectures")
    taken = set(fit)
    check = [a for a in sample_space(check_models + len(fit), seed + 1) if a not in taken]
    return fit, check[:check_models]


# --- One cold run: modules and whole models interleaved, fitted, checked --------------------------


@dataclass(frozen=True)
class TablePlan:
    rounds: int = 16  # interleaved rounds; an item's latency is its median over rounds
    runs: int = 5  # timed calls per item per round, median kept: robust to one-off stalls
    warmup: int = 1  # untimed calls per item per round: its weights back in cache after the others
    fit_models: int = 48  # whole models the costs are fitted on (2 free numbers, 42 ridged ones)
    check_models: int = 24  # whole models held out from the fit: the reported error
    seed: int = 0  # draws the models and each round's order

    def __post_init__(self):
        minimum = {"rounds": 2, "runs": 1, "warmup": 0, "fit_models": 10, "check_models": 2}
        for key, least in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or value < least:
                raise ValueError(f"TablePlan.{key}={value!r}; it must be an integer >= {least}"
                                 + (" (two halves of the rounds give the noise floor)"
                                    if key == "rounds" else ""))


def measure_table(backend: str, base, inputs: dict, plan: TablePlan, threads: int, workdir: Path,
                  scale: str, extra: Mapping[str, nn.Module] | None = None) -> dict:
    """The fitted latency table of one host backend, from one cold run.

    Every option, the fixed parts, the fit and check whole models and the `extra` U-Nets (e.g. the
    teacher: timed, not fitted) are prepared once (ONNX: one export and session each), then timed
    together in `plan.rounds` shuffled rounds. Returns plain data:
    - `table`: the JSON table (`fixed_ms`, `modules`, provenance, the fit, the check metrics);
    - `whole`: one row per whole model: set (fit/check/extra), measured, predicted, error, FLOPs;
    - `options`: one row per (stage, option): module timing and fitted cost;
    - `methods`: held-out error of the chosen fit beside the simpler alternatives;
    - `metrics`: held-out MAPE, worst error, Spearman rho (table, FLOPs), noise floor;
    - `timings`: every per-round median.
    """
    from . import student

    if backend not in BACKENDS:
        raise ValueError(f"measure_latency.backends: {backend!r} is not a host backend: one of {BACKENDS}")
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fit, check = whole_model_sets(plan.fit_models, plan.check_models, plan.seed)
    wholes = {a.id: ("fit", a) for a in fit} | {a.id: ("check", a) for a in check}
    wholes |= {name: ("extra", unet) for name, unet in (extra or {}).items()}
    whole_args = tuple(inputs.values())
    modules, args = stage_callables(base, inputs)
    calls, info = {}, {}
    with torch_threads(threads):
        for name in bar(modules, desc=f"{backend}: prepare modules"):
            calls[name] = host_call(backend, modules[name], args[name], threads, workdir, name)
        for name, (kind, what) in bar(wholes.items(), desc=f"{backend}: prepare whole models"):
            unet = student.from_base(base, what)[0] if kind != "extra" else what
            whole = WholeCall(unet)
            info[name] = {"set": kind, "flops": count_flops(whole, whole_args),
                          "params": count_params(unet)}
            calls[f"whole/{name}"] = host_call(backend, whole, whole_args, threads, workdir,
                                               f"whole-{name}")
        timings = interleaved_timings(calls, plan.rounds, plan.runs, plan.warmup, plan.seed,
                                      desc=f"{backend}: {plan.rounds} rounds")
    summary = summarise(timings)
    module_ms = {n: float(summary.ms[n]) for n in option_names()}
    measured = {n: float(summary.ms[f"whole/{n}"]) for n in wholes}
    fitted = fit_table(module_ms, fit, [measured[a.id] for a in fit])
    table = {**table_meta(backend, threads, plan.runs, inputs, scale), "rounds": plan.rounds,
             "warmup": plan.warmup, "fixed_ms": fitted["fixed_ms"], "modules": fitted["modules"],
             "fit": {**fitted["fit"], "check_models": [a.id for a in check]},
             "measured": {"fixed_ms": float(summary.ms["fixed"]), "modules": module_ms,
                          "whole": measured}}
    whole = _whole_frame(wholes, info, summary, table)
    methods = _compare_methods(module_ms, float(summary.ms["fixed"]), fit, check, measured, table)
    metrics = _check_metrics(whole, fitted["fit"], time.perf_counter() - start)
    table["check"] = metrics
    opts = pd.DataFrame([{"stage": n.split("/")[0], "option": int(n.split("/")[1]),
                          "name": options(n.split("/")[0])[int(n.split("/")[1])].name,
                          "module_ms": module_ms[n], "fitted_ms": table["modules"][n]}
                         for n in option_names()])
    return {"table": table, "whole": whole, "options": opts, "methods": methods,
            "metrics": metrics, "timings": timings}


def _whole_frame(wholes: dict, info: dict, summary: pd.DataFrame, table: dict) -> pd.DataFrame:
    rows = []
    for name, (kind, what) in wholes.items():
        s = summary.loc[f"whole/{name}"]
        arch = kind != "extra"
        rows.append({"model": name, **info[name], "measured_ms": s.ms,
                     "first_half_ms": s.first_half_ms, "second_half_ms": s.second_half_ms,
                     "predicted_ms": predict_ms(table, what) if arch else math.nan,
                     "module_sum_ms": predict_ms(table["measured"], what) if arch else math.nan})
    df = pd.DataFrame(rows)
    df["error_%"] = 100 * (df.predicted_ms - df.measured_ms) / df.measured_ms
    return df


def _errors(predicted: np.ndarray, measured: np.ndarray) -> dict:
    err = 100 * np.abs(predicted - measured) / measured
    return {"mape_%": float(err.mean()), "worst_%": float(err.max()),
            "spearman": float(spearmanr(predicted, measured).statistic)}


def _compare_methods(module_ms, fixed_ms, fit, check, measured, table) -> pd.DataFrame:
    """Held-out error of the chosen fit and of the simpler tables it replaces."""
    y = np.array([measured[a.id] for a in check])
    y_fit = [measured[a.id] for a in fit]
    candidates = {"sum of module timings": {"fixed_ms": fixed_ms, "modules": module_ms},
                  "module sum, calibrated (a + b * sum)":
                      fit_table(module_ms, fit, y_fit, (math.inf,), (math.inf,)),
                  "per-stage scales, no option corrections":
                      fit_table(module_ms, fit, y_fit, option_lambdas=(math.inf,)),
                  "option indicators, no prior": fit_table(module_ms, fit, y_fit, prior=False),
                  "chosen: ridge toward the calibrated modules": table}
    rows = []
    for method, t in candidates.items():
        rows.append({"method": method,
                     **_errors(np.array([predict_ms(t, a) for a in check]), y)})
    return pd.DataFrame(rows)


def _check_metrics(whole: pd.DataFrame, fit: dict, seconds: float) -> dict:
    held = whole[whole.set == "check"]
    ok = _errors(held.predicted_ms.to_numpy(), held.measured_ms.to_numpy())
    in_fit = whole[whole.set == "fit"]
    # Noise floor: the two halves of the rounds are two independent measurements of each model.
    # Their spread is that of a half-length measurement; the full median used above is about
    # sqrt(2) less noisy, and a prediction error near this number is as good as it can get.
    a, b = whole.first_half_ms, whole.second_half_ms
    noise = 100 * (a - b).abs() / ((a + b) / 2)
    return {"heldout_mape_%": ok["mape_%"], "heldout_worst_%": ok["worst_%"],
            "spearman_table": ok["spearman"],
            "spearman_flops": float(spearmanr(held.flops, held.measured_ms).statistic),
            "fit_mape_%": float(in_fit["error_%"].abs().mean()), "loo_mape_%": fit["loo_mape_%"],
            "noise_mape_%": float(noise.mean()), "noise_worst_%": float(noise.max()),
            "lambda_stage": fit["lambda_stage"],
            "lambda_option": fit["lambda_option"], "fit_models": len(in_fit), "check_models": len(held),
            "seconds": seconds}


def time_models(backend: str, models: Mapping[str, nn.Module], inputs: dict, threads: int,
                workdir: Path, rounds: int = 8, runs: int = 5, seed: int = 0) -> pd.DataFrame:
    """Whole U-Nets timed interleaved (e.g. the table's fastest architecture, found after the fit):
    one row per model, `measured_ms` its median over rounds."""
    args = tuple(inputs.values())
    with torch_threads(threads):
        calls = {name: host_call(backend, WholeCall(unet), args, threads, Path(workdir),
                                 f"whole-{name}") for name, unet in models.items()}
        timings = interleaved_timings(calls, rounds, runs, 1, seed, desc=f"{backend}: whole models")
    return (summarise(timings).rename(columns={"ms": "measured_ms"}).rename_axis("model")
            .reset_index())


# --- The same table at SD-1.5 width ---------------------------------------------------------------


@torch.no_grad()
def measure_sd15_width(threads: int, runs: int = 3, random_models: int = 3, seed: int = 0,
                       unet_config: dict | None = None, latent_px: int = 64, text_len: int = 77
                       ) -> dict:
    """The torch-eager table of the pruned base at SD-1.5 width (random weights: latency does not
    depend on their values), one 64x64 tile, 77 tokens; checked on whole models.

    Each option is built, timed and dropped before the next (all 37 at once would need ~14 GB), so
    modules and whole models cannot be interleaved and too few whole models fit in minutes for the
    per-stage fit: one context factor is fitted (relative least squares) on the base and the
    table's fastest architecture, the two ends of the range, and checked on `random_models` random
    candidates. Returns {"table", "whole" (DataFrame), "metrics"}.
    """
    from diffusers import UNet2DConditionModel

    from . import student, surgery
    from .baseline import SD15_UNET

    start = time.perf_counter()
    with torch.device("meta"):
        cfg = surgery.base_config(UNet2DConditionModel(**(unet_config or SD15_UNET)).config)
    torch.manual_seed(seed)
    base = UNet2DConditionModel(**cfg).eval()
    inputs = example_inputs(base.config, latent_px, text_len, seed)
    modules, args = stage_callables(base, inputs)
    raw = {}
    with torch_threads(threads):
        for name in bar(modules, desc="sd15 width: modules"):
            module = modules[name]  # built here, freed at the next iteration
            raw[name] = median_ms(torch_call(module, args[name]), runs)
            del module
        table = {"fixed_ms": raw.pop("fixed"), "modules": raw}
        quickest = fastest(table)
        archs = [("fit", Arch.teacher()), ("fit", quickest)]
        archs += [("check", a) for a in sample_space(random_models + 2, seed + 5)
                  if a not in (Arch.teacher(), quickest)][:random_models]
        rows = []
        for kind, arch in bar(archs, desc="sd15 width: whole models"):
            net = student.from_base(base, arch)[0]
            ms = median_ms(torch_call(WholeCall(net), tuple(inputs.values())), runs)
            rows.append({"model": arch.id, "set": kind, "measured_ms": ms,
                         "params": count_params(net),
                         "module_sum_ms": predict_ms(table, arch)})
            del net
    whole = pd.DataFrame(rows)
    fit = whole[whole.set == "fit"]
    ratio = fit.module_sum_ms / fit.measured_ms
    factor = float((ratio.sum()) / (ratio ** 2).sum())  # argmin_c sum((c*p - y)/y)^2
    whole["predicted_ms"] = factor * whole.module_sum_ms
    whole["error_%"] = 100 * (whole.predicted_ms - whole.measured_ms) / whole.measured_ms
    held = whole[whole.set == "check"]
    table = {**table_meta("torch", threads, runs, inputs, "sd15-width, random weights"),
             "fixed_ms": factor * table["fixed_ms"],
             "modules": {k: factor * v for k, v in table["modules"].items()},
             "fit": {"method": "one context factor on the module timings, relative least squares",
                     "context_factor": factor, "models": list(fit.model),
                     "check_models": list(held.model)},
             "measured": {"fixed_ms": table["fixed_ms"], "modules": table["modules"],
                          "whole": dict(zip(whole.model, whole.measured_ms))}}
    metrics = {"heldout_mape_%": float(held["error_%"].abs().mean()),
               "heldout_worst_%": float(held["error_%"].abs().max()),
               "base_ms": float(whole.measured_ms[0]), "fastest_ms": float(whole.measured_ms[1]),
               "fastest_arch": quickest.id, "context_factor": factor,
               "seconds": time.perf_counter() - start}
    table["check"] = metrics
    return {"table": table, "whole": whole, "metrics": metrics}


# --- Provenance, and the table later stages read ------------------------------------------------


def table_meta(backend: str, threads: int, runs: int, inputs: dict, scale: str) -> dict:
    import onnxruntime

    from .outputs import machine

    version = torch.__version__ if backend == "torch" else onnxruntime.__version__
    return {"backend": backend, "version": version, "threads": threads, "runs": runs,
            "scale": scale, "machine": machine(), "python": platform.python_version(),
            "shapes": {k: list(v.shape) for k, v in inputs.items()}}


def load_table(backend: str, data_dir: str | Path, context: dict | None = None) -> dict:
    """The latency table later stages use, chosen by `base.latency_backend`: `fixed_ms` + `modules`, so
    `predict_ms(table, arch)` reads any of them. 'qai-hub' assembles the SM8750 table from the
    AI Hub cache and refuses, saying what is missing, until every option is measured; with `context`
    (`aihub.model_context` of the pruned base and its inputs), also until every option is measured
    at that width and input shape, so a table from another scale is never read as this one's."""
    data_dir = Path(data_dir)
    if backend == "qai-hub":
        from .devicecache import device_table

        return {"source": "qai-hub", **device_table(data_dir / "device" / "sm8750.json", context)}
    if backend not in BACKENDS:
        raise ValueError(f"base.latency_backend {backend!r} is not one of {LATENCY_BACKENDS}")
    path = data_dir / "latency" / f"{backend}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {backend} latency table; run the measure_latency stage")
    return {"source": backend, **json.loads(path.read_text())}
