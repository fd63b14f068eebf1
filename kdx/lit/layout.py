"""Trainer options every kdx LightningModule honours itself: NHWC memory layout and torch.compile.

`trainer.channels_last` and `trainer.compile` are kdx's keys (not pl.Trainer's); the task sets them on the module
it builds (kdx.tasks.Task.create), whatever the task, and this mixin applies them at the start of fit.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class LayoutMixin:
    """`channels_last`: the networks and every 4-d image tensor of a batch in NHWC; `compile_networks`: the
    module's networks (`compiled_networks()`) compiled in place at the start of fit (names and hooks unchanged)."""

    channels_last = False  # set True to train in NHWC layout (faster convolutions on GPUs with tensor cores)
    compile_networks = False  # set True to torch.compile the networks in place at the start of fit (trainer.compile)

    def compiled_networks(self) -> list[nn.Module]:
        """The torch networks `trainer.compile` compiles: the trained network and a registered `teacher` (the probe's
        feature extractor); distillation hosts add their torch teacher (kdx.lit.distill)."""
        teacher = self._modules.get("teacher")  # a host trained on a frozen teacher's features (the probe's)
        return [n for n in (getattr(self, "net", None), teacher) if isinstance(n, nn.Module)]

    def on_fit_start(self) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if self.compile_networks:  # in place: parameter names, checkpoints and layer taps stay as they are
            for net in self.compiled_networks():
                net.compile()
        super().on_fit_start()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not self.channels_last:
            return batch
        if isinstance(batch, dict):  # a training record (kdx.data.batch): every image tensor in NHWC
            return {k: v.contiguous(memory_format=torch.channels_last) if k.endswith("images") and v.ndim == 4 else v
                    for k, v in batch.items()}
        if isinstance(batch, (tuple, list)) and isinstance(batch[0], torch.Tensor) and batch[0].ndim == 4:
            batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
        return batch
