"""The NanoSD family: the search's three objectives over all 32,768 architectures, and the members
picked from the front.

- **Quality** (modelled, expensive): `taFD[mnv2]` or `taKD[mnv2]` of a candidate's images against the
  teacher's, from the same fixed (prompt, noise) pairs and the teacher's sampler. The candidate is
  assembled from the healed base and the distilled modules; the teacher's images are made once.
- **Latency** (known): the latency table of `base.latency_backend`, predicted for every architecture.
- **Parameters** (known): at the study's width; SD-1.5-width counts are reported beside them.

The family, as in the paper: **Latency** is the fastest front member within a quality bound, **Params**
the smallest within the same bound, **Prime** the quality member: the knee of the front members that beat
both on quality, so it is never faster than Latency nor smaller than Params (the paper's Prime: 29 ms
and 215M against 20 ms and 130M).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import distill, quality, student, training
from .space import STAGES, Arch, enumerate_space, options

METRICS = ("taFD[mnv2]", "taKD[mnv2]")
MEMBERS = ("latency", "params", "prime")


@dataclass(frozen=True)
class Probe:
    pairs: int  # (prompt, noise) pairs per evaluation: images per candidate
    steps: int  # DDIM steps of the teacher's sampler
    guidance: float  # classifier-free guidance, as the teacher is sampled everywhere else
    metric: str  # which distance is the objective: 'taFD[mnv2]' or 'taKD[mnv2]'

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"quality metric {self.metric!r} is not one of {list(METRICS)}")


class QualityObjective:
    """Distance of a candidate's images to the teacher's, over fixed (prompt, noise) pairs.

    `noise_set` picks a disjoint draw of starting noises (the stability check compares two). `base` and
    `students_dir` assemble candidates by id; without them only whole U-Nets are scored (`unet_scores`)."""

    def __init__(self, teacher, base, students_dir: Path | None, net, prompts: list[str], probe: Probe,
                 seed: int, noise_set: int = 0):
        self.teacher, self.base, self.students_dir, self.net, self.probe = teacher, base, students_dir, net, probe
        self.seed = seed
        g = torch.Generator().manual_seed(seed * 1000 + 17 + noise_set)
        px = teacher.latent_px
        self.prompt_index = torch.arange(probe.pairs) % len(prompts)  # every prompt, in turn
        self.text = teacher.encode_prompts(list(prompts))[self.prompt_index]
        self.noise = torch.randn(probe.pairs, teacher.unet.config.in_channels, px, px, generator=g)
        self.teacher_images = self.images(teacher.unet)
        self.teacher_feats = quality.pooled_features(net, self.teacher_images)

    def images(self, unet, steps: int | None = None) -> torch.Tensor:
        """`unet`'s images of the pairs, with the probe's steps unless `steps` is given."""
        return training.generate(self.teacher, unet, self.text, self.noise,
                                 self.probe.steps if steps is None else steps,
                                 self.probe.guidance)

    def scores(self, arch: Arch, metrics=METRICS) -> dict[str, float]:
        """The distances asked for and the seconds the evaluation took (assembly included). The
        Fréchet distance costs a 1280x1280 matrix square root (~1.5 s here), the kernel one almost
        nothing, so the search computes only its own metric."""
        start = time.perf_counter()
        unet = distill.assemble(self.base, arch, self.students_dir)
        out = self.unet_scores(unet, metrics=metrics)
        return {**out, "seconds": time.perf_counter() - start}

    def unet_scores(self, unet, steps: int | None = None, metrics=METRICS) -> dict[str, float]:
        """The same distances for any U-Net on the same pairs: a baseline, a saved member, or the teacher
        sampled with `steps` instead of the probe's."""
        feats = quality.pooled_features(self.net, self.images(unet, steps))
        out = {}
        if "taFD[mnv2]" in metrics:
            out["taFD[mnv2]"] = quality.frechet(feats, self.teacher_feats)
        if "taKD[mnv2]" in metrics:
            out["taKD[mnv2]"] = quality.kernel(feats, self.teacher_feats, seed=self.seed)
        return out

    def __call__(self, arch: Arch) -> float:
        return self.scores(arch, (self.probe.metric,))[self.probe.metric]


