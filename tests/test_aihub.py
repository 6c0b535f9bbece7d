"""AI Hub's remote service cannot be reached here: only the client's remote calls are faked, with
autospecs of the real client functions and job classes, so a wrong keyword or method fails."""
import json
from types import SimpleNamespace
from unittest import mock

import pytest
import qai_hub
import torch
from qai_hub.client import UserError

from nanosd_lib import aihub, devicecache, latency, space, surgery, timing

State = qai_hub.JobStatus.State


class Net(torch.nn.Module):
    def forward(self, x, t, y):
        return x * 2 + y.mean() + t.float()


INPUTS = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([500]),
          "text": torch.randn(1, 8, 16)}


def status(ok: bool, message: str) -> qai_hub.JobStatus:
    return qai_hub.JobStatus(State.SUCCESS if ok else State.FAILED, None if ok else message)


def compile_job(ok=True, job_id="jc0mp1le"):
    job = mock.create_autospec(qai_hub.CompileJob, instance=True)
    job.job_id = job_id
    job.get_target_model.return_value = (mock.create_autospec(qai_hub.Model, instance=True)
                                         if ok else None)
    job.get_status.return_value = status(ok, "unsupported op")
    return job


def inference_job(ok=True, job_id="jpr0f1le", microseconds=20_500):
    job = mock.create_autospec(qai_hub.InferenceJob, instance=True)
    job.job_id = job_id
    job.wait.return_value = status(ok, "device lost")
    job.download_profile.return_value = {"execution_summary": {
        "estimated_inference_time": microseconds, "inference_memory_peak_range": (1_000, 2_000)}}
    return job


def quantize_job(ok=True, job_id="jqu4nt"):
    job = mock.create_autospec(qai_hub.QuantizeJob, instance=True)
    job.job_id = job_id
    job.get_target_model.return_value = (mock.create_autospec(qai_hub.Model, instance=True)
                                         if ok else None)
    job.get_status.return_value = status(ok, "calibration failed")
    return job


@pytest.fixture
def hub(monkeypatch):
    """The three remote calls, autospecced on the real client; each returns a fresh fake job."""
    def fake(function, job):
        return mock.create_autospec(function, side_effect=lambda *a, **k: job())

    fakes = SimpleNamespace(compile=fake(qai_hub.submit_compile_job, compile_job),
                            profile=fake(qai_hub.submit_inference_job, inference_job),
                            quantize=fake(qai_hub.submit_quantize_job, quantize_job))
    monkeypatch.setattr(qai_hub, "submit_compile_job", fakes.compile)
    monkeypatch.setattr(qai_hub, "submit_inference_job", fakes.profile)
    monkeypatch.setattr(qai_hub, "submit_quantize_job", fakes.quantize)
    return fakes


def test_the_fakes_hold_the_real_signatures(hub):
    with pytest.raises(TypeError, match="input_spec"):
        qai_hub.submit_compile_job(model=None, device=None, input_spec={})
    with pytest.raises(AttributeError):
        compile_job().get_target()


def test_profile_requests_converts_and_caches(hub, tmp_path):
    cache = tmp_path / "sm8750.json"
    job = compile_job()
    hub.compile.side_effect, hub.compile.return_value = None, job
    entry = aihub.profile(Net(), INPUTS, "e000-d000", cache)
    assert entry["ms"] == 20.5  # 20,500 microseconds
    assert entry["compile_job"] == "jc0mp1le" and entry["profile_job"] == "jpr0f1le"
    kw = hub.compile.call_args.kwargs
    assert kw["device"].name == "Snapdragon 8 Elite QRD"
    assert kw["input_specs"] == {"sample": ((1, 4, 8, 8), "float32"), "timestep": ((1,), "int64"),
                                 "text": ((1, 8, 16), "float32")}
    assert isinstance(kw["model"], torch.export.ExportedProgram)
    kw2 = hub.profile.call_args.kwargs
    assert kw2["model"] is job.get_target_model.return_value and kw2["profile"] is True
    stored = json.loads(cache.read_text())
    assert stored["entries"]["e000-d000"]["profile_job"] == "jpr0f1le"
    assert aihub.profile(Net(), INPUTS, "e000-d000", cache)["ms"] == 20.5
    assert hub.compile.call_count == hub.profile.call_count == 1  # served from the cache


