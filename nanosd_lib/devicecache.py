"""The SM8750 latency cache (`data/device/sm8750.json`): what it holds and whether it makes a table.

Each entry is one AI Hub measurement with the jobs that made it and a fingerprint of what it measured
(the architecture's source files, the width, the input shapes). This module only reads and writes the
file; `aihub.py` runs the jobs. It imports no torch, so the params check can ask it whether
`base.latency_backend: qai-hub` is usable.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .space import option_names

DEVICE = "Snapdragon 8 Elite QRD"  # SM8750
CHIPSET = "SM8750"
# The files whose contents decide what a compiled module computes: the blocks and how they are built,
# and `latency.py`, whose wrappers (`_EncoderCall`, `_DecoderCall`, `_FixedCall`, `WholeCall`) are what
# is exported. Any edit to one of them makes every cached entry stale, which errs on the side of
# measuring again.
ARCH_SOURCES = ("blocks.py", "latency.py", "space.py", "student.py", "surgery.py")
# The params check refuses 'qai-hub' until the table is complete, and measure_latency profiles the
# modules on the phone whichever backend is chosen: so the table is filled under a host backend.
FILL_HINT = ("to fill it, set base.latency_backend to a host backend listed in measure_latency.backends, "
             "configure an AI Hub token "
             "(`qai-hub configure --api_token ...`) and run the measure_latency stage, which profiles "
             "every module on SM8750 whichever backend is chosen; then choose 'qai-hub' again")


def read_cache(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"device": DEVICE, "chipset": CHIPSET, "entries": {}}
    return json.loads(path.read_text())


def write_cache(path: Path, cache: dict) -> None:
    from .outputs import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cache)


def code_hash() -> str:
    """sha256 of the architecture-defining sources (names and contents), first 16 hex digits."""
    digest = hashlib.sha256()
    for name in ARCH_SOURCES:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def module_keys() -> list[str]:
    return ["fixed", *option_names()]


def device_table_status(cache_path: str | Path, context: dict | None = None) -> str | None:
    """None when the cache holds a complete, current device table (every option and the fixed
    parts, measured with today's architecture sources, all at one width and input shape; at
    `context`'s when given); otherwise one sentence naming what is missing and how to fill it."""
    cache_path = Path(cache_path)
    entries = read_cache(cache_path)["entries"]
    current = code_hash()
    missing, stale = [], []
    for key in module_keys():
        entry = entries.get(key)
        if entry is None or entry.get("kind") != "module" or "fingerprint" not in entry:
            missing.append(key)
        elif entry.get("code_hash") != current or (context is not None and entry["context"] != context):
            stale.append(key)
    contexts = {json.dumps(entries[k]["context"], sort_keys=True) for k in module_keys()
                if k not in missing and k not in stale}
    if not missing and not stale and len(contexts) == 1:
        return None
    what = []
    if missing:
        what.append(f"{len(missing)} of {len(module_keys())} entries missing ({_few(missing)})")
    if stale:
        what.append(f"{len(stale)} stale, measured with other architecture sources or another "
                    f"width/input shape ({_few(stale)})")
    if len(contexts) > 1:
        what.append(f"entries measured at {len(contexts)} different widths/input shapes")
    return f"{cache_path} holds no complete SM8750 latency table: {'; '.join(what)}; {FILL_HINT}"


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")


def device_table(cache_path: str | Path, context: dict | None = None) -> dict:
    """The SM8750 table (`fixed_ms`, `modules`, and each entry's job ids), or ValueError saying
    what is missing."""
    problem = device_table_status(cache_path, context)
    if problem:
        raise ValueError(problem)
    entries = read_cache(cache_path)["entries"]
    names = module_keys()
    return {"backend": "qai-hub", "device": DEVICE, "chipset": CHIPSET, "threads": None,
            "fixed_ms": entries["fixed"]["ms"],
            "modules": {k: entries[k]["ms"] for k in names[1:]},
            "jobs": {k: {j: entries[k][j] for j in ("compile_job", "profile_job")} for k in names},
            "context": entries["fixed"]["context"], "code_hash": entries["fixed"]["code_hash"],
            "fit": {"method": "sum of per-module AI Hub profiles (no whole-model fit)"}}