# --- Known objectives over the whole space ------------------------------------------------------


def candidates() -> tuple[np.ndarray, list[str]]:
    """All 32,768 architectures as an integer matrix (E1 E2 E3 D3 D2 D1 option indices) and their ids."""
    archs = list(enumerate_space())
    return np.array([a.choices for a in archs], dtype=np.int64), [a.id for a in archs]


def additive(fixed: float, per_option: dict, matrix: np.ndarray) -> np.ndarray:
    """fixed + the chosen options' values for every row: how parameters, FLOPs and table latency add."""
    out = np.full(len(matrix), float(fixed))
    for j, stage in enumerate(STAGES):
        lookup = np.array([per_option[stage, i] for i in range(len(options(stage)))], dtype=float)
        out += lookup[matrix[:, j]]
    return out


def params_table(student_cfg: dict) -> tuple[float, dict]:
    """Parameters of the fixed parts and of every (stage, option), at the width `student_cfg` gives."""
    table = student.option_params(student_cfg)
    return table["fixed"], {k: v for k, v in table.items() if k != "fixed"}


def latency_table(table: dict) -> tuple[float, dict]:
    return table["fixed_ms"], {(k.split("/")[0], int(k.split("/")[1])): v for k, v in table["modules"].items()}


def flops_table(base, inputs: dict) -> tuple[float, dict]:
    """Forward FLOPs of the fixed parts and of every (stage, option), counted on their real inputs."""
    from .latency import stage_callables
    from .timing import count_flops

    calls, args = stage_callables(base, inputs)
    per = {(n.split("/")[0], int(n.split("/")[1])): count_flops(calls[n], args[n]) for n in calls if n != "fixed"}
    return count_flops(calls["fixed"], args["fixed"]), per


# --- Picking the family from the front ----------------------------------------------------------


