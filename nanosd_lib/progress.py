"""Progress bars that read well in a terminal, in JupyterLab and in a saved report.

`tqdm.auto` draws an ipywidget inside a kernel; a report saved by papermill keeps that widget frozen at
its first frame ("0%"), and the terminal running `dvc repro` sees nothing. A plain text bar on stderr
does both jobs: the cell keeps its final line, and papermill (run with `log_output=True`) echoes it to
the terminal as it goes.
"""
from __future__ import annotations

import sys

from tqdm.std import tqdm

MIN_INTERVAL_S = 5.0  # at most one refresh per 5 s: a long loop leaves a few hundred bytes in a report


def bar(iterable=None, desc: str = "", total: int | None = None, leave: bool = True, **kwargs) -> tqdm:
    """`tqdm(iterable)` as a text bar on stderr, refreshed at most every few seconds."""
    kwargs.setdefault("mininterval", MIN_INTERVAL_S)
    return tqdm(iterable, desc=desc, total=total, leave=leave, file=sys.stderr, ncols=100,
                ascii=True, **kwargs)
