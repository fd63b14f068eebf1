"""Read a network's intermediate outputs by module path with forward hooks, without editing the network."""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from kdx.errors import ConfigError


def resolve_layer(model: nn.Module, path: str, role: str = "student") -> nn.Module:
    """The submodule at `path`, or a ConfigError naming the nearest module paths of `model`."""
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        if not close:  # a prefix is a better hint than nothing ('layer' -> layer1, layer2, ...)
            close = [n for n in names if n.startswith(path.split(".")[0])][:5]
        hint = f"; nearest names: {', '.join(close)}" if close else f"; its top-level modules: " \
            f"{', '.join(n for n, _ in model.named_children())}"
        raise ConfigError(f"{role} layer {path!r} is not a module of {type(model).__name__}{hint}") from None


class LayerTaps:
    """Persistent forward hooks: after each forward, `taps.outputs[path]` holds that module's output.

    `input_paths` are tapped on their input instead (the features entering a classifier, say).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str] = (), input_paths: Iterable[str] = (),
                 role: str = "student") -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.active = False  # hooks record only inside `recording()`: validation passes keep nothing
        self._handles = []
        for path in dict.fromkeys(paths):
            module = resolve_layer(model, path, role)
            self._handles.append(module.register_forward_hook(self._keep_output(path)))
        for path in dict.fromkeys(input_paths):
            module = resolve_layer(model, path, role)
            self._handles.append(module.register_forward_hook(self._keep_input(path)))

    def _keep_output(self, path: str):
        def hook(_module, _args, output):
            if self.active:
                self.outputs[path] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _keep_input(self, path: str):
        def hook(_module, args, _output):
            if self.active:
                self.inputs[path] = args[0]
        return hook

    @contextmanager
    def recording(self) -> Iterator["LayerTaps"]:
        """Within the block the hooks keep what they see (cleared on entry)."""
        self.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def clear(self) -> None:
        """Forget the last forward pass's tensors (frees their memory)."""
        self.outputs.clear()
        self.inputs.clear()

    def remove(self) -> None:
        """Detach every hook from the network."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __len__(self) -> int:
        return len(self._handles)
