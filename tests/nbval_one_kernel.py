"""pytest plugin for `make nbval`: the notebooks share one kernel, emptied before each notebook.

nbval starts a kernel per notebook, and each of ours first imports torch, diffusers and the plotting stack:
about 10 s of a slow 2-core CPU, ten times over. Here the first notebook's kernel stays up; before each
later notebook it is emptied the way a restart would leave the notebook's view of it:
- `%reset -f` clears every name the notebook could see, so a cell that uses what it did not define or import
  still fails;
- the study's own modules (`nanosd_lib`) are dropped from `sys.modules`, so that their module-level state
  (such as the feature network cache) starts again; third-party modules stay imported, which is the saving;
- figures are closed, and the working directory goes back to the notebook's folder.
torch's thread count and seeds are set by each notebook's `run.start`. A kernel that died or timed out is
replaced by a fresh one. The pipeline (`dvc repro`, papermill) always gives each notebook its own kernel.
"""
from __future__ import annotations

import nbval.plugin
from nbval.kernel import RunningKernel

EMPTY = """\
import os as _os, sys as _sys
for _m in [m for m in _sys.modules if m == "nanosd_lib" or m.startswith("nanosd_lib.")]:
    del _sys.modules[_m]
if "matplotlib.pyplot" in _sys.modules:
    _sys.modules["matplotlib.pyplot"].close("all")
_os.chdir({cwd!r})
%reset -f
"""  # one reset, last: it also clears the helper names above
_shared: RunningKernel | None = None


def _setup(self):
    global _shared
    cwd = str(self.fspath.dirname)
    if _shared is not None and _shared.is_alive():
        msg_id = _shared.execute_cell_input(EMPTY.format(cwd=cwd), allow_stdin=False)
        while (reply := _shared.get_message("shell", timeout=60))["parent_header"].get("msg_id") != msg_id:
            pass
        _shared.await_idle(msg_id, timeout=60)
        if reply["content"]["status"] != "ok":
            content = reply["content"]
            raise RuntimeError(f"emptying the shared kernel before {self.fspath.basename} failed: "
                               f"{content.get('ename')}: {content.get('evalue')}")
        self.kernel = _shared
        self.setup_sanitize_files()
    else:
        _original_setup(self)
        _shared = self.kernel


def _teardown(self):
    """The kernel stays up for the next notebook (if nbval stopped it on a timeout, that one starts anew)."""


_original_setup = nbval.plugin.IPyNbFile.setup


def pytest_configure(config):
    nbval.plugin.IPyNbFile.setup = _setup
    nbval.plugin.IPyNbFile.teardown = _teardown


def pytest_sessionfinish(session):
    global _shared
    if _shared is not None and _shared.is_alive():
        _shared.stop()
    _shared = None
