"""The shared figures: what a reader needs to tell apart is told apart."""
import matplotlib

matplotlib.use("Agg")

import re  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from nanosd_lib import plots  # noqa: E402


def test_model_projections_marks_roles_labels_each_model_once_and_uses_log_axes():
    models = pd.DataFrame({"quality": [-0.004, 0.016, 0.008, 0.005, 0.30],
                           "latency_ms": [292.0, 72.0, 92.0, 164.0, 154.0],
                           "params": [8.6e6, 1.14e6, 1.21e6, 3.24e6, 1.22e6]},
                          index=["teacher", "latency", "prime", "bk_tiny", "uniform"])
    roles = {"teacher": "teacher", "latency": "member", "prime": "member", "bk_tiny": "baseline",
             "uniform": "baseline"}
    fig = plots.model_projections(models, ["quality", "latency_ms", "params"], roles, "t")
    for ax in fig.axes:
        labels = sorted(t.get_text() for t in ax.texts)
        assert labels == sorted(models.index)  # each model named once, by its name alone
        assert len(ax.collections) == 3  # one scatter per role present
    assert [ax.get_xscale() for ax in fig.axes] == ["symlog", "symlog", "log"]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "log"]
    assert sorted(t.get_text() for t in fig.axes[0].get_legend().get_texts()) == ["baseline", "member", "teacher"]
    with pytest.raises(KeyError):
        plots.model_projections(models, ["quality", "latency_ms", "missing"], roles, "t")


def label_boxes(fig):
    """Each axes with its labels' boxes in pixels on the drawn figure, after checking no two overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        clashes = [(a, b) for a in boxes for b in boxes if a < b and boxes[a].overlaps(boxes[b])]
        assert not clashes, (ax.get_xlabel(), ax.get_ylabel(), clashes)
        yield ax, boxes


def test_labels_of_nearby_models_do_not_cover_each_other():
    """Prime and Latency a few pixels apart (as in the committed figure): each label moves to a free side."""
    models = pd.DataFrame({"quality": [-0.004, 0.0051, 0.0065, 0.025, 0.3],
                           "latency_ms": [249.0, 46.0, 40.0, 161.0, 153.0],
                           "params": [8.6e6, 1.16e6, 1.12e6, 3.24e6, 1.25e6]},
                          index=["teacher", "prime", "latency = params", "bk_tiny", "uniform"])
    roles = {"teacher": "teacher", "prime": "member", "latency = params": "member", "bk_tiny": "baseline",
             "uniform": "baseline"}
    fig = plots.model_projections(models, ["quality", "latency_ms", "params"], roles, "t")
    for ax, boxes in label_boxes(fig):
        assert len(boxes) == 5


def test_front_labels_of_nearby_members_do_not_cover_each_other():
    """An earlier committed search's family: Prime e333-d772 sat a few pixels from Latency = Params
    e333-d774 in every projection of the front figure; their labels must not print over each other."""
    marks = {"latency": "e333-d774", "params": "e333-d774", "prime": "e333-d772"}
    rng = np.random.default_rng(0)  # grey evaluated points around them: not obstacles for the labels
    points = pd.DataFrame({"id": ["e333-d774", "e333-d772"] + [f"x{i}" for i in range(40)],
                           "quality": [-0.0067, -0.0188, *rng.uniform(-0.03, 0.3, 40)],
                           "latency_ms": [4.17, 4.43, *rng.uniform(4.0, 12.0, 40)],
                           "params": [1.086e6, 1.138e6, *rng.uniform(1.0e6, 4.0e6, 40)]})
    fig = plots.front_projections(points, ["quality", "latency_ms", "params"], marks, "t")
    for ax, boxes in label_boxes(fig):
        assert sorted(boxes) == ["latency = params e333-d774", "prime e333-d772"]
        frame = ax.get_window_extent(fig.canvas.get_renderer())
        assert all(frame.contains(*corner) for box in boxes.values() for corner in box.corners()), \
            (ax.get_xlabel(), ax.get_ylabel())


def test_models_on_one_point_share_one_label_and_ticks_stay_few():
    """The search may pick one architecture for two roles: one label, "latency = params", not two
    labels printed over each other; log axes over less than a decade label 1, 2 and 5 only."""
    models = pd.DataFrame({"quality": [-0.004, 0.013, 0.013, 0.012],
                           "latency_ms": [249.0, 46.9, 46.9, 61.3],
                           "params": [8.6e6, 1.138e6, 1.138e6, 1.251e6]},
                          index=["teacher", "latency", "params", "prime"])
    roles = {"teacher": "teacher", "latency": "member", "params": "member", "prime": "member"}
    fig = plots.model_projections(models, ["quality", "latency_ms", "params"], roles, "t")
    for ax in fig.axes:
        assert sorted(t.get_text() for t in ax.texts) == ["latency = params", "prime", "teacher"]
    fig.canvas.draw()
    ax = fig.axes[2]  # latency (x) against params (y), both logarithmic
    shown = [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]
    assert all(re.fullmatch(r"[125]0*[kM]?", t) for t in shown), shown
    assert {"50", "100", "200", "2M", "5M"} <= set(shown), shown
    marks = {"latency": "e233-d771", "params": "e233-d771", "prime": "e233-d761"}
    points = pd.DataFrame({"id": ["e233-d771", "e233-d761", "e000-d000"], "quality": [0.01, 0.0, 0.2],
                           "latency_ms": [4.1, 5.0, 9.0], "params": [1.1e6, 1.2e6, 4e6]})
    fig = plots.front_projections(points, ["quality", "latency_ms", "params"], marks, "t")
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["latency = params e233-d771", "prime e233-d761"]
