"""SM8750 latency through Qualcomm AI Hub: export, compile, profile, and cache with the job ids.

A device number is never written without the compile and profile jobs that produced it. Without a
client config (no API token) the client raises `qai_hub.client.UserError` at once; we turn that into
`DeviceUnavailable`, and callers fall back to cached device numbers or to the host table. A network or
job failure raises `DeviceJobFailed` and leaves the cache untouched.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

DEVICE = "Snapdragon 8 Elite QRD"  # SM8750
CHIPSET = "SM8750"


class DeviceUnavailable(RuntimeError):
    """No AI Hub access from here (no client config / token)."""


class DeviceJobFailed(RuntimeError):
    """AI Hub was reached but a job failed or the network dropped; nothing was cached."""


def read_cache(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"device": DEVICE, "chipset": CHIPSET, "entries": {}}
    return json.loads(path.read_text())


def _write_cache(path: Path, cache: dict) -> None:
    from .outputs import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, cache)


def profile(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor], key: str,
            cache_path: str | Path, *, refresh: bool = False) -> dict:
    """Latency (ms) and peak memory of `model` on SM8750, from a real compile + profile job pair.

    `example_inputs` names the model's inputs in call order; `key` names the entry in the cache
    (an architecture id, a module name...). A cached entry is returned without contacting AI Hub
    unless `refresh`.
    """
    import qai_hub as hub
    from qai_hub.client import UserError

    cache_path = Path(cache_path)
    cache = read_cache(cache_path)
    if key in cache["entries"] and not refresh:
        return cache["entries"][key]
    device = hub.Device(DEVICE)
    exported = torch.export.export(model.eval(), tuple(example_inputs.values()))
    specs = {name: (tuple(t.shape), "float32") for name, t in example_inputs.items()}
    try:
        compile_job = hub.submit_compile_job(model=exported, device=device, name=f"nanosd-{key}",
                                             input_specs=specs)
        target = compile_job.get_target_model()
        if target is None:
            raise DeviceJobFailed(f"compile job {compile_job.job_id} for {key!r} failed: "
                                  f"{compile_job.get_status().message}")
        profile_job = hub.submit_inference_job(model=target, device=device, inputs=None,
                                               name=f"nanosd-{key}", profile=True)
        status = profile_job.wait()
        if not status.success:
            raise DeviceJobFailed(f"profile job {profile_job.job_id} for {key!r} failed: "
                                  f"{status.message}")
        summary = profile_job.download_profile()["execution_summary"]
    except UserError as err:
        raise DeviceUnavailable(
            "Qualcomm AI Hub is not configured here (run `qai-hub configure --api_token ...`); "
            f"the client said: {str(err).strip().splitlines()[0]}") from err
    except (DeviceUnavailable, DeviceJobFailed):
        raise
    except Exception as err:  # network errors, API errors: report, cache nothing
        raise DeviceJobFailed(f"AI Hub request for {key!r} failed: {type(err).__name__}: {err}") from err
    peak = summary.get("inference_memory_peak_range") or summary.get("estimated_inference_peak_memory")
    entry = {"ms": summary["estimated_inference_time"] / 1000.0,  # AI Hub reports microseconds
             "peak_memory_bytes": list(peak) if isinstance(peak, (list, tuple)) else peak,
             "compile_job": compile_job.job_id, "profile_job": profile_job.job_id,
             "device": DEVICE, "input_shapes": {k: list(v[0]) for k, v in specs.items()},
             "qai_hub": str(hub.__version__)}
    cache["entries"][key] = entry
    _write_cache(cache_path, cache)
    return entry
