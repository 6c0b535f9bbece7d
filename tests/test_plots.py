"""The shared figures: what a reader needs to tell apart is told apart."""
import matplotlib

matplotlib.use("Agg")

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
