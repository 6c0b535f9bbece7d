import numpy as np
import pytest
import torch

from nanosd_lib import latency, space, student, surgery, timing


@pytest.fixture(scope="module")
def base(smoke_teacher):
    return surgery.prune(smoke_teacher.unet)[0]


@pytest.fixture(scope="module")
def callables(base):
    inputs = timing.example_inputs(base.config, 8, 8)
    return inputs, *latency.stage_callables(base, inputs)


def test_prediction_is_fixed_plus_the_chosen_options():
    table = {"fixed_ms": 2.0,
             "modules": {f"{s}/{i}": 10.0 * (k + 1) + i for k, s in enumerate(space.STAGES)
                         for i in range(len(space.options(s)))}}
    want = 2.0 + (10 + 0) + (20 + 1) + (30 + 2) + (40 + 3) + (50 + 4) + (60 + 5)
    assert latency.predict_ms(table, space.Arch.parse("e012-d345")) == pytest.approx(want)


def synthetic(seed: int = 0):
    """Module timings, and whole-model latencies that differ from their sum the way real ones do:
    an intercept, a context scale per stage, a small per-option surprise, measurement noise."""
    rng = np.random.default_rng(seed)
    names = space.option_names()
    module = {n: rng.uniform(0.2, 2.0) for n in names}
    scale = {s: rng.uniform(0.8, 1.3) for s in space.STAGES}
    true = {n: scale[n.split("/")[0]] * module[n] + rng.normal(0, 0.05) for n in names}

    def truth(arch):
        return 1.5 + sum(true[f"{s}/{c}"] for s, c in zip(space.STAGES, arch.choices))
    return module, truth, rng


def test_the_fit_recovers_whole_model_latency_where_the_module_sum_cannot():
    module, truth, rng = synthetic()
    fit, check = latency.whole_model_sets(48, 24, seed=0)
    measured = [truth(a) * (1 + rng.normal(0, 0.03)) for a in fit]
    table = latency.fit_table(module, fit, measured)

    def mape(t):
        return 100 * np.mean([abs(latency.predict_ms(t, a) - truth(a)) / truth(a) for a in check])
    assert mape(table) < 1.5  # measured at seed 0: 0.7 %
    assert mape({"fixed_ms": 0.0, "modules": module}) > 10  # the plain sum misses the context
    assert mape(latency.fit_table(module, fit, measured, prior=False)) > 2 * mape(table)
    assert table["fit"]["models"] == [a.id for a in fit] and table["fit"]["loo_mape_%"] < 5
    with pytest.raises(ValueError, match="at least 10 of them; got 5 architectures"):
        latency.fit_table(module, fit[:5], measured[:5])


def test_fit_and_check_models_are_disjoint_and_cover_every_option():
    fit, check = latency.whole_model_sets(48, 24, seed=3)
    assert len(set(fit)) == 48 and len(set(check)) == 24 and not set(fit) & set(check)
    assert fit[0] == space.Arch.teacher()
    for k, stage in enumerate(space.STAGES):
        counts = np.bincount([a.choices[k] for a in fit[1:]], minlength=len(space.options(stage)))
        assert counts.min() >= 47 // len(space.options(stage)), stage


def test_a_table_plan_needs_two_rounds_for_its_noise_floor():
    with pytest.raises(ValueError, match="TablePlan.rounds=1; it must be an integer >= 2"):
        latency.TablePlan(rounds=1)


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
    run = timing.onnx_session(module, args[name], tmp_path / "m.onnx", threads=1)
    with torch.no_grad():
        want = module(*args[name])
    want = want if isinstance(want, tuple) else (want,)
    for got, ref in zip(run(), want):
        torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)


def test_both_backends_time_a_whole_model(base, tmp_path):
    nano, _ = student.from_base(base, space.Arch.parse("e333-d777"))
    inputs = tuple(timing.example_inputs(base.config, 8, 8).values())
    for backend in timing.BACKENDS:
        ms = timing.time_callable(backend, latency.WholeCall(nano), inputs, 3, 1, tmp_path, "w")
        assert 0 < ms < 10_000
    with pytest.raises(ValueError, match="backend 'tflite' is not a host backend: one of"):
        timing.time_callable("tflite", nano, inputs, 3, 1, tmp_path, "w")
    named = timing.example_inputs(base.config, 8, 8)
    timed = latency.time_models("onnxruntime", {"e333-d777": nano}, named, 1, tmp_path, rounds=2, runs=1)
    assert list(timed.model) == ["e333-d777"] and (timed.measured_ms > 0).all()


