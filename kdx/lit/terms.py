"""Logging of named loss terms, shared by every kdx LightningModule."""
from __future__ import annotations

import torch


class LossTermsMixin:
    """`log_terms(terms, batch_size)`: log each weighted term as train/loss_<name> and return their sum."""

    def log_terms(self, terms: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        """Sum the (already weighted) terms, log each as train/loss_<name> and the total as train/loss."""
        total = sum(terms.values())
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        # sync_dist: the epoch mean of train/loss is over every rank's batches under DDP (a scalar all-reduce)
        self.log("train/loss", total.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=True)
        return total
