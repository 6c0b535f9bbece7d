"""Jobs side by side on the CPU: one Python thread each, torch's intra-op threads split between them.

The study's small U-Nets gain little from a second core: on 2 threads the uniform baseline's KD step
took 0.41 s against 0.39 s on 1, and Prime's sampling as long. Their kernels are too small to split,
so one job at a time leaves a core idle. Two jobs at one thread each keep both busy. Measured on a
2-core EPYC: the baselines' KD took 0.73-0.80 s a step against 0.90-0.94 s one after the other, and
sampling five models took 64-83 s against 92-96 s, with the very same images. Torch releases the GIL
inside its kernels, so Python threads suffice and nothing needs pickling.

Each job must own what it writes (its model, its optimizer); shared inputs are only read. A job that
draws random numbers must not share a generator or numpy's global state with another job, or the
result would depend on how the threads interleave.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def side_by_side(jobs: dict[str, Callable[[threading.Event], T]], workers: int | None = None) -> dict[str, T]:
    """{name: job(stop)}, `workers` jobs at a time (default: one per intra-op thread), each on
    threads // workers intra-op threads, taken in the order given; the thread count comes back after.

    The first job to raise sets `stop`, which long jobs should check between steps to end early; once
    the running jobs have returned, the error of the first failed job in the order given is raised here."""
    threads = torch.get_num_threads()
    workers = max(1, min(workers or threads, len(jobs)))
    each = max(1, threads // workers)
    stop = threading.Event()

    def run(job):
        torch.set_num_threads(each)  # OpenMP keeps the count per thread: set it on this one too
        try:
            return job(stop)
        except BaseException:
            stop.set()
            raise

    torch.set_num_threads(each)
    try:
        with ThreadPoolExecutor(workers) as pool:
            futures = {name: pool.submit(run, job) for name, job in jobs.items()}
            return {name: f.result() for name, f in futures.items()}
    finally:
        torch.set_num_threads(threads)
