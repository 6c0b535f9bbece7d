"""One small recorder: forward hooks keyed by module name that keep what a module saw and returned."""
from __future__ import annotations

import torch
from torch import nn


def _detach(x):
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    if isinstance(x, dict):
        return {k: _detach(v) for k, v in x.items()}
    return x


class Recorder:
    """`with Recorder(model, names) as rec: model(...)`; then `rec.calls[name]` lists
    `(args, kwargs, output)` for every call of that submodule, detached from the graph unless
    `detach=False` (feature distillation needs the student's features with their gradients)."""

    def __init__(self, model: nn.Module, names: list[str], detach: bool = True):
        self.model, self.names, self.detach = model, list(names), detach
        self.calls: dict[str, list[tuple]] = {n: [] for n in self.names}
        self._handles = []

    def __enter__(self) -> "Recorder":
        for name in self.names:
            def hook(module, args, kwargs, output, name=name):
                keep = _detach if self.detach else (lambda x: x)
                self.calls[name].append((keep(args), keep(kwargs), keep(output)))
            self._handles.append(self.model.get_submodule(name).register_forward_hook(
                hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
