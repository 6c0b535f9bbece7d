"""SM8750 latency through Qualcomm AI Hub: export, compile, profile, and cache with the job ids.

A device number is never written without the jobs that produced it. Without a client config (no API
token) the client raises `qai_hub.client.UserError` at once; we turn that into `DeviceUnavailable`.
A network or job failure raises `DeviceJobFailed` and leaves the cache untouched.

The device table has the host tables' form (`fixed_ms` + one cost per (stage, option)), each entry
compiled and profiled as a model of its own. Every cache entry carries a fingerprint of what it
measured: the sources that define the architecture, the U-Net's width and the input shapes and
dtypes. An entry whose fingerprint no longer matches is never served: it is measured again.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .devicecache import DEVICE, code_hash, device_table, read_cache, write_cache

# AI Hub's accepted input dtypes (submit_compile_job's input_specs).
DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.int32: "int32",
          torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8", torch.uint16: "uint16"}
# The quantized model keeps float inputs and outputs (its QDQ graph quantizes inside), so the same
# inputs drive the fp32 and the INT8 model; both compile for AI Hub's default target runtime.


class DeviceUnavailable(RuntimeError):
    """No AI Hub access from here (no client config / token)."""


class DeviceJobFailed(RuntimeError):
    """AI Hub was reached but a job failed or the network dropped; nothing was cached."""


def configured() -> str | None:
    """None when the AI Hub client has a configuration (an API token) to use; otherwise the client's
    own one-line reason. Reads the local config only: no request, so it answers at once."""
    from qai_hub import api_utils

    try:
        api_utils.load_default_api_config()
    except Exception as err:  # the client's own loader: missing file, no token, unreadable
        return f"Qualcomm AI Hub is not configured here ({_first_line(err)}); run `qai-hub configure --api_token ...`"
    return None


# --- What an entry measured -----------------------------------------------------------------------


def input_specs(inputs: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], str]]:
    """AI Hub input specs, each dtype taken from its tensor (the timestep is int64)."""
    specs = {}
    for name, t in inputs.items():
        if t.dtype not in DTYPES:
            raise ValueError(f"input {name!r} has dtype {t.dtype}; AI Hub accepts "
                             f"{sorted(DTYPES.values())}")
        specs[name] = (tuple(t.shape), DTYPES[t.dtype])
    return specs


def model_context(unet_config, inputs: dict[str, torch.Tensor]) -> dict:
    """What, besides the code, decides a module's cost: the U-Net's width and the whole model's
    input shapes and dtypes (they fix every stage's activation sizes)."""
    from .student import BASE_FIELDS

    cfg = {k: unet_config[k] for k in BASE_FIELDS}
    return json.loads(json.dumps({"unet": cfg, "inputs": {k: [list(s), d] for k, (s, d)
                                                          in input_specs(inputs).items()}}))


def fingerprint(specs: dict, context: dict | None, kind: str) -> str:
    blob = json.dumps({"code": code_hash(), "specs": {k: [list(s), d] for k, (s, d) in specs.items()},
                       "context": context, "kind": kind}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- Jobs -----------------------------------------------------------------------------------------


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _compile_and_profile(hub, source, device, key: str, specs: dict | None):
    """(compile job, profile job, execution summary); raises DeviceJobFailed on a failed job."""
    compile_job = hub.submit_compile_job(model=source, device=device, name=f"nanosd-{key}",
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
    return compile_job, profile_job, profile_job.download_profile()["execution_summary"]


def _guarded(key: str, submit):
    """Run `submit()`, turning the client's errors into ours."""
    from qai_hub.client import UserError

    try:
        return submit()
    except UserError as err:
        raise DeviceUnavailable(
            "Qualcomm AI Hub is not configured here (run `qai-hub configure --api_token ...`); "
            f"the client said: {_first_line(err)}") from err
    except (DeviceUnavailable, DeviceJobFailed):
        raise
    except Exception as err:  # network errors, API errors: report, cache nothing
        raise DeviceJobFailed(f"AI Hub request for {key!r} failed: "
                              f"{type(err).__name__}: {err}") from err


def _entry(summary: dict, jobs: dict, specs: dict, context: dict | None, kind: str, fp: str) -> dict:
    import qai_hub as hub

    peak = summary.get("inference_memory_peak_range") or summary.get("estimated_inference_peak_memory")
    return {"ms": summary["estimated_inference_time"] / 1000.0,  # AI Hub reports microseconds
            "peak_memory_bytes": list(peak) if isinstance(peak, (list, tuple)) else peak,
            **jobs, "device": DEVICE, "kind": kind,
            "input_specs": {k: [list(s), d] for k, (s, d) in specs.items()},
            "context": context, "code_hash": code_hash(), "fingerprint": fp,
            "qai_hub": str(hub.__version__)}


def _cached(cache: dict, key: str, fp: str, refresh: bool) -> dict | None:
    entry = cache["entries"].get(key)
    return entry if entry is not None and entry.get("fingerprint") == fp and not refresh else None


def profile(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor], key: str,
            cache_path: str | Path, *, context: dict | None = None, kind: str = "whole",
            refresh: bool = False) -> dict:
    """Latency (ms) and peak memory of `model` on SM8750, from a real compile + profile job pair.

    `example_inputs` names the model's inputs in call order; `key` names the entry in the cache
    (an architecture id, 'E1/2', 'fixed'...). A cached entry with the current fingerprint is
    returned without contacting AI Hub unless `refresh`; a stale one is measured again.
    """
    import qai_hub as hub

    cache_path = Path(cache_path)
    cache = read_cache(cache_path)
    specs = input_specs(example_inputs)
    fp = fingerprint(specs, context, kind)
    if (hit := _cached(cache, key, fp, refresh)) is not None:
        return hit
    exported = torch.export.export(model.eval(), tuple(example_inputs.values()))

    def submit():
        return _compile_and_profile(hub, exported, hub.Device(DEVICE), key, specs)

    compile_job, profile_job, summary = _guarded(key, submit)
    entry = _entry(summary, {"compile_job": compile_job.job_id, "profile_job": profile_job.job_id},
                   specs, context, kind, fp)
    cache["entries"][key] = entry
    write_cache(cache_path, cache)
    return entry


def profile_int8(model: torch.nn.Module, example_inputs: dict[str, torch.Tensor],
                 calibration: list[dict[str, torch.Tensor]], key: str, cache_path: str | Path,
                 workdir: str | Path, *, context: dict | None = None, refresh: bool = False) -> dict:
    """INT8 (w8a8) latency on SM8750: ONNX export -> AI Hub quantize job (calibrated on
    `calibration`, each a dict like `example_inputs`) -> compile -> profile. Cached under
    'int8:<key>' with all three job ids."""
    import qai_hub as hub

    from .timing import export_onnx, onnx_file

    cache_path, key = Path(cache_path), f"int8:{key}"
    cache = read_cache(cache_path)
    specs = input_specs(example_inputs)
    fp = fingerprint(specs, {"context": context, "calibration": len(calibration)}, "int8")
    if (hit := _cached(cache, key, fp, refresh)) is not None:
        return hit
    if not calibration:
        raise ValueError(f"{key}: calibration is empty; pass recorded inputs (dicts with keys "
                         f"{list(example_inputs)})")
    onnx_path = onnx_file(workdir, key)
    kept = export_onnx(model, tuple(example_inputs.values()), onnx_path, list(example_inputs))
    data = {name: [c[name].numpy() for c in calibration] for name in kept}  # the graph's inputs

    def submit():
        quantize_job = hub.submit_quantize_job(
            model=str(onnx_path), calibration_data=data, weights_dtype=hub.QuantizeDtype.INT8,
            activations_dtype=hub.QuantizeDtype.INT8, name=f"nanosd-{key}")
        quantized = quantize_job.get_target_model()
        if quantized is None:
            raise DeviceJobFailed(f"quantize job {quantize_job.job_id} for {key!r} failed: "
                                  f"{quantize_job.get_status().message}")
        return (quantize_job, *_compile_and_profile(hub, quantized, hub.Device(DEVICE), key, None))

    quantize_job, compile_job, profile_job, summary = _guarded(key, submit)
    entry = _entry(summary, {"quantize_job": quantize_job.job_id, "compile_job": compile_job.job_id,
                             "profile_job": profile_job.job_id}, specs, context, "int8", fp)
    cache["entries"][key] = entry
    write_cache(cache_path, cache)
    return entry


# --- The device table ---------------------------------------------------------------------------


def _call_inputs(name: str, args: tuple) -> dict[str, torch.Tensor]:
    """Readable input names for one module callable (they name the compiled model's inputs)."""
    if name == "fixed":
        names = ["sample", "timestep", "last"]
    else:
        names = ["h", "temb", "text"] + [f"skip{i}" for i in range(len(args) - 3)]
    return dict(zip(names, args))


def profile_modules(base, inputs: dict[str, torch.Tensor], cache_path: str | Path, *,
                    refresh: bool = False) -> dict:
    """Compile and profile every (stage, option) and the fixed parts on SM8750, each as a model of
    its own on the inputs it gets inside the base (cached entries with the current fingerprint are
    reused), and return the device table. Stops at the first failure; what was measured before it
    stays cached."""
    from .latency import stage_callables
    from .progress import bar

    context = model_context(base.config, inputs)
    modules, args = stage_callables(base, inputs)
    for name in bar(modules, desc="SM8750: modules"):
        profile(modules[name], _call_inputs(name, args[name]), name, cache_path, context=context,
                kind="module", refresh=refresh)
    return device_table(cache_path, context)


def profile_family(found: dict, members: dict, teacher, cache_path: str | Path, workdir: str | Path,
                   calibration_prompts: list[str], steps: int, seed: int, guidance: float,
                   sd15_config: dict | None = None) -> str:
    """Every family member on SM8750, fp32 and INT8, at SD-1.5 width (random weights; built one at a
    time) and at the study's width; cached under 'sd15/<name>', 'embedded/<name>' and 'int8:...'.
    Each entry's fingerprint holds the member's architecture id, so a search that picks another
    member is measured again, not served the old one's latency. The study-width INT8 models are
    calibrated on the U-Net's inputs while sampling `calibration_prompts` with `guidance` (both
    branches of classifier-free guidance), as the host INT8 models are; those entries' fingerprints
    also hold the prompts, steps, seed and guidance. `sd15_config` replaces the pruned SD-1.5 base's
    config (tests). Returns 'profiled', or 'failed: ...' with what was measured before the failure
    kept."""
    from diffusers import UNet2DConditionModel

    from . import student, surgery
    from .latency import WholeCall
    from .quantize import record_unet_inputs
    from .space import Arch
    from .timing import example_inputs

    try:
        sd15 = surgery.pruned_sd15() if sd15_config is None else UNet2DConditionModel(**sd15_config)
        sd15 = sd15.to_empty(device="cpu") if next(sd15.parameters()).is_meta else sd15
        torch.manual_seed(seed)
        for p in sd15.parameters():
            torch.nn.init.normal_(p, std=0.02)
        sd15_inputs = example_inputs(sd15.config, 64, 77, seed) if sd15_config is None else \
            example_inputs(sd15.config, sd15.config.sample_size, 8, seed)
        for name, row in found.items():
            net = student.from_base(sd15, Arch.parse(row["id"]))[0]
            arch = {"arch": row["id"]}
            profile(WholeCall(net), sd15_inputs, f"sd15/{name}", cache_path, context=arch, kind="whole")
            profile_int8(WholeCall(net), sd15_inputs, [sd15_inputs], f"sd15/{name}", cache_path, workdir,
                         context=arch)
            del net
        for name, unet in members.items():
            arch = {"arch": found[name]["id"]}
            inputs = example_inputs(unet.config, teacher.latent_px, teacher.tokenizer.model_max_length, seed)
            profile(WholeCall(unet), inputs, f"embedded/{name}", cache_path, context=arch, kind="whole")
            calibration = record_unet_inputs(teacher, calibration_prompts, steps, seed, guidance, unet=unet)
            profile_int8(WholeCall(unet), inputs, calibration, f"embedded/{name}", cache_path, workdir,
                         context={**arch, "prompts": list(calibration_prompts), "steps": steps, "seed": seed,
                                  "guidance": guidance})
    except DeviceJobFailed as err:
        return f"failed: {_first_line(err)}"
    return "profiled"
