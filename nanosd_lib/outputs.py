"""Where a stage writes, and the provenance every written number carries."""
from __future__ import annotations

import json
import math
import os
import platform
import shutil
from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The study's root: the nearest folder above `start` (default: cwd) holding dvc.yaml.

    papermill runs notebooks from the root and nbval from notebooks/, so both find the same place.
    """
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    raise FileNotFoundError(f"no dvc.yaml + params.yaml above {here}; run from inside the study")


class Layout:
    """Output folders under one root: '.' for the DVC pipeline, a scratch folder for tests."""

    def __init__(self, output_root: str | Path):
        root = Path(output_root)
        self.root = root if root.is_absolute() else repo_root() / root

    def results(self, stage: str) -> Path:
        return _mkdir(self.root / "results" / stage)

    def data(self, name: str) -> Path:
        return _mkdir(self.root / "data" / name)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine(cpuinfo: str | None = None) -> str:
    """The CPU model, logical core count and vector units, e.g. 'AMD EPYC (2 cores, AVX-512, VNNI)'.

    The vector units are named because the model name alone may not tell two CPUs apart (a virtual
    machine often reports only the make), while they choose the kernels torch and ONNX Runtime run: the
    same code trains to different weights, and times differently, on an AVX2 and an AVX-512 CPU.
    `cpuinfo` is the text of /proc/cpuinfo, read when not given."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    first = {}  # every core repeats the same fields: the first core's are enough
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    name = first.get("model name") or platform.processor() or platform.machine()
    flags = set((first.get("flags") or first.get("Features") or "").split())
    units = [label for label, present in (
        ("AVX-512", "avx512f" in flags),
        ("AVX2", "avx2" in flags and "avx512f" not in flags),
        ("VNNI", bool(flags & {"avx512_vnni", "avx_vnni"})),
        ("NEON", "asimd" in flags)) if present]
    return f"{name} ({', '.join([f'{os.cpu_count()} cores'] + units)})"


def provenance(base, **extra) -> dict:
    """What made a number: scale, seed, threads, backend, library versions, machine."""
    import diffusers  # imported here, so that the params check (which needs only Layout) starts fast
    import torch

    info = {"scale": base.scale, "seed": base.seed, "threads": base.threads,
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "machine": machine()}
    info.update(extra)
    return info


def _clean(value):
    """JSON-safe values: floats rounded to 6 significant digits, NaN to null."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | Path, data: dict) -> Path:
    """Write atomically (a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def write_metrics(folder: Path, metrics: dict, prov: dict) -> Path:
    """`metrics.json`: the values at the top level (for `dvc metrics show`), provenance beside them."""
    return write_json(folder / "metrics.json", {**metrics, "provenance": prov})


LIBRARY = Path(__file__).parent


def fingerprint(params: dict, *paths: str | Path, library: Path = LIBRARY) -> str:
    """What persisted work depends on: its params, every source file of the library, and the given
    files or folders (a notebook, a teacher's weights). Any change to any of them gives a new one."""
    import hashlib

    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    files = [(f.name, f) for f in sorted(Path(library).glob("*.py"))]
    for path in map(Path, paths):  # a folder's files by their path inside it: unet/ and vae/ both hold a config
        files += ([(p.relative_to(path).as_posix(), p) for p in sorted(path.rglob("*")) if p.is_file()]
                  if path.is_dir() else [(path.name, path)])
    for name, f in files:
        h.update(name.encode() + b"\0")
        with open(f, "rb") as stream:  # in chunks: an SD-1.5 folder holds gigabytes of weights
            while chunk := stream.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()[:16]


def replace_dir(tmp: Path, final: Path) -> Path:
    """Move a finished folder into place, so an interrupted save never leaves a half folder."""
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    return final
