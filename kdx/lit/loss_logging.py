"""Logging of named loss terms, shared by every kdx LightningModule, and the check that they stay finite."""
from __future__ import annotations

import torch

from kdx.errors import NonFiniteError

SETTLE_EVERY = 50  # on accelerators, finiteness is read back every this many steps (not a sync per step)


class LossTermsMixin:
    """`log_terms(terms, batch_size, raw)`: log each weighted term as train/loss_<name> (what it adds to
    train/loss), each raw term (before alpha and weights) as train/raw_<name>, and return the weighted sum.

    A NaN or infinite loss stops the run with a NonFiniteError naming the term and the step, before the
    optimizer applies it.
    """

    def log_terms(self, terms: dict[str, torch.Tensor], batch_size: int,
                  raw: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Sum the (already weighted) terms, log each as train/loss_<name>, the raw ones as train/raw_<name> and
        the total as train/loss."""
        total = sum(terms.values())
        self.check_finite_terms(terms, total)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        for name, value in (raw or {}).items():
            self.log(f"train/raw_{name}", value.detach(), on_step=True, on_epoch=False, batch_size=batch_size)
        # sync_dist: the epoch mean of train/loss is over every rank's batches under DDP (a scalar all-reduce)
        self.log("train/loss", total.detach(), on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size,
                 sync_dist=True)
        return total

    def check_finite_terms(self, terms: dict[str, torch.Tensor], total: torch.Tensor) -> None:
        """Raise NonFiniteError when a term or the total is NaN/inf: at once on the CPU; on an accelerator the
        check is queued (no device sync per step) and settled every SETTLE_EVERY steps and at epoch end."""
        names = [*terms, "total"]
        values = torch.stack([v.detach().float().reshape(-1)[0] if v.numel() == 1 else v.detach().float().sum()
                              for v in (*terms.values(), total)])
        trainer = getattr(self, "_trainer", None)
        where = (int(self.current_epoch) + 1, int(self.global_step)) if trainer is not None else (0, 0)
        pending = self.__dict__.setdefault("_kdx_finite_pending", [])
        pending.append((where, names, values))
        if values.device.type == "cpu" or len(pending) >= SETTLE_EVERY:
            self.settle_finite_checks()

    def settle_finite_checks(self) -> None:
        """Read back the queued finiteness checks; raise NonFiniteError for the first non-finite step."""
        pending = self.__dict__.get("_kdx_finite_pending")
        if not pending:
            return
        self._kdx_finite_pending = []
        finite = torch.stack([torch.isfinite(values).all() for _, _, values in pending]).cpu()
        if bool(finite.all()):
            return
        (epoch, step), names, values = pending[int((~finite).nonzero()[0])]
        values = values.cpu()
        bad = [f"{name} = {float(v)}" for name, v in zip(names, values) if not torch.isfinite(v)]
        shown = ", ".join(bad[:-1] if len(bad) > 1 and bad[-1].startswith("total") else bad)
        raise NonFiniteError(f"the training loss is not finite at epoch {epoch}, step {step} ({shown}); the run stops "
                             f"here and keeps the checkpoints written before; lower optim.lr, check the data, or lower the "
                             f"weight of that term")
