"""Multi-objective search over a finite candidate set: EHVI, random and NSGA-II on one budget.

A problem is a finite set of candidates (an n x d integer matrix of option indices, one string id per row)
and objectives to minimise. A *modelled* objective is expensive: `evaluate(i)` returns it and a GP learns
it. A *known* objective is a vector with one value per candidate (parameters, table latency) and is never
modelled. Each objective is normalised by fixed bounds (lo -> 0, hi -> 1) and hypervolume is measured
against one fixed reference point in that space, so that traces of methods and seeds compare.

Every method spends the same budget of distinct evaluations: the first `n_init` drawn at random (the same
draw for every method at a given seed), then rounds of `q`. Evaluations go through a JSON-lines cache keyed
by candidate id, so a killed search resumes where it stopped; randomness is seeded by (seed, evaluations so
far), never by time, so a rerun from the cache makes the same choices and the same trace.

EHVI follows BoTorch's multi-objective tutorial: the models are refit from scratch every round, then q
candidates are picked by sequential greedy qLogNEHVI over unevaluated candidates.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.fit import fit_gpytorch_mll
from botorch.models import SingleTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.models.model import ModelList
from botorch.models.transforms.outcome import Standardize
from botorch.models.utils.gpytorch_modules import get_covar_module_with_dim_scaled_prior
from botorch.optim.optimize import optimize_acqf_discrete
from botorch.sampling.get_sampler import get_sampler
from botorch.utils.multi_objective.box_decompositions.dominated import DominatedPartitioning
from gpytorch.mlls import ExactMarginalLogLikelihood
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.evaluator import Evaluator
from pymoo.core.problem import Problem as PymooProblem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.problems.static import StaticProblem

from .progress import bar

METHODS = ("ehvi", "random", "nsga2")
NSGA2_MAX_STALL = 100  # generations in a row with no unevaluated candidate before nsga2 gives up


@dataclass(frozen=True, eq=False)
class Objective:
    name: str  # column of results, key in the cache file
    lo: float  # normalisation: lo -> 0 ...
    hi: float  # ... and hi -> 1; the reference point sits just beyond hi on every axis
    values: np.ndarray | None = None  # known: one value per candidate; None: modelled (evaluate returns it)

    def __post_init__(self):
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"objective {self.name!r}: bounds need finite lo < hi, "
                             f"got lo={self.lo!r}, hi={self.hi!r}")
        if self.values is not None:
            object.__setattr__(self, "values", np.asarray(self.values, float))

    @property
    def known(self) -> bool:
        return self.values is not None


@dataclass(frozen=True, eq=False)
class Problem:
    candidates: np.ndarray  # n x d integer option indices, one distinct row per candidate
    objectives: tuple[Objective, ...]  # all minimised; two or more, at least one modelled
    evaluate: Callable[[int], Sequence[float]]  # candidate index -> its modelled objectives, in order
    ids: tuple[str, ...] = ()  # cache keys; default: the row's options joined by '-'
    features: np.ndarray | None = None  # n x f GP inputs; default: each column min-max scaled to [0, 1]
    ref: float = 1.1  # reference point on every normalised axis: 10% beyond hi still counts

    def __post_init__(self):
        c = np.asarray(self.candidates)
        if c.ndim != 2 or c.shape[0] < 2 or not np.issubdtype(c.dtype, np.integer):
            raise ValueError(f"candidates must be an integer n x d matrix with n >= 2, "
                             f"got shape {c.shape} of {c.dtype}")
        n = c.shape[0]
        if len(np.unique(c, axis=0)) != n:
            raise ValueError(f"candidates has {n - len(np.unique(c, axis=0))} repeated rows; "
                             f"each candidate must appear once")
        names = [o.name for o in self.objectives]
        if len(names) < 2 or len(set(names)) != len(names) or all(o.known for o in self.objectives):
            raise ValueError(f"objectives {names}: need two or more distinct names, at least one "
                             f"modelled (values=None)")
        for o in self.objectives:
            if o.known and (np.shape(o.values) != (n,) or not np.isfinite(o.values).all()):
                raise ValueError(f"objective {o.name!r}: known values must be {n} finite numbers, one "
                                 f"per candidate; got shape {np.shape(o.values)}")
        ids = tuple(self.ids) or tuple("-".join(map(str, row)) for row in c)
        if len(ids) != n or len(set(ids)) != n:
            raise ValueError(f"ids: need {n} distinct strings, got {len(ids)} ({len(set(ids))} distinct)")
        span = np.maximum(c.max(0) - c.min(0), 1)
        f = (c - c.min(0)) / span if self.features is None else np.asarray(self.features, float)
        if f.ndim != 2 or f.shape[0] != n or not np.isfinite(f).all():
            raise ValueError(f"features must be a finite {n} x f matrix, got shape {f.shape}")
        if not self.ref >= 1.0:
            raise ValueError(f"ref={self.ref!r}: the reference point must be >= 1, beyond every hi")
        object.__setattr__(self, "candidates", c)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "features", f)

    @property
    def n(self) -> int:
        return self.candidates.shape[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.objectives)

    def normalise(self, Y: np.ndarray) -> np.ndarray:
        lo, hi = (np.array([getattr(o, k) for o in self.objectives]) for k in ("lo", "hi"))
        return (np.asarray(Y, float) - lo) / (hi - lo)


@dataclass(frozen=True)
class SearchConfig:
    budget: int = 40  # distinct candidates evaluated by every method: the unit methods are compared in
    n_init: int = 8  # random first designs, the same draw for every method at a given seed
    q: int = 4  # candidates per round: EHVI's batch, NSGA-II's offspring per generation
    # EHVI scores `pool` random unevaluated candidates a round (None: all). Measured on 1 thread, 32,768
    # candidates, 1 modelled + 2 known objectives, q=4, 40 evaluations: scoring all costs ~70 s a round;
    # a whole run costs 30-45 s with pool 1,024 and 64 MC samples, 50-75 s with 2,048, 60-100 s with
    # 1,024 and 128 MC samples
    pool: int | None = 1024
    mc_samples: int = 64  # qLogNEHVI's MC samples; each costs a box decomposition per greedy pick
    max_batch_size: int = 2048  # candidates scored per acquisition call: bounds memory, not the result

    def __post_init__(self):
        for key, least in (("n_init", 2), ("q", 1), ("mc_samples", 1), ("max_batch_size", 1)):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < least:
                raise ValueError(f"SearchConfig.{key}={getattr(self, key)!r}; it must be an integer "
                                 f">= {least}")
        if not isinstance(self.budget, int) or self.budget < self.n_init:
            raise ValueError(f"SearchConfig.budget={self.budget!r}; it must be an integer >= "
                             f"n_init={self.n_init} (the random designs are part of the budget)")
        if self.pool is not None and (not isinstance(self.pool, int) or self.pool < self.q):
            raise ValueError(f"SearchConfig.pool={self.pool!r}; it must be None (all) or an integer "
                             f">= q={self.q}")


@dataclass
class Result:
    method: str  # which method chose the candidates
    seed: int  # the draw: first designs, EHVI pools and MC samples, NSGA-II's operators
    indices: np.ndarray  # candidates in evaluation order; a prefix is the search after that many
    Y: np.ndarray  # budget x m raw objective values (modelled and known), columns as `names`
    hv: np.ndarray  # normalised hypervolume after each evaluation: the curve methods are compared on
    overhead_s: float  # wall time minus evaluations: model fits and acquisition, or ask/tell
    eval_s: float  # evaluation seconds as recorded in the cache: the budget's cost, cached or not
    names: tuple[str, ...]  # objective names, the columns of Y
    ids: tuple[str, ...]  # the evaluated candidates' ids, for reading

    def to_frame(self) -> pd.DataFrame:
        """One row per evaluation: method, seed, evaluations, id, objectives, hv, pareto (of the run)."""
        df = pd.DataFrame(self.Y, columns=list(self.names))
        df.insert(0, "id", list(self.ids))
        df.insert(0, "evaluations", np.arange(1, len(df) + 1))
        df.insert(0, "seed", self.seed)
        df.insert(0, "method", self.method)
        df["hv"] = self.hv
        df["pareto"] = pareto_mask(self.Y)
        return df


# --- Hypervolume -----------------------------------------------------------------------------------

def hypervolume(Y: np.ndarray, ref: float | Sequence[float]) -> float:
    """Volume dominated by minimisation points `Y` (k x m) and bounded by `ref` (BoTorch's boxes)."""
    Y = torch.as_tensor(np.asarray(Y, float))
    if Y.shape[0] == 0:
        return 0.0
    r = torch.as_tensor(np.broadcast_to(np.asarray(ref, float), Y.shape[-1:]).copy())
    return float(DominatedPartitioning(ref_point=-r, Y=-Y).compute_hypervolume())  # BoTorch maximises


def hv_trace(Y: np.ndarray, ref: float | Sequence[float]) -> np.ndarray:
    """Hypervolume of the first k points, for k = 1..len(Y)."""
    return np.array([hypervolume(Y[:k], ref) for k in range(1, len(Y) + 1)])


def pareto_mask(Y: np.ndarray) -> np.ndarray:
    """True for rows no other row dominates (minimisation: <= on all objectives, < on one)."""
    Y = np.asarray(Y, float)
    le = (Y[:, None, :] <= Y[None, :, :]).all(-1)  # le[j, i]: j is no worse than i everywhere
    lt = (Y[:, None, :] < Y[None, :, :]).any(-1)
    return ~(le & lt).any(0)


def evals_to_reach(trace: Sequence[float], target: float) -> int | None:
    """The first evaluation count whose hypervolume is >= target, or None if the trace never gets there."""
    hits = np.flatnonzero(np.asarray(trace) >= target)
    return int(hits[0]) + 1 if len(hits) else None


def reach_fraction(reach: Sequence[int | None], budget: int) -> float:
    """The mean share of the budget that `evals_to_reach` counts over seeds; NaN if any seed never got
    there (counting it as the whole budget would flatter the method)."""
    return float(np.mean([k / budget if k is not None else np.nan for k in reach]))


# --- Evaluations, cached -----------------------------------------------------------------------------

class _Cache:
    """Evaluations by candidate id in a JSON-lines file that only grows, one flushed line each."""

    def __init__(self, path: Path | None, names: list[str]):
        self.path, self.records = path, {}
        if path is None or not path.exists():
            return
        raw = path.read_bytes()
        body, newline, tail = raw.rpartition(b"\n")
        if tail:  # an unterminated last line is a kill mid-write: drop it, so appends start clean
            with open(path, "r+b") as f:
                f.truncate(len(body) + len(newline))
        for k, line in enumerate(body.split(b"\n") if newline else [], 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[rec["id"]] = ([float(rec["values"][m]) for m in names], float(rec["seconds"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {k} is not an evaluation of this problem's modelled "
                                 f"objectives {names} (missing or bad {e}); give another cache file") from e

    def put(self, cid: str, values: list[float], seconds: float, names: list[str]):
        self.records[cid] = (values, seconds)
        if self.path is not None:
            line = json.dumps({"id": cid, "values": dict(zip(names, values)), "seconds": seconds})
            with open(self.path, "a") as f:
                f.write(line + "\n")
                f.flush()


class _Log:
    """A run's evaluated candidates in order, each looked up in the cache before it is evaluated."""

    def __init__(self, problem: Problem, cache: _Cache, progress):
        self.problem, self.cache, self.progress = problem, cache, progress
        self.modelled = [o.name for o in problem.objectives if not o.known]
        self.indices, self.rows, self.seen = [], [], {}
        self.eval_s = self.wall_s = 0.0

    def __len__(self):
        return len(self.indices)

    def add(self, i: int) -> np.ndarray:
        start, cid = time.perf_counter(), self.problem.ids[i]
        if cid not in self.cache.records:
            y = np.atleast_1d(np.asarray(self.problem.evaluate(i), float))
            if y.shape != (len(self.modelled),) or not np.isfinite(y).all():
                raise ValueError(f"evaluate({i}) for {cid!r} returned {y.tolist()}; expected "
                                 f"{len(self.modelled)} finite values for {self.modelled}")
            self.cache.put(cid, [float(v) for v in y], time.perf_counter() - start, self.modelled)
        values, seconds = self.cache.records[cid]
        got = iter(values)
        row = np.array([o.values[i] if o.known else next(got) for o in self.problem.objectives], float)
        self.indices.append(i)
        self.rows.append(row)
        self.seen[i] = row
        self.eval_s += seconds
        self.wall_s += time.perf_counter() - start
        self.progress.update(1)
        return row


# --- Methods ----------------------------------------------------------------------------------------

def _random(problem: Problem, config: SearchConfig, seed: int, order: np.ndarray, log: _Log):
    for i in order[:config.budget]:
        log.add(int(i))


def _initialize_model(problem: Problem, X: torch.Tensor, log: _Log) -> ModelList:
    """One GP per modelled objective, fit from scratch; a known objective is a lookup by candidate."""
    train_x, n, f = X[log.indices], problem.n, problem.features.shape[1]
    train_y = torch.as_tensor(-problem.normalise(np.array(log.rows)))  # BoTorch maximises
    models = []
    for j, o in enumerate(problem.objectives):
        if o.known:
            table = torch.as_tensor(-(np.asarray(o.values, float) - o.lo) / (o.hi - o.lo))
            lookup = lambda x, t=table: t[torch.round(x[..., -1] * (n - 1)).long()].unsqueeze(-1)
            models.append(GenericDeterministicModel(lookup, num_outputs=1))
            continue
        covar = get_covar_module_with_dim_scaled_prior(f, active_dims=list(range(f)))  # not the index
        gp = SingleTaskGP(train_x, train_y[:, j:j + 1], covar_module=covar, outcome_transform=Standardize(1))
        fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        models.append(gp)
    return ModelList(*models)


def _optimize_qnehvi_and_get_observation(problem: Problem, config: SearchConfig, model: ModelList,
                                         X: torch.Tensor, log: _Log, rng: np.random.Generator):
    """Pick the next round by sequential greedy qLogNEHVI over unevaluated candidates; evaluate them."""
    train_x, q = X[log.indices], min(config.q, config.budget - len(log))
    seed = int(rng.integers(2**31))
    sampler = get_sampler(model.posterior(train_x[:1]), torch.Size([config.mc_samples]), seed=seed)
    acq = qLogNoisyExpectedHypervolumeImprovement(
        model, ref_point=[-problem.ref] * len(problem.objectives), X_baseline=train_x, sampler=sampler,
        prune_baseline=True,  # only baseline points likely on the front enter the box decompositions
        cache_root=False)  # a ModelList with lookups has no joint root decomposition to cache
    left = np.setdiff1d(np.arange(problem.n), log.indices)
    if config.pool is not None and config.pool < len(left):
        left = np.sort(rng.choice(left, config.pool, replace=False))
    picks, _ = optimize_acqf_discrete(acq, q=q, choices=X[left], max_batch_size=config.max_batch_size)
    for x in picks:
        log.add(int(torch.round(x[-1] * (problem.n - 1))))


def _ehvi(problem: Problem, config: SearchConfig, seed: int, order: np.ndarray, log: _Log):
    # GP inputs, then the candidate's index scaled to [0, 1]: the kernels ignore it, lookups read it
    index = np.arange(problem.n)[:, None] / (problem.n - 1)
    X = torch.as_tensor(np.hstack([problem.features, index]))
    for i in order[:config.n_init]:
        log.add(int(i))
    while len(log) < config.budget:
        rng = np.random.default_rng([seed, len(log)])
        with torch.random.fork_rng():
            torch.manual_seed(int(rng.integers(2**31)))
            model = _initialize_model(problem, X, log)
            _optimize_qnehvi_and_get_observation(problem, config, model, X, log, rng)


def _row_index(candidates: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Rows -> candidate index (-1 where a row is not a candidate), by mixed-radix keys."""
    low, size = candidates.min(0), candidates.max(0) - candidates.min(0) + 1
    if np.prod(size.astype(float)) >= 2**62:
        raise ValueError(f"nsga2 keys rows by their box of {size.tolist()} options; its product must be "
                         f"< 2**62")
    radix = np.concatenate([np.cumprod(size[::-1])[::-1][1:], [1]])
    keys = (candidates - low) @ radix
    order = np.argsort(keys)
    ranked = keys[order]

    def index(rows):
        key = (rows - low) @ radix
        k = np.clip(np.searchsorted(ranked, key), 0, len(ranked) - 1)
        return np.where(ranked[k] == key, order[k], -1)
    return index


def _nsga2(problem: Problem, config: SearchConfig, seed: int, order: np.ndarray, log: _Log):
    """pymoo's NSGA-II by ask/tell on the options; a repeat is answered from the log, at no cost."""
    c, m = problem.candidates, len(problem.objectives)
    index = _row_index(c)
    space = PymooProblem(n_var=c.shape[1], n_obj=m, n_ieq_constr=1, xl=c.min(0), xu=c.max(0), vtype=int)
    algorithm = NSGA2(pop_size=config.n_init, n_offsprings=config.q, sampling=c[order[:config.n_init]],
                      crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                      mutation=PM(eta=20, vtype=float, repair=RoundingRepair()), eliminate_duplicates=True)
    algorithm.setup(space, termination=("n_gen", 10**9), seed=seed)
    stall = 0
    while len(log) < config.budget:
        pop = algorithm.ask()
        F, G, before = np.full((len(pop), m), 2 * problem.ref), np.ones((len(pop), 1)), len(log)
        for k, i in enumerate(index(np.rint(pop.get("X")).astype(np.int64))):
            if i < 0:  # inside the box but not a candidate: infeasible, and free
                continue
            if i not in log.seen and len(log) == config.budget:
                return  # the budget is spent: stop exactly there
            F[k], G[k] = problem.normalise(log.seen[i] if i in log.seen else log.add(int(i))), 0.0
        stall = 0 if len(log) > before else stall + 1
        if stall >= NSGA2_MAX_STALL:
            raise RuntimeError(f"nsga2 proposed no unevaluated candidate in {stall} generations after "
                               f"{len(log)} of {config.budget} evaluations; lower the budget")
        Evaluator().eval(StaticProblem(space, F=F, G=G), pop)
        algorithm.tell(infills=pop)


def run(problem: Problem, method: str, seed: int, config: SearchConfig = SearchConfig(),
        cache: str | Path | None = None, progress: bool = True) -> Result:
    """Search `problem` with `method` ('ehvi', 'random' or 'nsga2') for `config.budget` evaluations.

    `cache` is a JSON-lines file shared by methods and seeds of one problem: ids found there are not
    evaluated again, and each new evaluation is appended as it finishes.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}; it must be an integer >= 0")
    if config.budget > problem.n:
        raise ValueError(f"SearchConfig.budget={config.budget} exceeds the {problem.n} candidates")
    store = _Cache(Path(cache) if cache is not None else None,
                   [o.name for o in problem.objectives if not o.known])
    if store.path is not None:
        store.path.parent.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(problem.n)
    with bar(total=config.budget, desc=f"{method} seed {seed}", unit="eval", disable=not progress) as p:
        log, start = _Log(problem, store, p), time.perf_counter()
        {"ehvi": _ehvi, "random": _random, "nsga2": _nsga2}[method](problem, config, seed, order, log)
        overhead = time.perf_counter() - start - log.wall_s
    Y = np.array(log.rows)
    return Result(method, seed, np.array(log.indices), Y, hv_trace(problem.normalise(Y), problem.ref),
                  overhead, log.eval_s, problem.names, tuple(problem.ids[i] for i in log.indices))
