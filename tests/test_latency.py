import pytest
import torch

from nanosd_lib import latency, space, student, surgery


@pytest.fixture(scope="module")
def base(smoke_teacher):
    return surgery.prune(smoke_teacher.unet)[0]


@pytest.fixture(scope="module")
def callables(base):
    inputs = latency.example_inputs(base.config, 8, 8)
    return inputs, *latency.stage_callables(base, inputs)


def test_median_ms_takes_the_median_after_warmup(monkeypatch):
    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # timed calls of 5, 1 and 3 ms
    monkeypatch.setattr(latency.time, "perf_counter", lambda: next(ticks))
    calls = []
    assert latency.median_ms(lambda: calls.append(1), runs=3, warmup=2) == pytest.approx(3.0)
    assert len(calls) == 5


def test_prediction_is_fixed_plus_options_minus_overheads():
    table = {"fixed_ms": 2.0, "call_overhead_ms": 0.1,
             "modules": {f"{s}/{i}": 10.0 * (k + 1) + i for k, s in enumerate(space.STAGES)
                         for i in range(len(space.options(s)))}}
    arch = space.Arch.parse("e012-d345")
    want = 2.0 + (10 + 0) + (20 + 1) + (30 + 2) + (40 + 3) + (50 + 4) + (60 + 5) - 6 * 0.1
    assert latency.predict_ms(table, arch) == pytest.approx(want)
    other = space.Arch.teacher()
    raw_other = latency.predict_ms(table, other)
    factor = latency.calibrate(table, arch, measured_ms=1.1 * want)
    assert factor == pytest.approx(1.1)
    assert latency.predict_ms(table, arch) == pytest.approx(1.1 * want)
    assert latency.predict_ms(table, other) == pytest.approx(1.1 * raw_other)


def test_every_option_gets_its_real_inputs(base, callables):
    inputs, calls, args = callables
    assert len(calls) == 4 * 3 + 8 * 3 + 1
    ref, _ = student.from_base(base, space.Arch.teacher())
    with torch.no_grad():
        for name, mod in calls.items():
            out = mod(*args[name])
            first = out[0] if isinstance(out, tuple) else out
            assert torch.isfinite(first).all(), name
        # the fixed parts' head applied to D1's output is the whole model's output
        _, _, head = calls["fixed"](*args["fixed"])
        torch.testing.assert_close(head, ref(*inputs.values()).sample)


@pytest.mark.parametrize("name", ["E2/2", "D3/7", "fixed"])
def test_onnx_export_matches_torch(callables, tmp_path, name):
    _, calls, args = callables
    module = calls[name]  # built on each access: keep one
    run = latency.onnx_session(module, args[name], tmp_path / "m.onnx", threads=1)
    with torch.no_grad():
        want = module(*args[name])
    want = want if isinstance(want, tuple) else (want,)
    for got, ref in zip(run(), want):
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)


def test_both_backends_time_a_whole_model(base, tmp_path):
    nano, _ = student.from_base(base, space.Arch.parse("e333-d777"))
    inputs = tuple(latency.example_inputs(base.config, 8, 8).values())
    for backend in latency.BACKENDS:
        ms = latency.time_callable(backend, latency.WholeCall(nano), inputs, 3, 1, tmp_path, "w")
        assert 0 < ms < 10_000
    with pytest.raises(ValueError, match="latency.backend 'tflite' is not one of"):
        latency.time_callable("tflite", nano, inputs, 3, 1, tmp_path, "w")


def test_flops_grow_with_the_architecture(base):
    inputs = tuple(latency.example_inputs(base.config, 8, 8).values())
    small, _ = student.from_base(base, space.Arch.parse("e333-d777"))
    big, _ = student.from_base(base, space.Arch.teacher())
    assert 0 < latency.count_flops(latency.WholeCall(small), inputs) < \
        latency.count_flops(latency.WholeCall(big), inputs)


def test_later_stages_read_the_table_by_backend(tmp_path):
    from nanosd_lib import aihub, outputs

    with pytest.raises(FileNotFoundError, match="run the measure_latency stage"):
        latency.load_table("onnxruntime", tmp_path)
    (tmp_path / "latency").mkdir()
    outputs.write_json(tmp_path / "latency" / "onnxruntime.json", {"fixed_ms": 1.0, "modules": {}})
    assert latency.load_table("onnxruntime", tmp_path)["source"] == "onnxruntime"
    fallback = latency.load_table("qai-hub", tmp_path)  # nothing measured on the phone yet
    assert fallback["fixed_ms"] == 1.0 and "no SM8750 measurements" in fallback["source"]
    (tmp_path / "device").mkdir()
    outputs.write_json(tmp_path / "device" / "sm8750.json",
                       {"device": aihub.DEVICE, "entries": {"e000-d000": {"ms": 20.5, "profile_job": "j1"}}})
    assert latency.load_table("qai-hub", tmp_path)["entries"]["e000-d000"]["ms"] == 20.5
    with pytest.raises(ValueError, match="latency.backend 'npu' is not one of"):
        latency.load_table("npu", tmp_path)
