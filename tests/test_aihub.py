"""AI Hub's remote service cannot be reached here: only the client's remote calls are faked."""
import json

import pytest
import qai_hub
import torch
from qai_hub.client import UserError

from nanosd_lib import aihub


class Net(torch.nn.Module):
    def forward(self, x, y):
        return x * 2 + y.mean()


INPUTS = {"sample": torch.randn(1, 4, 8, 8), "text": torch.randn(1, 8, 16)}


class FakeStatus:
    def __init__(self, success, message=None):
        self.success, self.message = success, message


class FakeCompileJob:
    job_id = "jc0mp1le"

    def __init__(self, ok=True):
        self.ok = ok

    def get_target_model(self):
        return "target-model" if self.ok else None

    def get_status(self):
        return FakeStatus(self.ok, None if self.ok else "unsupported op")


class FakeProfileJob:
    job_id = "jpr0f1le"

    def __init__(self, ok=True):
        self.ok = ok

    def wait(self):
        return FakeStatus(self.ok, None if self.ok else "device lost")

    def download_profile(self):
        return {"execution_summary": {"estimated_inference_time": 20_500,
                                      "inference_memory_peak_range": (1_000, 2_000)}}


@pytest.fixture
def hub(monkeypatch):
    calls = []

    def compile_job(**kw):
        calls.append(("compile", kw))
        return FakeCompileJob()

    def inference_job(**kw):
        calls.append(("profile", kw))
        return FakeProfileJob()

    monkeypatch.setattr(qai_hub, "submit_compile_job", compile_job)
    monkeypatch.setattr(qai_hub, "submit_inference_job", inference_job)
    return calls


def test_profile_requests_converts_and_caches(hub, tmp_path):
    cache = tmp_path / "sm8750.json"
    entry = aihub.profile(Net(), INPUTS, "e000-d000", cache)
    assert entry["ms"] == 20.5  # 20,500 microseconds
    assert entry["compile_job"] == "jc0mp1le" and entry["profile_job"] == "jpr0f1le"
    (kind, kw), (kind2, kw2) = hub
    assert kind == "compile" and kw["device"].name == "Snapdragon 8 Elite QRD"
    assert kw["input_specs"] == {"sample": ((1, 4, 8, 8), "float32"), "text": ((1, 8, 16), "float32")}
    assert isinstance(kw["model"], torch.export.ExportedProgram)
    assert kind2 == "profile" and kw2["model"] == "target-model" and kw2["profile"] is True
    stored = json.loads(cache.read_text())
    assert stored["entries"]["e000-d000"]["profile_job"] == "jpr0f1le"
    assert aihub.profile(Net(), INPUTS, "e000-d000", cache)["ms"] == 20.5
    assert len(hub) == 2  # served from the cache: no new job


def test_no_client_config_is_one_clear_error(monkeypatch, tmp_path):
    def refuse(**kw):
        raise UserError("Failed to load configuration file")

    monkeypatch.setattr(qai_hub, "submit_compile_job", refuse)
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


@pytest.mark.parametrize("failure", ["compile", "profile", "network"])
def test_failures_leave_the_cache_untouched(monkeypatch, tmp_path, failure):
    cache = tmp_path / "sm8750.json"
    cache.write_text(json.dumps({"device": aihub.DEVICE, "chipset": "SM8750",
                                 "entries": {"old": {"ms": 1.0, "profile_job": "j1"}}}))
    before = cache.read_text()

    def compile_job(**kw):
        if failure == "network":
            raise ConnectionError("connection reset")
        return FakeCompileJob(ok=failure != "compile")

    monkeypatch.setattr(qai_hub, "submit_compile_job", compile_job)
    monkeypatch.setattr(qai_hub, "submit_inference_job", lambda **kw: FakeProfileJob(ok=False))
    expected = {"compile": "compile job jc0mp1le", "profile": "profile job jpr0f1le",
                "network": "ConnectionError: connection reset"}[failure]
    with pytest.raises(aihub.DeviceJobFailed, match=expected):
        aihub.profile(Net(), INPUTS, "new", cache)
    assert cache.read_text() == before
