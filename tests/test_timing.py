import pandas as pd
import pytest
import torch

from nanosd_lib import timing


def test_median_ms_takes_the_median_after_warmup(monkeypatch):
    ticks = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # timed calls of 5, 1 and 3 ms
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    calls = []
    assert timing.median_ms(lambda: calls.append(1), runs=3, warmup=2) == pytest.approx(3.0)
    assert len(calls) == 5


def test_rounds_time_every_item_once_in_a_fresh_order():
    seen = []
    calls = {name: (lambda name=name: seen.append(name)) for name in "abcdef"}
    timings = timing.interleaved_timings(calls, rounds=4, runs=2, warmup=1, seed=0)
    assert len(timings) == 24 and (timings.groupby("item").size() == 4).all()
    orders = [tuple(seen[i * 18:(i + 1) * 18:3]) for i in range(4)]  # 3 calls per item per round
    assert len(set(orders)) > 1 and all(sorted(o) == list("abcdef") for o in orders)
    summary = timing.summarise(timings)
    assert list(summary.columns) == ["ms", "first_half_ms", "second_half_ms"]


def test_the_summary_keeps_each_half_of_the_rounds_apart():
    ms = {"a": [1, 2, 3, 10, 20, 30], "b": [5, 5, 5, 5, 5, 6]}
    timings = pd.DataFrame([{"item": k, "round": r, "ms": v} for k, vs in ms.items() for r, v in enumerate(vs)])
    summary = timing.summarise(timings)
    assert summary.loc["a"].tolist() == [6.5, 2.0, 20.0]  # median of all six rounds, of 0-2 and of 3-5
    assert summary.loc["b"].tolist() == [5.0, 5.0, 5.0]


def test_only_host_backends_run_here(tmp_path):
    run = timing.host_call("torch", torch.nn.Identity(), (torch.ones(2),), 1, tmp_path, "id")
    assert run().tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="backend 'qai-hub' is not a host backend: one of"):
        timing.host_call("qai-hub", torch.nn.Identity(), (torch.ones(2),), 1, tmp_path, "id")


def test_export_names_are_plain_file_names(tmp_path):
    assert timing.onnx_file(tmp_path, "teacher VAE alone") == tmp_path / "teacher_VAE_alone.onnx"
    assert timing.onnx_file(tmp_path, "w1/4-l1-na").name == "w1_4-l1-na.onnx"
    assert timing.onnx_file(tmp_path, "int8:sd15/prime+slim_vae").name == "int8_sd15_prime+slim_vae.onnx"


def test_example_inputs_are_one_seeded_tile():
    cfg = type("Cfg", (), {"in_channels": 4, "cross_attention_dim": 16})
    a, b = timing.example_inputs(cfg, 8, 5, seed=1), timing.example_inputs(cfg, 8, 5, seed=1)
    assert list(a) == ["sample", "timestep", "encoder_hidden_states"]  # SD's names, in call order
    assert a["sample"].shape == (1, 4, 8, 8) and a["encoder_hidden_states"].shape == (1, 5, 16)
    assert a["timestep"].dtype == torch.int64
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sample"], timing.example_inputs(cfg, 8, 5, seed=2)["sample"])