def front(points: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """The non-dominated rows (all objectives minimised), one per architecture."""
    from .search import pareto_mask

    pts = points.drop_duplicates("id")
    return pts[pareto_mask(pts[objectives].to_numpy())].sort_values(objectives[1])


def pick(points: pd.DataFrame, objectives: list[str], bounds: dict[str, tuple[float, float]],
         quality_quantile: float, prime_rule: str = "quality_knee") -> tuple[dict[str, pd.Series], float]:
    """The three members from all evaluated points: `objectives` = [quality, latency, params].

    The quality bound is the `quality_quantile` of every evaluated candidate's quality: Latency and
    Params are the fastest and the smallest front members at least that good. Prime is, among the front
    members better on quality than both, the one closest to the ideal point (every objective at its
    lower bound) in the space normalised by `bounds`: the knee of the quality end, where no objective
    can improve much without another paying for it. Where no front member beats both, Prime is the
    best-quality one (then one of the two). With `prime_rule='knee'`, Prime is the knee of the whole
    front instead, which may be faster than Latency and worse than the bound."""
    if prime_rule not in ("quality_knee", "knee"):
        raise ValueError(f"prime_rule must be 'quality_knee' or 'knee', got {prime_rule!r}")
    q, lat, par = objectives
    pareto = front(points, objectives)
    bound = float(points[q].quantile(quality_quantile))
    good = pareto[pareto[q] <= bound]  # never empty: the best-quality point is on the front
    latency, params = good.loc[good[lat].idxmin()], good.loc[good[par].idxmin()]
    better = pareto if prime_rule == "knee" else good[good[q] < min(latency[q], params[q])]
    if better.empty:
        prime = good.loc[good[q].idxmin()]
    else:
        norm = np.stack([(better[o] - bounds[o][0]) / (bounds[o][1] - bounds[o][0]) for o in objectives], 1)
        norm = norm.clip(0, None)  # beyond an objective's lower bound is as good as the bound, not worse
        prime = better.iloc[int(np.argmin(np.linalg.norm(norm, axis=1)))]
    return {"latency": latency, "params": params, "prime": prime}, bound


def save_member(base, arch: Arch, students_dir: Path, folder: Path) -> Path:
    """A member as a NanoUNet folder (`save_pretrained`), written whole or not at all."""
    from .outputs import replace_dir

    unet = distill.assemble(base, arch, students_dir)
    tmp = folder.with_name(folder.name + ".partial")
    unet.save_pretrained(tmp)
    return replace_dir(tmp, folder)


def same_as(unets: dict) -> dict[str, str]:
    """{name: the first name holding the same model}. The search may pick one architecture for several
    members; they are then one model (same modules, same weights), and measuring it once per name only
    repeats work. Same means the same architecture id and equal weights; the teacher and the baselines
    (no id) stand for themselves."""
    first, out = {}, {}
    for name, unet in unets.items():
        arch = unet.config.get("arch")
        rep = first.get(arch) if arch is not None else None
        if rep is not None and _same_weights(unets[rep], unet):
            out[name] = rep
        else:
            out[name] = name
            if arch is not None:
                first.setdefault(arch, name)
    return out


def each_once(names, same: dict[str, str], compute, side_by_side: bool = False) -> dict:
    """{name: compute(name)}, computed once per model: a name that `same` maps to another reuses its result.

    `side_by_side` runs the computations on threads that split torch's (`parallel.side_by_side`); only
    for a `compute` that draws no random numbers and writes nothing shared, such as sampling from given
    noise."""
    reps = list(dict.fromkeys(same.get(name, name) for name in names))
    if side_by_side:
        from .parallel import side_by_side as run

        done = run({rep: (lambda stop, rep=rep: compute(rep)) for rep in reps})
    else:
        done = {rep: compute(rep) for rep in reps}
    return {name: done[same.get(name, name)] for name in names}


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- The search around the objectives -----------------------------------------------------------


def stability(objective: QualityObjective, other: QualityObjective, archs: list[Arch]) -> pd.DataFrame:
    """Both distances of each candidate on two disjoint noise sets; `attrs["spearman"]` holds the rank
    correlation between the sets for each distance (the objective's rank stability)."""
    from scipy.stats import spearmanr

    from .progress import bar

    rows = []
    for arch in bar(archs, desc="stability"):
        a, b = objective.scores(arch), other.scores(arch)
        fast = objective.scores(arch, (objective.probe.metric,))  # what one search evaluation costs
        rows.append({"id": arch.id, **{f"{m} (set 0)": a[m] for m in METRICS},
                     **{f"{m} (set 1)": b[m] for m in METRICS}, "seconds": fast["seconds"]})
    df = pd.DataFrame(rows).set_index("id")
    df.attrs["spearman"] = {m: float(spearmanr(df[f"{m} (set 0)"], df[f"{m} (set 1)"]).statistic)
                            for m in METRICS}
    return df


def problem(matrix: np.ndarray, ids: list[str], objective: QualityObjective, known: dict[str, np.ndarray],
            bounds: dict[str, tuple[float, float]], cost: str = "latency_ms"):
    """The search problem: quality (modelled), `cost` (known: 'latency_ms' or the 'flops' proxy) and
    parameters (known), all minimised."""
    from .search import Objective, Problem

    objectives = (Objective("quality", *bounds["quality"]),
                  Objective(cost, *bounds[cost], values=known[cost]),
                  Objective("params", *bounds["params"], values=known["params"]))
    return Problem(matrix, objectives, lambda i: [objective(Arch(tuple(int(c) for c in matrix[i])))],
                   ids=tuple(ids))


def search_cache(folder: Path, params: dict, *inputs: Path) -> Path:
    """The evaluation cache, kept between runs only if params, code and inputs are the same."""
    import shutil

    from .outputs import fingerprint

    stamp, print_ = folder / "fingerprint.txt", fingerprint(params, *inputs)
    if not (stamp.is_file() and stamp.read_text() == print_):
        for child in folder.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        stamp.write_text(print_)
    return folder / "evaluations.jsonl"


def summarise_runs(runs: list, flops_runs: list, lut_problem) -> dict:
    """Hypervolume per method (mean over seeds), what EHVI bought over random search, the search's own
    overhead, and the latency-vs-FLOPs comparison (FLOPs-driven points rescored by the table)."""
    from .search import evals_to_reach, hypervolume, reach_fraction

    traces = pd.DataFrame([{"method": r.method, "seed": r.seed, "evaluations": k + 1, "hv": h}
                           for r in runs for k, h in enumerate(r.hv)])
    by = {(r.method, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    table = pd.DataFrame([{"method": m, "hv_mean": np.mean([by[m, s].hv[-1] for s in seeds]),
                           "hv_min": min(by[m, s].hv[-1] for s in seeds),
                           "hv_max": max(by[m, s].hv[-1] for s in seeds),
                           "overhead_s_mean": np.mean([by[m, s].overhead_s for s in seeds]),
                           "eval_s_mean": np.mean([by[m, s].eval_s for s in seeds])}
                          for m in sorted({r.method for r in runs})]).set_index("method")
    budget = len(runs[0].hv)
    reach = [evals_to_reach(by["ehvi", s].hv, by["random", s].hv[-1]) for s in seeds]
    rescore = lut_problem.normalise  # the FLOPs runs' candidates, judged on table latency
    known = {o.name: o.values for o in lut_problem.objectives if o.known}

    def lut_points(r):
        y = np.column_stack([r.Y[:, 0], known["latency_ms"][r.indices], known["params"][r.indices]])
        return rescore(y)

    hv_lut = float(np.mean([hypervolume(lut_points(by["ehvi", s]), lut_problem.ref) for s in seeds]))
    hv_flops = float(np.mean([hypervolume(lut_points(r), lut_problem.ref) for r in flops_runs]))
    metrics = {f"hv_{m}": float(table.hv_mean[m]) for m in table.index}
    metrics |= {"ehvi_evals_to_match_random_frac": reach_fraction(reach, budget),
                "ehvi_reached_random_every_seed": all(k is not None for k in reach),
                "ehvi_ahead_of_random_every_seed": all(by["ehvi", s].hv[-1] > by["random", s].hv[-1] for s in seeds),
                "ehvi_overhead_s_mean": float(table.overhead_s_mean["ehvi"]),
                "hv_lut_over_flops": hv_lut / hv_flops if hv_flops > 0 else float("nan")}
    return {"table": table, "traces": traces, "metrics": metrics, "hv_lut": hv_lut, "hv_flops": hv_flops,
            "hv_lut_over_flops": metrics["hv_lut_over_flops"], "evals_to_reach": reach}


def describe_members(members: dict, base, students_dir: Path, family_dir: Path, inputs: dict,
                     latency_table: dict, threads: int) -> pd.DataFrame:
    """Save each member and time it whole on ONNX Runtime beside its table prediction."""
    import tempfile

    from .latency import predict_ms, time_models

    archs = {name: Arch.parse(row["id"]) for name, row in members.items()}
    nets = {name: student.load(save_member(base, a, students_dir, Path(family_dir) / name))
            for name, a in archs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        measured = time_models("onnxruntime", nets, inputs, threads, Path(tmp)).set_index("model")
    rows = {name: {"id": a.id, "layers": a.describe(), "quality": float(members[name]["quality"]),
                   "table_ms": predict_ms(latency_table, a),
                   "measured_ms_onnxruntime": float(measured.measured_ms[name]),
                   "params": int(members[name]["params"]), "sd15_params": int(members[name]["sd15_params"])}
            for name, a in archs.items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def quality_bounds(values) -> tuple[float, float]:
    """Fixed normalisation bounds for quality, set once from a random sample before any search: the
    sample's range widened by half on each side (a kernel distance can be slightly negative)."""
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = 0.5 * max(hi - lo, 1e-9)
    return lo - pad, hi + pad
