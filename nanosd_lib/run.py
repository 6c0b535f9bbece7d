"""Run one stage of the study: check params.yaml, then execute the stage's notebook with papermill.

    python -m nanosd_lib.run train_teacher      # what dvc.yaml calls
    python -m nanosd_lib.run --check            # only validate params.yaml (the check_params stage)

The notebook receives exactly the params that dvc.yaml lists for its stage (so a key the notebook
reads but DVC does not track cannot slip through), plus `output_root='.'`. The executed notebook goes
to `reports/` only when it finishes; a failed run leaves `reports/<name>.failed.ipynb` instead.

Notebooks call `start()` first: it checks their parameters and, opened by hand at the smoke scale,
`require()` builds whatever upstream output they lack by running the upstream stage the same way.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from . import config
from .outputs import Layout, repo_root

CHECKED = Path("data") / "params.checked"  # the check_params stage's output; every stage depends on it


def dvc_stages(root: Path) -> dict:
    return (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})


def stage_params(dvc_yaml: Path, stage: str, params: config.Params) -> dict[str, dict]:
    """The params sections (restricted to the keys dvc.yaml lists) that `stage` receives."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise SystemExit(f"unknown stage {stage!r}; dvc.yaml has {sorted(stages)}")
    chosen: dict[str, dict] = {}
    for entry in stages[stage].get("params", []):
        for key in ([entry] if isinstance(entry, str) else list(entry.values())[0]):
            section, _, name = key.partition(".")
            if section not in params or (name and name not in params[section].as_dict()):
                raise SystemExit(f"dvc.yaml: stage {stage!r} lists param {key!r}, which params.yaml does not have")
            values = params[section].as_dict()
            chosen.setdefault(section, {}).update({name: values[name]} if name else values)
    return chosen


def notebook_for(root: Path, stage: str) -> Path:
    found = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"expected one notebooks/NN_{stage}.ipynb, found {[p.name for p in found]}")
    return found[0]


def execute(notebook: Path, target: Path, parameters: dict, cwd: Path, log: bool = True) -> None:
    """papermill, with cell outputs (progress bars included) echoed to the terminal as they come."""
    import logging

    import papermill

    if log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("papermill").setLevel(logging.INFO)
    papermill.execute_notebook(str(notebook), str(target), parameters=parameters, cwd=str(cwd),
                               kernel_name="python3", progress_bar=False, report_mode=False,
                               log_output=log)


def run(stage: str, root: Path) -> Path:
    import nbformat

    params = config.load(root / "params.yaml")  # every section, before any work
    inject = stage_params(root / "dvc.yaml", stage, params)
    notebook = notebook_for(root, stage).relative_to(root)
    report = Path("reports") / notebook.name
    partial = report.with_suffix(".failed.ipynb")
    (root / report.parent).mkdir(exist_ok=True)
    # relative paths and cwd = root: the executed notebook records no machine's folders
    execute(root / notebook, root / partial, {**inject, "output_root": "."}, root)
    executed = nbformat.read(root / partial, as_version=4)
    executed.metadata["papermill"]["output_path"] = str(report)
    executed.metadata["papermill"]["input_path"] = str(notebook)
    nbformat.write(executed, root / report)
    (root / partial).unlink()
    return root / report


def start(stage: str, output_root: str, **given: dict) -> tuple[config.Params, Layout]:
    """Check a notebook's parameters, fix seeds and threads, and say where its outputs go.

    `output_root="."` means the study's own outputs: the values then come from params.yaml (exactly
    what `dvc repro` injects), so a notebook opened by hand and switched to "." reads what the
    pipeline wrote. Any other root is a scratch study (smoke runs, tests) with the given values.
    """
    root = repo_root()
    layout = Layout(output_root)
    if layout.root.resolve() == root.resolve():
        study = stage_params(root / "dvc.yaml", stage, config.load(root / "params.yaml"))
        differs = sorted(s for s in given if given[s] != study.get(s))
        if differs:
            print(f"output_root '.': using params.yaml's values for {differs} (the study's own outputs)")
        params = config.check(root=root, **study)
    else:
        params = config.check(root=root, **given)
    base = params["base"]
    config.seed_everything(base.seed, base.threads)
    return params, layout


def _shown(path: Path, root: Path) -> str:
    """`path` as a reader should see it: relative to the repository when it lies inside it."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def producer(root: Path, path: str) -> str:
    """The stage whose outputs include `path` (a folder or file under the study root)."""
    for name, stage in dvc_stages(root).items():
        for out in stage.get("outs", []):
            out = out if isinstance(out, str) else next(iter(out))
            if path == out or path.startswith(out.rstrip("/") + "/"):
                return name
    raise KeyError(f"no stage in dvc.yaml outputs {path!r}")


def require(layout: Layout, scale: str, *paths: str) -> None:
    """Make sure upstream outputs exist under `layout.root`.

    In a scratch study at the smoke scale a missing output is built by running its stage at the
    notebook's smoke defaults (which requires its own inputs the same way); anywhere else it is an error
    naming the stage to run.
    """
    root = repo_root()
    for path in paths:
        if (layout.root / path).exists():
            continue
        stage = producer(root, path)
        if scale != "smoke" or layout.root.resolve() == root.resolve():
            raise FileNotFoundError(f"{layout.root / path} is missing: run `dvc repro {stage}` first")
        print(f"{path} is missing in {_shown(layout.root, root)}: building it with stage {stage} at smoke scale")
        if stage == "gather_photos":
            from . import photos

            holdout = yaml.safe_load((root / "params.yaml").read_text())["gather_photos"]["holdout"]
            photos.build(layout.root / "data" / "photos", layout.root / "data" / "archives", holdout)
            continue
        notebook = notebook_for(root, stage)
        target = layout.root / "reports" / notebook.name
        target.parent.mkdir(parents=True, exist_ok=True)
        execute(notebook, target, {"output_root": str(layout.root)}, notebook.parent, log=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanosd_lib.run", description=__doc__.split("\n")[0])
    parser.add_argument("stage", nargs="?", help="a stage name from dvc.yaml")
    parser.add_argument("--check", action="store_true", help="validate params.yaml and stop")
    args = parser.parse_args(argv)
    root = repo_root()
    try:
        if args.check or not args.stage:
            config.load(root / "params.yaml")
            if args.check:  # the check_params stage: a constant stamp, so no stage downstream reruns
                (root / CHECKED).parent.mkdir(exist_ok=True)
                (root / CHECKED).write_text("params.yaml passed nanosd_lib.config's checks\n")
            print("params.yaml: ok")
            return 0
        print(f"{args.stage}: wrote {run(args.stage, root).relative_to(root)}")
        return 0
    except config.ParamsError as err:
        print(f"params.yaml: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
