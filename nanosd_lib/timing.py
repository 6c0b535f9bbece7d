"""How the study times a module on this host: warm-up, then the median of timed runs, at a fixed thread
count, in torch eager or in ONNX Runtime on the CPU (a session of the module's own export); and what a
module's forward costs in FLOPs, which the latency tables are compared against.

Where a ratio of two timings is the result, the items are timed interleaved (`interleaved_timings`), in
freshly shuffled rounds, so that whatever drifts on a machine (clock, neighbours, thermal state) lands
on all of them alike: the latency tables' modules and whole models (`latency`), the slim and the
teacher VAE (`vae.costs`) and the restorers' tiles with their parts (`restore.tile_latency`). A few
figures are timed one after another instead: the short table of VAE options, the SD-1.5-width models
(seconds a call), and fp32 against INT8 (`quantize`).
"""
from __future__ import annotations

import random
import re
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from .config import HOST_BACKENDS as BACKENDS  # a latency table may also come from the phone (`devicecache`)
from .progress import bar


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in milliseconds, after `warmup` untimed calls.

    CUDA work is synchronised around each call so that the clock sees the kernels, not the launch.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def example_inputs(cfg, latent_px: int, text_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One tile for a U-Net of config `cfg`: batch 1, the deployed latent size, SD's input names (the
    timestep is int64), drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, cfg.in_channels, latent_px, latent_px, generator=g),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, text_len, cfg.cross_attention_dim, generator=g)}


@torch.no_grad()
def unet_forward_ms(unet: torch.nn.Module, latent_px: int, text_len: int, runs: int, threads: int) -> float:
    """One denoising step of a U-Net at its latent size on `example_inputs`, in torch eager on the
    U-Net's device, with torch on `threads` threads."""
    device = next(unet.parameters()).device
    inputs = {k: v.to(device) for k, v in example_inputs(unet.config, latent_px, text_len).items()}
    with torch_threads(threads):
        return median_ms(lambda: unet(**inputs), runs)


# --- Host backends ------------------------------------------------------------------------------


def onnx_file(workdir: str | Path, name: str) -> Path:
    """Where the export of item `name` goes in `workdir`: `name` with every character other than
    letters, digits, '.', '+' and '-' made '_' ('teacher VAE alone', 'w1/4-l1-na', 'int8:sd15/prime')."""
    return Path(workdir) / f"{re.sub(r'[^A-Za-z0-9.+-]', '_', name)}.onnx"


def export_onnx(module: nn.Module, args: tuple, path: Path, names: Sequence[str] | None = None
                ) -> list[str]:
    """Export with the TorchScript exporter (opset 18); returns the input names the graph kept
    (the exporter drops inputs a module ignores, e.g. the text of a stage without attention)."""
    import onnx

    names = list(names or [f"in{i}" for i in range(len(args))])
    with warnings.catch_warnings():  # shape checks the tracer freezes: fine at one fixed shape
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=18,
                          input_names=names)
    kept = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    return [n for n in names if n in kept]


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session at a fixed thread count."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    # Idle pool threads otherwise spin for a while after each run; with many sessions timed back to
    # back, one session's spinning threads would steal the cores from the next one's run.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_session(module: nn.Module, args: tuple, path: Path, threads: int):
    """Export `module` and return a no-argument callable that runs it in its own session."""
    names = [f"in{i}" for i in range(len(args))]
    kept = export_onnx(module, args, path, names)
    sess = ort_session(path, threads)
    feeds = {n: a.numpy() for n, a in zip(names, args) if n in kept}
    return lambda: sess.run(None, feeds)


def torch_call(module: nn.Module, args: tuple):
    """A no-argument callable running `module(*args)` in torch eager, in eval mode, without gradients."""
    module.eval()

    def run():
        with torch.no_grad():
            return module(*args)
    return run


def host_call(backend: str, module: nn.Module, args: tuple, threads: int, workdir: Path, name: str):
    """A no-argument callable running `module(*args)` on a host backend (ONNX: exported once here)."""
    if backend == "torch":
        return torch_call(module, args)
    if backend == "onnxruntime":
        return onnx_session(module, args, onnx_file(workdir, name), threads)
    raise ValueError(f"backend {backend!r} is not a host backend: one of {BACKENDS}")


def time_callable(backend: str, module: nn.Module, args: tuple, runs: int, threads: int,
                  workdir: Path, name: str, warmup: int = 2) -> float:
    """One module timed alone (median of `runs` after `warmup` calls): for a quick number, not for the
    table. Fewer warm-up calls suit a module that takes seconds a call (SD-1.5's VAE decoder)."""
    with torch_threads(threads):
        return median_ms(host_call(backend, module, args, threads, workdir, name), runs, warmup)


@contextmanager
def torch_threads(threads: int):
    """torch's intra-op thread count fixed inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- Interleaved timing -------------------------------------------------------------------------


def interleaved_timings(calls: Mapping[str, Callable[[], object]], rounds: int, runs: int,
                        warmup: int = 1, seed: int = 0, desc: str = "timing") -> pd.DataFrame:
    """Every callable timed once per round (median of `runs` after `warmup`), in a freshly shuffled
    order each round. Rows: item, round, ms. A slow phase of the machine then lands on a random mix
    of items instead of on whichever group happened to be timed during it."""
    rng = random.Random(seed)
    order, rows = list(calls), []
    for r in bar(range(rounds), desc=desc):
        rng.shuffle(order)
        for name in order:
            rows.append({"item": name, "round": r, "ms": median_ms(calls[name], runs, warmup)})
    return pd.DataFrame(rows)


def summarise(timings: pd.DataFrame) -> pd.DataFrame:
    """Per item: the median over all rounds (`ms`), and over the first and the second half of the
    rounds (two independent repeats of the same measurement, for the noise floor)."""
    half = timings["round"].nunique() // 2
    first = timings[timings["round"] < half].groupby("item").ms.median()
    second = timings[timings["round"] >= half].groupby("item").ms.median()
    return pd.DataFrame({"ms": timings.groupby("item").ms.median(), "first_half_ms": first,
                         "second_half_ms": second})


# --- FLOPs ---------------------------------------------------------------------------------------


def count_flops(module: nn.Module, args: tuple) -> int:
    """Forward FLOPs of one call, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops()
