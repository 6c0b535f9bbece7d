"""The DVC pipeline itself: dependencies complete, params checked before any stage, stale work redone."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

LIB = ROOT / "nanosd_lib"


def imported(tree: ast.AST) -> set[str]:
    """nanosd_lib modules a piece of code imports, at any depth (function-level imports count: they
    run when the stage runs)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod.startswith("nanosd_lib"):
                sub = mod.removeprefix("nanosd_lib").lstrip(".")
                if sub:
                    found.add(sub.split(".")[0])
                else:
                    found |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("nanosd_lib.")}
    return {m for m in found if (LIB / f"{m}.py").is_file()}


def closure(modules: set[str]) -> set[str]:
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imported(ast.parse((LIB / f"{m}.py").read_text()))
    return seen


def stage_entry_modules(name: str, stage: dict) -> set[str]:
    """What a stage's command runs: its notebook's imports, plus the module named by `-m`."""
    cmd = stage["cmd"]
    mods = {cmd.split("-m nanosd_lib.")[1].split()[0]}
    notebook = next((d for d in stage.get("deps", []) if str(d).endswith(".ipynb")), None)
    if notebook:
        cells = json.loads((ROOT / notebook).read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        mods |= imported(ast.parse(code))
    return mods


def test_every_stage_lists_exactly_the_library_modules_it_imports():
    """A module missing from a stage's deps leaves stale outputs after a change to it; one listed but
    not imported reruns the stage for nothing."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = {}
    for name, stage in stages.items():
        need = {f"nanosd_lib/{m}.py" for m in closure(stage_entry_modules(name, stage))}
        listed = {d for d in stage.get("deps", []) if str(d).startswith("nanosd_lib/")}
        if need != listed:
            problems[name] = {"missing": sorted(need - listed), "not imported": sorted(listed - need)}
    assert not problems, f"stages whose library dependencies differ from their imports: {problems}"


def test_every_stage_runs_after_the_params_check():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["check_params"]["params"] == [{"params.yaml": None}]  # the whole file
    for name, stage in stages.items():
        if name != "check_params":
            assert "data/params.checked" in stage.get("deps", []), name


def test_persist_only_where_resuming_needs_it():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    persisted = {next(iter(o)) for s in stages.values() for o in s.get("outs", [])
                 if isinstance(o, dict) and next(iter(o.values())).get("persist")}
    resumable = {"data/students", "data/device/sm8750.json", "data/device/sm8750_family.json", "data/search"}
    assert persisted <= resumable, persisted


@pytest.fixture(scope="module")
def dvc_template(tmp_path_factory):
    """A scratch DVC project with the study's dvc.yaml and params.yaml and earlier outputs in place."""
    root = tmp_path_factory.mktemp("dvc_template")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(LIB, root / "nanosd_lib", ignore=shutil.ignore_patterns("__pycache__"))  # deps
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, check=True, env=env)
    earlier = root / "results" / "train_teacher" / "metrics.json"
    earlier.parent.mkdir(parents=True)
    earlier.write_text('{"from": "an earlier run"}')
    return root, env


@pytest.fixture
def dvc_study(dvc_template, tmp_path):
    """A fresh copy of the template for each test: `dvc init` once, not once per case."""
    template, env = dvc_template
    study = tmp_path / "study"
    shutil.copytree(template, study)
    return study, env


def edit_params(path: Path, section: str, key: str, value) -> None:
    data = yaml.safe_load(path.read_text())
    if key is None:
        data[section] = value
    else:
        data.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.parametrize("section, key, value, message", [
    ("base", "sedd", 1, "base.sedd: unknown key"),
    ("serach", None, {"seeds": 2}, "serach: unknown section"),
    ("train_teacher", "unet_steps", "600", "train_teacher.unet_steps: expected int, got str '600'"),
    ("distill_modules", "module_steps", 0, "distill_modules.module_steps: must be >= 1, got 0"),
    ("gather_photos", "holdout", ["china", "lena"], "gather_photos.holdout: unknown photos ['lena']"),
    ("measure_baseline_cost", "overlap_px", 512, "overlap_px: 512 must be below tile_px (512)"),
])
def test_plain_dvc_repro_refuses_bad_params_before_any_stage(dvc_study, section, key, value, message):
    import time

    study, env = dvc_study
    edit_params(study / "params.yaml", section, key, value)
    start = time.perf_counter()
    done = subprocess.run(["dvc", "repro"], cwd=study, env=env, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    said = done.stdout + done.stderr
    assert done.returncode != 0 and message in said, said
    ran = [line for line in said.splitlines() if line.startswith("Running stage")]
    assert ran == ["Running stage 'check_params':"], ran  # no other stage started
    assert (study / "results" / "train_teacher" / "metrics.json").read_text() == '{"from": "an earlier run"}'
    assert not (study / "data" / "photos").exists() and not (study / "reports").exists()
    assert seconds < 60


def test_a_code_change_redoes_persisted_work(tmp_path):
    """data/students persists between runs so a killed run can resume; a change to any library source
    (here a copy of the library) or input must clear it instead of resuming with older code's modules."""
    from nanosd_lib import distill

    lib = tmp_path / "lib"
    shutil.copytree(LIB, lib, ignore=shutil.ignore_patterns("__pycache__"))
    teacher_dir, out = tmp_path / "teacher", tmp_path / "students"
    teacher_dir.mkdir()
    (teacher_dir / "weights.safetensors").write_bytes(b"teacher v1")
    out.mkdir()
    params = {"module_steps": 150}
    assert distill.prepare_dir(out, params, teacher_dir, library=lib).startswith("starting clean")
    (out / "E1-1.safetensors").write_bytes(b"a finished module")
    assert distill.prepare_dir(out, params, teacher_dir, library=lib).startswith("resuming: 1 modules")
    with open(lib / "distill.py", "a") as f:
        f.write("\n# a code change\n")
    assert distill.prepare_dir(out, params, teacher_dir, library=lib).startswith("starting clean")
    assert not (out / "E1-1.safetensors").exists()
    (out / "E1-1.safetensors").write_bytes(b"a finished module")
    (teacher_dir / "weights.safetensors").write_bytes(b"teacher v2")
    assert distill.prepare_dir(out, params, teacher_dir, library=lib).startswith("starting clean")
    assert distill.prepare_dir(out, {"module_steps": 151}, teacher_dir, library=lib).startswith("starting clean")
