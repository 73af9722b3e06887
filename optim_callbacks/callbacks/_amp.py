"""Unscaled gradients for callbacks that read them before (or after) an optimizer step.

Under ``16-mixed`` Lightning unscales gradients before ``on_before_optimizer_step``, except for
optimizers that unscale inside their own step (torch's ``fused=True`` kernels, which the
registry picks where torch supports them): their ``.grad`` still holds ``loss_scale * g``, and
the fused kernel divides by the scale internally without writing the result back. A callback
that reads gradients calls :func:`unscale_gradients` first; the scaler then hands the fused step
``found_inf`` and no scale, so the update is unchanged. Calling it twice in one step is safe.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

from optim_callbacks import _compat

__all__ = ["active_grad_scaler", "unscale_gradients"]


def active_grad_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled ``GradScaler``, or ``None`` (no fp16 AMP)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def unscale_gradients(trainer: pl.Trainer, optimizer: Optimizer) -> None:
    """Make sure ``optimizer``'s gradients are unscaled (idempotent within a step)."""
    scaler = active_grad_scaler(trainer)
    if scaler is None or not _compat.step_unscales_gradients(optimizer):
        return
    _compat.unscale_once(scaler, optimizer)
