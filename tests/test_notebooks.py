"""The stage notebooks through papermill, on paths nbval's smoke run does not take."""
import json
from pathlib import Path

import nbformat
import papermill
import pytest

from conftest import ROOT


def parameters_of(notebook: str) -> dict:
    nb = nbformat.read(ROOT / "notebooks" / notebook, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    namespace = {}
    exec(cell.source, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("__")}


def few_photos(corpus_dir: Path, to: Path, train: int) -> None:
    """A corpus with the first `train` training photos and every held-out and test photo (the same files,
    linked): the notebook samples one prompt per training photo and compares with 8 crops of each."""
    rows = json.loads((corpus_dir / "manifest.json").read_text())
    keep = [r for r in rows if r["split"] != "train"] + [r for r in rows if r["split"] == "train"][:train]
    to.mkdir(parents=True)
    (to / "weights").symlink_to(corpus_dir / "weights")
    for r in keep:
        (to / r["file"]).parent.mkdir(exist_ok=True)
        (to / r["file"]).symlink_to(corpus_dir / r["file"])
    (to / "manifest.json").write_text(json.dumps(keep))


def test_train_teacher_loads_a_local_diffusers_folder(smoke_teacher, smoke_teacher_dir, study_root, tmp_path):
    """`base.teacher` naming a folder (scale sd15) loads it instead of training: SD-1.5's path."""
    few_photos(study_root / "data" / "photos", tmp_path / "data" / "photos", train=4)
    params = parameters_of("01_train_teacher.ipynb")
    params["base"] = {**params["base"], "scale": "sd15", "teacher": str(smoke_teacher_dir)}
    params["train_teacher"] = {**params["train_teacher"], "sample_steps": 1, "samples_per_prompt": 1, "crops": 16}
    params["output_root"] = str(tmp_path)
    papermill.execute_notebook(str(ROOT / "notebooks" / "01_train_teacher.ipynb"),
                               str(tmp_path / "out.ipynb"), parameters=params, cwd=str(ROOT),
                               kernel_name="python3", progress_bar=False)
    metrics = json.loads((tmp_path / "results" / "train_teacher" / "metrics.json").read_text())
    assert metrics["unet_params"] == sum(p.numel() for p in smoke_teacher.unet.parameters())
    assert "unet_loss_ratio" not in metrics and "vae_scaling_factor" not in metrics  # nothing was trained
    assert metrics["bicubic_x8_psnr_kodak"] == pytest.approx(24.0, abs=0.05)  # the reference value
    assert metrics["provenance"]["scale"] == "sd15" and metrics["prompts"] == 4
    source = json.loads((tmp_path / "data" / "teacher" / "source.json").read_text())
    assert source["teacher"] == str(smoke_teacher_dir)


def test_a_bad_parameters_cell_fails_before_any_output(tmp_path):
    params = parameters_of("00_measure_baseline_cost.ipynb")
    params["measure_baseline_cost"] = {**params["measure_baseline_cost"], "timing_runs": 0}
    params["output_root"] = str(tmp_path)
    with pytest.raises(papermill.PapermillExecutionError, match="timing_runs: must be >= 1, got 0"):
        papermill.execute_notebook(str(ROOT / "notebooks" / "00_measure_baseline_cost.ipynb"),
                                   str(tmp_path / "out.ipynb"), parameters=params, cwd=str(ROOT),
                                   kernel_name="python3", progress_bar=False)
    assert not (tmp_path / "results").exists()
