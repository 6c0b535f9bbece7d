"""Run one stage of the study: check params.yaml, then execute the stage's notebook with papermill.

    python -m nanosd_lib.run train_teacher      # what dvc.yaml calls
    python -m nanosd_lib.run --check            # only validate params.yaml

The notebook receives exactly the params that dvc.yaml lists for its stage (so a key the notebook
reads but DVC does not track cannot slip through), plus `output_root='.'`. The executed notebook goes
to `reports/` only when it finishes; a failed run leaves `reports/<name>.failed.ipynb` instead.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from . import config
from .outputs import repo_root


def stage_params(dvc_yaml: Path, stage: str, params: config.Params) -> dict[str, dict]:
    """The params sections (restricted to the keys dvc.yaml lists) that `stage` receives."""
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    if stage not in stages:
        raise SystemExit(f"unknown stage {stage!r}; dvc.yaml has {sorted(stages)}")
    chosen: dict[str, dict] = {}
    for entry in stages[stage].get("params", []):
        for key in ([entry] if isinstance(entry, str) else list(entry.values())[0]):
            section, _, name = key.partition(".")
            values = params[section].as_dict()
            chosen.setdefault(section, {}).update({name: values[name]} if name else values)
    return chosen


def notebook_for(root: Path, stage: str) -> Path:
    found = sorted((root / "notebooks").glob(f"[0-9][0-9]_{stage}.ipynb"))
    if len(found) != 1:
        raise SystemExit(f"expected one notebooks/NN_{stage}.ipynb, found {[p.name for p in found]}")
    return found[0]


def run(stage: str, root: Path) -> Path:
    import os

    import nbformat
    import papermill

    params = config.load(root / "params.yaml")  # every section, before any work
    inject = stage_params(root / "dvc.yaml", stage, params)
    notebook = notebook_for(root, stage).relative_to(root)
    report = Path("reports") / notebook.name
    partial = report.with_suffix(".failed.ipynb")
    os.chdir(root)  # relative paths: the executed notebook records no machine's folders
    report.parent.mkdir(exist_ok=True)
    papermill.execute_notebook(str(notebook), str(partial), parameters={**inject, "output_root": "."},
                               kernel_name="python3", progress_bar=True, report_mode=False,
                               log_output=False)
    executed = nbformat.read(partial, as_version=4)
    executed.metadata["papermill"]["output_path"] = str(report)
    nbformat.write(executed, report)
    partial.unlink()
    return root / report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanosd_lib.run", description=__doc__.split("\n")[0])
    parser.add_argument("stage", nargs="?", help="a stage name from dvc.yaml")
    parser.add_argument("--check", action="store_true", help="validate params.yaml and stop")
    args = parser.parse_args(argv)
    root = repo_root()
    try:
        if args.check or not args.stage:
            config.load(root / "params.yaml")
            print("params.yaml: ok")
            return 0
        print(f"{args.stage}: wrote {run(args.stage, root).relative_to(root)}")
        return 0
    except config.ParamsError as err:
        print(f"params.yaml: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