def test_a_stale_entry_is_measured_again(hub, tmp_path):
    cache = tmp_path / "sm8750.json"
    aihub.profile(Net(), INPUTS, "e000-d000", cache)
    old = json.loads(cache.read_text())
    old["entries"]["e000-d000"].update(code_hash="0" * 16, fingerprint="0" * 16, ms=99.0)
    cache.write_text(json.dumps(old))  # as written by older architecture sources
    assert aihub.profile(Net(), INPUTS, "e000-d000", cache)["ms"] == 20.5
    assert hub.compile.call_count == 2
    other = {**INPUTS, "sample": torch.randn(1, 4, 16, 16)}  # another shape: another entry
    aihub.profile(Net(), other, "e000-d000", cache)
    assert hub.compile.call_count == 3


def test_no_client_config_is_one_clear_error(hub, tmp_path):
    hub.compile.side_effect = UserError("Failed to load configuration file")
    with pytest.raises(aihub.DeviceUnavailable, match="not configured here"):
        aihub.profile(Net(), INPUTS, "base", tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_real_client_without_config_refuses_at_once(monkeypatch, tmp_path):
    """The unfaked client, with no ~/.qai_hub/client.ini: it must refuse before any request."""
    import time

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(qai_hub, "submit_compile_job", qai_hub.Client().submit_compile_job)
    start = time.perf_counter()
    with pytest.raises(aihub.DeviceUnavailable):
        aihub.profile(Net(), INPUTS, "base", tmp_path / "c.json")
    assert time.perf_counter() - start < 10


@pytest.mark.parametrize("failure", ["compile", "profile", "network", "quantize"])
def test_failures_leave_the_cache_untouched(hub, tmp_path, failure):
    cache = tmp_path / "sm8750.json"
    cache.write_text(json.dumps({"device": aihub.DEVICE, "chipset": "SM8750",
                                 "entries": {"old": {"ms": 1.0, "profile_job": "j1"}}}))
    before = cache.read_text()
    hub.compile.side_effect = (ConnectionError("connection reset") if failure == "network"
                               else lambda *a, **k: compile_job(ok=failure != "compile"))
    hub.profile.side_effect = lambda *a, **k: inference_job(ok=False)
    hub.quantize.side_effect = lambda *a, **k: quantize_job(ok=failure != "quantize")
    expected = {"compile": "compile job jc0mp1le", "profile": "profile job jpr0f1le",
                "network": "ConnectionError: connection reset", "quantize": "quantize job jqu4nt"}
    with pytest.raises(aihub.DeviceJobFailed, match=expected[failure]):
        if failure == "quantize":
            aihub.profile_int8(Net(), INPUTS, [INPUTS], "new", cache, tmp_path)
        else:
            aihub.profile(Net(), INPUTS, "new", cache)
    assert cache.read_text() == before


def test_int8_quantizes_on_calibration_data_then_compiles_and_profiles(hub, tmp_path):
    cache = tmp_path / "sm8750.json"
    calibration = [{k: v + i if v.is_floating_point() else v for k, v in INPUTS.items()}
                   for i in range(3)]
    job = quantize_job()
    hub.quantize.side_effect, hub.quantize.return_value = None, job
    entry = aihub.profile_int8(Net(), INPUTS, calibration, "e000-d000", cache, tmp_path)
    kw = hub.quantize.call_args.kwargs
    assert kw["weights_dtype"] == kw["activations_dtype"] == qai_hub.QuantizeDtype.INT8
    assert kw["model"].endswith(".onnx")
    assert list(kw["calibration_data"]) == ["sample", "timestep", "text"]
    assert len(kw["calibration_data"]["sample"]) == 3
    assert kw["calibration_data"]["timestep"][0].dtype.name == "int64"
    compiled = hub.compile.call_args.kwargs
    assert compiled["model"] is job.get_target_model.return_value
    assert compiled["input_specs"] is None  # the quantized ONNX model carries its shapes
    assert (entry["quantize_job"], entry["compile_job"], entry["profile_job"]) == \
        ("jqu4nt", "jc0mp1le", "jpr0f1le")
    assert json.loads(cache.read_text())["entries"]["int8:e000-d000"]["ms"] == 20.5
    aihub.profile_int8(Net(), INPUTS, calibration, "e000-d000", cache, tmp_path)
    assert hub.quantize.call_count == 1  # cached


@pytest.fixture(scope="module")
def base(smoke_teacher):
    return surgery.prune(smoke_teacher.unet)[0]


def test_device_table_from_every_option_and_its_status(hub, base, tmp_path):
    cache = tmp_path / "sm8750.json"
    inputs = timing.example_inputs(base.config, 8, 8)
    missing = devicecache.device_table_status(cache)
    assert "37 of 37 entries missing (fixed, E1/0" in missing and "--api_token" in missing
    with pytest.raises(ValueError, match="no complete SM8750 latency table"):
        latency.load_table("qai-hub", tmp_path)
    table = aihub.profile_modules(base, inputs, cache)
    assert hub.compile.call_count == 37 and len(table["modules"]) == 36
    assert table["fixed_ms"] == 20.5 and table["jobs"]["D1/7"]["profile_job"] == "jpr0f1le"
    assert latency.predict_ms(table, space.Arch.teacher()) == pytest.approx(7 * 20.5)
    fixed_specs = hub.compile.call_args_list[-1].kwargs["input_specs"]
    assert fixed_specs["timestep"] == ((1,), "int64")
    assert devicecache.device_table_status(cache) is None
    (tmp_path / "device").mkdir()
    (tmp_path / "device" / "sm8750.json").write_text(cache.read_text())
    assert latency.load_table("qai-hub", tmp_path)["source"] == "qai-hub"
    aihub.profile_modules(base, inputs, cache)
    assert hub.compile.call_count == 37  # all served from the cache
    wider = aihub.model_context(base.config, timing.example_inputs(base.config, 16, 8))
    assert "37 stale" in devicecache.device_table_status(cache, wider)
    with pytest.raises(ValueError, match="37 stale"):  # a later stage at another width refuses the table
        latency.load_table("qai-hub", tmp_path, context=wider)
    here = aihub.model_context(base.config, inputs)
    assert latency.load_table("qai-hub", tmp_path, context=here)["fixed_ms"] == 20.5


def test_family_entries_carry_their_architecture_and_calibrate_on_captions(hub, base, smoke_teacher, tmp_path):
    """A member renamed onto another architecture is measured again, never served the old latency."""
    from nanosd_lib import photos, student
    from nanosd_lib.space import Arch

    cache, prompt = tmp_path / "family.json", photos.captions()[:1]
    sd15_config = {k: v for k, v in base.config.items() if not k.startswith("_")}  # stands in for SD-1.5's

    def profile(arch_id):
        members = {"prime": student.from_base(base, Arch.parse(arch_id))[0]}
        return aihub.profile_family({"prime": {"id": arch_id}}, members, smoke_teacher, cache, tmp_path,
                                    prompt, 1, 0, 3.0, sd15_config=sd15_config)

    assert profile("e000-d000") == "profiled"
    entries = json.loads(cache.read_text())["entries"]
    assert sorted(entries) == ["embedded/prime", "int8:embedded/prime", "int8:sd15/prime", "sd15/prime"]
    assert entries["sd15/prime"]["context"] == {"arch": "e000-d000"}
    assert entries["int8:embedded/prime"]["context"] == {"arch": "e000-d000", "prompts": prompt, "steps": 1,
                                                         "seed": 0, "guidance": 3.0}
    # one prompt, one step, guidance 3: the prompt's branch and the empty prompt's
    texts = hub.quantize.call_args.kwargs["calibration_data"]["encoder_hidden_states"]
    assert len(texts) == 2 and not (texts[0] == texts[1]).all()
    assert profile("e000-d000") == "profiled" and hub.compile.call_count == 4  # all four from the cache
    assert profile("e123-d456") == "profiled" and hub.compile.call_count == 8  # another member: measured
    assert json.loads(cache.read_text())["entries"]["embedded/prime"]["context"] == {"arch": "e123-d456"}