def test_flops_grow_with_the_architecture(base):
    inputs = tuple(timing.example_inputs(base.config, 8, 8).values())
    small, _ = student.from_base(base, space.Arch.parse("e333-d777"))
    big, _ = student.from_base(base, space.Arch.teacher())
    assert 0 < timing.count_flops(latency.WholeCall(small), inputs) < \
        timing.count_flops(latency.WholeCall(big), inputs)


def test_one_cold_run_gives_the_fitted_table_and_its_check(base, smoke_teacher, tmp_path):
    from nanosd_lib import outputs

    inputs = timing.example_inputs(base.config, 8, 8)
    plan = latency.TablePlan(rounds=2, runs=1, fit_models=12, check_models=4)  # 2 rounds: one per noise half
    out = latency.measure_table("torch", base, inputs, plan, threads=1, workdir=tmp_path,
                                scale="smoke", extra={"teacher": smoke_teacher.unet})
    table, whole = out["table"], out["whole"]
    assert len(table["modules"]) == 36 and table["fit"]["check_models"] == list(
        whole.model[whole.set == "check"])
    assert whole.set.value_counts().to_dict() == {"fit": 12, "check": 4, "extra": 1}
    assert len(out["timings"]) == 2 * (37 + 17)
    for row in whole[whole.set != "extra"].itertuples():
        assert row.predicted_ms == pytest.approx(latency.predict_ms(table, space.Arch.parse(row.model)))
        assert row.measured_ms > 0 and row.flops > 0
    assert np.isnan(whole.set_index("model").predicted_ms["teacher"])
    for key in ("heldout_mape_%", "heldout_worst_%", "spearman_table", "spearman_flops",
                "noise_mape_%", "fit_mape_%"):
        assert np.isfinite(out["metrics"][key]), key
    assert list(out["methods"].method)[-1].startswith("chosen") and len(out["options"]) == 36
    (tmp_path / "latency").mkdir()
    outputs.write_json(tmp_path / "latency" / "torch.json", table)
    loaded = latency.load_table("torch", tmp_path)
    assert loaded["threads"] == 1 and loaded["shapes"]["timestep"] == [1]
    arch = space.Arch.parse("e123-d456")
    assert latency.predict_ms(loaded, arch) == pytest.approx(latency.predict_ms(table, arch), rel=1e-5)


def test_the_sd15_width_table_builds_one_option_at_a_time(smoke_teacher):
    out = latency.measure_sd15_width(threads=1, runs=1, random_models=2,
                                     unet_config=dict(smoke_teacher.unet.config), latent_px=8,
                                     text_len=8)
    whole, table = out["whole"], out["table"]
    assert list(whole.set) == ["fit", "fit", "check", "check"] and whole.model[0] == "e000-d000"
    assert len(table["modules"]) == 36 and table["fit"]["context_factor"] > 0
    assert table["shapes"]["sample"] == [1, 4, 8, 8]
    assert whole.predicted_ms.tolist() == pytest.approx(
        [latency.predict_ms(table, space.Arch.parse(m)) for m in whole.model])


def test_later_stages_read_the_table_by_backend(tmp_path):
    from nanosd_lib import outputs

    with pytest.raises(FileNotFoundError, match="run the measure_latency stage"):
        latency.load_table("onnxruntime", tmp_path)
    (tmp_path / "latency").mkdir()
    outputs.write_json(tmp_path / "latency" / "onnxruntime.json", {"fixed_ms": 1.0, "modules": {}})
    assert latency.load_table("onnxruntime", tmp_path)["source"] == "onnxruntime"
    with pytest.raises(ValueError, match="37 of 37 entries missing.*--api_token"):
        latency.load_table("qai-hub", tmp_path)  # nothing measured on the phone yet
    with pytest.raises(ValueError, match="base.latency_backend 'npu' is not one of"):
        latency.load_table("npu", tmp_path)
