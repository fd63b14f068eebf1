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


class _Keep:
    """A forward hook that stores a module's output (or first input) under its path while its taps record."""

    def __init__(self, store: dict, taps: "LayerTaps", path: str, what: str) -> None:
        self.store, self.taps, self.path, self.what = store, taps, path, what

    def __call__(self, _module, args, output) -> None:
        if self.taps.active:
            value = args[0] if self.what == "input" else output
            value = value[0] if isinstance(value, (tuple, list)) else value
            self.store[self.path] = value
            self.taps.versions[(self.what, self.path)] = getattr(value, "_version", 0)


class LayerTaps:
    """Persistent forward hooks: after each forward, `taps.outputs[path]` holds that module's output.

    `input_paths` are tapped on their input instead (the features entering a classifier, say).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str] = (), input_paths: Iterable[str] = (),
                 role: str = "student") -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.inputs: dict[str, torch.Tensor] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.active = False  # hooks record only inside `recording()`: validation passes keep nothing
        self.role = role
        self._handles = []
        for path in dict.fromkeys(paths):
            module = resolve_layer(model, path, role)
            self._handles.append(module.register_forward_hook(_Keep(self.outputs, self, path, "output")))
        for path in dict.fromkeys(input_paths):
            module = resolve_layer(model, path, role)
            self._handles.append(module.register_forward_hook(_Keep(self.inputs, self, path, "input")))

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
        self.versions.clear()

    def take(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(outputs, inputs) of the last recorded pass, checked unchanged since the hooks saw them; then clear.

        A tensor that a later in-place operation (an inplace ReLU, say) overwrote would silently feed the
        loss wrong values, so that is an error naming the layer.
        """
        for (what, path), version in self.versions.items():
            value = (self.outputs if what == "output" else self.inputs).get(path)
            if isinstance(value, torch.Tensor) and value._version != version:
                raise ConfigError(f"the {what} of {self.role} layer {path!r} was modified in place after it was "
                                  f"read (e.g. by an inplace ReLU that follows it); tap the next module instead")
        outputs, inputs = dict(self.outputs), dict(self.inputs)
        self.clear()
        return outputs, inputs

    def remove(self) -> None:
        """Detach every hook from the network."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()

    def __len__(self) -> int:
        return len(self._handles)
