import os

import pytest
import yaml

from nanosd_lib import config, run
from conftest import ROOT


def test_committed_params_are_valid():
    params = config.load(ROOT / "params.yaml")
    assert params.base.scale == "embedded"
    assert params.train_teacher.unet_steps > 0


def test_the_phone_backend_extends_the_host_backends():
    assert config.LATENCY_BACKENDS == (*config.HOST_BACKENDS, "qai-hub") == ("torch", "onnxruntime", "qai-hub")


def bad(**changes):
    """params.yaml with `section.key: value` changes, validated as the study's own file is."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *path, key = dotted.split("__")
        where = data
        for part in path:
            where = where[part]
        where[key] = value
    return config.check(root=ROOT, **data)


@pytest.mark.parametrize("change, message", [
    ({"train_teacher__unet_stpes": 3}, "train_teacher.unet_stpes: unknown key"),
    ({"train_teacher__unet_steps": "600"}, "train_teacher.unet_steps: expected int, got str"),
    ({"train_teacher__unet_steps": 2.5}, "train_teacher.unet_steps: expected int, got float"),
    ({"base__scale": "huge"}, "base.scale: 'huge' is not one of 'smoke', 'embedded' or 'sd15'"),
    ({"train_teacher__vae_steps": 0}, "train_teacher.vae_steps: must be >= 1, got 0"),
    ({"train_teacher__unet_steps": -5}, "train_teacher.unet_steps: must be >= 1, got -5"),
    ({"gather_photos__holdout": ["china", "lena"]}, "gather_photos.holdout: unknown photos ['lena']"),
    ({"measure_baseline_cost__overlap_px": 600}, "overlap_px: 600 must be below tile_px (512)"),
    ({"slim_vae__option": "w1/8"}, "slim_vae.option: unknown option 'w1/8'"),
    ({"train_teacher__vae_crop_px": 36}, "train_teacher.vae_crop_px: must be a multiple of 8, got 36"),
    ({"slim_vae__tune__stpes": 3},
     "slim_vae.tune.stpes: unknown key; slim_vae.tune allows ['batch_size', 'crop_px', 'lr', 'steps']"),
    ({"train_teacher__vae_tune__crop_px": 36}, "train_teacher.vae_tune.crop_px: must be a multiple of 8, got 36"),
    ({"slim_vae__tune": 500}, "slim_vae.tune: expected a group of keys ['batch_size', 'crop_px', 'lr', 'steps'], got int 500"),
    ({"base__latency_backend": "npu"}, "base.latency_backend: 'npu' is not one of 'torch', 'onnxruntime' or 'qai-hub'"),
    ({"measure_latency__backends": ["torch", "qai-hub"]},  # the phone's table is read, not timed here
     "measure_latency.backends.1: 'qai-hub' is not one of 'torch' or 'onnxruntime'"),
    ({"base__latency_backend": "qai-hub"}, "base.latency_backend: 'qai-hub' has no complete SM8750 table"),
    ({"base__threads": True}, "base.threads: expected int, got bool"),
    ({"base__teacher": "/nonexistent/sd15"}, "base.teacher: '/nonexistent/sd15' does not exist"),
    ({"base__seed": 2 ** 32}, "base.seed: must be < 4294967296, got 4294967296"),
    ({"train_teacher__unet_lr": float("inf")}, "train_teacher.unet_lr: Input should be a finite number"),
    ({"gather_photos__holdout": ["china", "china"]}, "['china'] listed more than once"),
    ({"search_architectures__n_init": 41}, "n_init (41) must not exceed evaluations (40)"),
    ({"search_architectures__pool": 3}, "pool (3) must be at least q (4)"),
    ({"evaluate_family__grid_prompts": 257}, "grid_prompts (257) must not exceed images (256)"),
    ({"slim_vae__sd15_timing": False}, "restore_photos.seed_photo: true needs slim_vae.sd15_timing: true"),
    ({"base__latency_backend": "qai-hub", "measure_latency__backends": ["torch"]},
     "'qai-hub' also needs 'onnxruntime' in measure_latency.backends"),
    ({"profile_on_device__calibration_prompts": 33},
     "calibration_prompts + held_out_prompts (33 + 4) must not exceed the 36 training prompts"),
])
def test_bad_values_are_named(change, message):
    with pytest.raises(config.ParamsError) as err:
        bad(**change)
    assert message in str(err.value)


def test_every_problem_in_one_error():
    with pytest.raises(config.ParamsError) as err:
        bad(train_teacher__vae_steps=0, base__scale="huge")
    assert "vae_steps" in str(err.value) and "base.scale" in str(err.value)


def test_teacher_folder_must_be_diffusers(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(config.ParamsError, match="is not a diffusers model folder"):
        bad(base__teacher=str(tmp_path), base__scale="sd15")


def test_teacher_folder_needs_sd15_scale(smoke_teacher_dir):
    with pytest.raises(config.ParamsError, match="runs at scale 'sd15'"):
        bad(base__teacher=str(smoke_teacher_dir))
    assert bad(base__teacher=str(smoke_teacher_dir), base__scale="sd15").base.scale == "sd15"


def test_missing_section_and_unknown_section(tmp_path):
    (tmp_path / "params.yaml").write_text("base: {seed: 0}\n")
    with pytest.raises(config.ParamsError, match="train_teacher: missing section"):
        config.load(tmp_path / "params.yaml")
    with pytest.raises(config.ParamsError, match="trian_teacher: unknown section"):
        config.check(trian_teacher={})


def test_a_missing_key_is_named(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("  unet_steps:", "  # unet_steps:")
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(config.ParamsError, match=r"train_teacher.unet_steps: missing"):
        config.load(tmp_path / "params.yaml")


def test_a_group_is_given_whole_and_read_by_attribute():
    leg = {"steps": 10, "crop_px": 64, "batch_size": 2, "lr": 1e-3}
    assert config.check(slim_vae={"tune": leg}).slim_vae.tune.crop_px == 64
    with pytest.raises(config.ParamsError, match="slim_vae.tune.lr: missing"):
        config.check(slim_vae={"tune": {k: v for k, v in leg.items() if k != "lr"}})


def test_reading_an_unlisted_key_fails():
    params = config.check(base={"seed": 1})
    assert params.base.seed == 1
    with pytest.raises(AttributeError, match="base.threads was not given to this stage"):
        params.base.threads


def test_stage_receives_exactly_the_listed_params():
    params = config.load(ROOT / "params.yaml")
    got = run.stage_params(ROOT / "dvc.yaml", "measure_baseline_cost", params)
    assert set(got["base"]) == {"seed", "scale", "threads"}  # not base.teacher: it does not read it
    assert got["measure_baseline_cost"] == params.measure_baseline_cost.as_dict()


def test_every_notebook_key_is_listed_in_dvc_yaml():
    """The parameters cell of each notebook declares exactly the keys its stage gets from dvc.yaml."""
    import nbformat

    params = config.load(ROOT / "params.yaml")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        if not list((ROOT / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb")):
            continue  # a script stage (check_params, gather_photos)
        nb = nbformat.read(run.notebook_for(ROOT, stage), as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        namespace = {}
        exec(cell.source, namespace)
        declared = {s: set(namespace[s]) for s in run.stage_params(ROOT / "dvc.yaml", stage, params)}
        listed = {s: set(v) for s, v in run.stage_params(ROOT / "dvc.yaml", stage, params).items()}
        assert declared == listed, stage
        config.check(**{s: namespace[s] for s in listed})  # smoke defaults are valid too


def test_bad_params_stop_the_runner_before_any_output(study, capsys):
    report = study / "reports" / "01_train_teacher.ipynb"
    report.parent.mkdir()
    report.write_text("previous run")
    text = (study / "params.yaml").read_text().replace("unet_steps: ", "unet_steps: -")
    (study / "params.yaml").write_text(text)
    cwd = os.getcwd()
    os.chdir(study)
    try:
        assert run.main(["train_teacher"]) == 2
    finally:
        os.chdir(cwd)
    assert "train_teacher.unet_steps: must be >= 1" in capsys.readouterr().err
    assert report.read_text() == "previous run"
    assert not (study / "results").exists() and not (study / "data").exists()


def test_only_the_two_known_library_warnings_are_silenced():
    import warnings

    import nanosd_lib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nanosd_lib.quiet_known_warnings()
        warnings.warn("`torch.jit.script` is deprecated. Please switch to `torch.compile`", FutureWarning)
        warnings.warn("Constant folding - Only steps=1 can be constant folded for opset >= 10", UserWarning)
        warnings.warn("`torch.jit.script` is deprecated", UserWarning)  # same text, other category: shown
        warnings.warn("a warning about the study", FutureWarning)
    assert [(type(w.message), str(w.message)) for w in caught] == [
        (UserWarning, "`torch.jit.script` is deprecated"), (FutureWarning, "a warning about the study")]
