"""`make nbval` runs the notebooks in one kernel (tests/nbval_one_kernel.py): each must still start empty."""
from __future__ import annotations

import subprocess
import sys

import nbformat

from conftest import ROOT


def _notebook(path, *cells):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_the_second_notebook_shares_the_kernel_but_sees_nothing_of_the_first(tmp_path):
    pid = tmp_path / "pid.txt"
    (tmp_path / "sub").mkdir()
    _notebook(tmp_path / "a.ipynb",
              f"import os, nanosd_lib.space\nopen({str(pid)!r}, 'w').write(str(os.getpid()))",
              "leak = 1\nnanosd_lib.space.MARK = 1\nos.chdir('sub')")
    _notebook(tmp_path / "b.ipynb",
              f"import os\nassert open({str(pid)!r}).read() == str(os.getpid()), 'a fresh kernel: not shared'",
              "assert 'leak' not in dir() and 'nanosd_lib' not in dir()",
              "import nanosd_lib.space\nassert not hasattr(nanosd_lib.space, 'MARK')",
              f"assert os.getcwd() == {str(tmp_path)!r}")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider",
                          "-p", "tests.nbval_one_kernel", str(tmp_path / "a.ipynb"), str(tmp_path / "b.ipynb")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "6 passed" in run.stdout
