"""Latency is measured, not estimated: warm-up, then the median of N timed runs at a fixed thread count."""
from __future__ import annotations

import copy
import json
import platform
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import nn


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


@torch.no_grad()
def unet_forward_ms(unet: torch.nn.Module, latent_px: int, text_len: int, runs: int,
                    batch: int = 1) -> float:
    """One denoising step of a U-Net at its latent size (batch 1: one tile), inputs of SD's shapes."""
    cfg = unet.config
    device = next(unet.parameters()).device
    sample = torch.randn(batch, cfg.in_channels, latent_px, latent_px, device=device)
    text = torch.randn(batch, text_len, cfg.cross_attention_dim, device=device)
    t = torch.full((batch,), 500, device=device)
    return median_ms(lambda: unet(sample, t, encoder_hidden_states=text), runs)


# --- Per-module lookup tables ------------------------------------------------------------------
#
# Every stage option is timed on the exact inputs it receives inside the deployed model (recorded by
# hooks on the base-architecture student), each as its own callable: torch eager, or an ONNX Runtime
# session of its own export. Whole models are timed the same way, to check the table adds up.



BACKENDS = ("torch", "onnxruntime")


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
        self.unet = unet

    def forward(self, sample, t, last):
        u = self.unet
        temb = u.time_embedding(u.time_proj(t).to(sample.dtype))
        return u.conv_in(sample), temb, u.conv_out(u.conv_act(u.conv_norm_out(last)))


class WholeCall(nn.Module):
    """A U-Net as a plain (sample, timestep, text) -> noise callable, for export and timing."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, t, text):
        return self.unet(sample, t, encoder_hidden_states=text, return_dict=False)[0]


def example_inputs(cfg, latent_px: int, text_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One tile: batch 1, the deployed latent size, SD's input names."""
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(1, cfg.in_channels, latent_px, latent_px, generator=g),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, text_len, cfg.cross_attention_dim, generator=g)}


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
    from .space import DECODERS, STAGES, Arch, options

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


def onnx_session(module: nn.Module, args: tuple, path: Path, threads: int):
    """Export with the TorchScript exporter (opset 18) and open an ONNX Runtime CPU session."""
    import onnxruntime as ort

    import warnings

    names = [f"in{i}" for i in range(len(args))]
    with warnings.catch_warnings():  # shape checks the tracer freezes: fine at one fixed shape
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=18,
                          input_names=names)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    used = {i.name for i in sess.get_inputs()}  # the exporter drops inputs a module ignores (text)
    feeds = {n: a.numpy() for n, a in zip(names, args) if n in used}
    return lambda: sess.run(None, feeds)


def time_callable(backend: str, module: nn.Module, args: tuple, runs: int, threads: int,
                  workdir: Path, name: str) -> float:
    if backend == "torch":
        with torch.no_grad():
            return median_ms(lambda: module(*args), runs)
    if backend == "onnxruntime":
        run = onnx_session(module, args, workdir / f"{name.replace('/', '_')}.onnx", threads)
        return median_ms(run, runs)
    raise ValueError(f"latency.backend {backend!r} is not one of {BACKENDS} (or 'qai-hub')")


def call_overhead_ms(backend: str, args: tuple, runs: int, threads: int, workdir: Path) -> float:
    """What one call costs with (almost) no work in it: the part a sum of module calls over-counts."""
    class Touch(nn.Module):
        def forward(self, x):
            return x[:, :1, :1, :1] + 1.0
    return time_callable(backend, Touch(), args[:1], runs, threads, workdir, "overhead")


def predict_ms(table: dict, arch) -> float:
    """fixed + the chosen options, less the extra per-call overheads the separate timings carry,
    times the table's context factor (1 until `calibrate` sets it)."""
    from .space import STAGES

    parts = [table["modules"][f"{s}/{c}"] for s, c in zip(STAGES, arch.choices)]
    raw = table["fixed_ms"] + sum(parts) - len(parts) * table["call_overhead_ms"]
    return raw * table.get("context_factor", 1.0)


def calibrate(table: dict, arch, measured_ms: float) -> float:
    """Set the table's context factor from one whole-model measurement (the base, kept out of the
    check). A module timed alone runs with its inputs hot in cache; inside the whole model the other
    stages' activations and skips compete for it, which eager torch feels as a near-constant ~10-15 %
    (measured at the embedded scale) and ONNX Runtime, with its planned memory, hardly at all."""
    table["context_factor"] = 1.0
    table["context_factor"] = measured_ms / predict_ms(table, arch)
    return table["context_factor"]


def table_meta(backend: str, threads: int, runs: int, inputs: dict, scale: str) -> dict:
    import onnxruntime

    version = torch.__version__ if backend == "torch" else onnxruntime.__version__
    from .outputs import machine

    return {"backend": backend, "version": version, "threads": threads, "runs": runs, "warmup": 2,
            "scale": scale, "machine": machine(), "python": platform.python_version(),
            "shapes": {k: list(v.shape) for k, v in inputs.items()}}


def count_flops(module: nn.Module, args: tuple) -> int:
    """Forward FLOPs of one call, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    return counter.get_total_flops()


def load_table(backend: str, data_dir: str | Path) -> dict:
    """The latency table later stages use, chosen by `latency.backend`.

    'qai-hub' reads the SM8750 cache (whole models, each with its AI Hub jobs); with no entries it
    falls back to the ONNX Runtime host table and says so in the returned table's `source`.
    """
    data_dir = Path(data_dir)
    if backend == "qai-hub":
        from .aihub import read_cache

        cache = read_cache(data_dir / "device" / "sm8750.json")
        if cache["entries"]:
            return {"source": "qai-hub", "backend": "qai-hub", **cache}
        table = load_table("onnxruntime", data_dir)
        table["source"] = "onnxruntime (no SM8750 measurements cached: AI Hub not configured)"
        return table
    if backend not in BACKENDS:
        raise ValueError(f"latency.backend {backend!r} is not one of {BACKENDS + ('qai-hub',)}")
    path = data_dir / "latency" / f"{backend}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {backend} latency table; run the measure_latency stage")
    return {"source": backend, **json.loads(path.read_text())}
