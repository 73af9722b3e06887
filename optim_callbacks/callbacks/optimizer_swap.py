"""Replacing the optimizer of a running Trainer, through the strategy's documented setters.

:func:`replace_optimizer` sets ``trainer.strategy.optimizers`` (whose setter re-wraps each
optimizer in a ``LightningOptimizer``, so ``pl_module.optimizers()`` and the optimizer loop
step the new one) and ``trainer.strategy.lr_scheduler_configs``, with every scheduler of the old
optimizer rebuilt on the new one where it stands, then tells every callback that has
``on_optimizers_changed(trainer, pl_module)``. It is meant to run between optimizer steps
(after ``GradScaler.update()``, whose per-optimizer state is rebuilt for the new optimizer at
its first step), never inside an accumulation window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["keep_lr_series_name", "notify_optimizers_changed", "replace_optimizer"]


def notify_optimizers_changed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The project's interplay protocol: tell every callback that caches per-optimizer
    information that the optimizer(s) were replaced."""
    for callback in trainer.callbacks:
        hook = getattr(callback, "on_optimizers_changed", None)
        if callable(hook):
            hook(trainer, pl_module)


def keep_lr_series_name(config: Any, name: str = "lr") -> None:
    """Give an unnamed scheduler config a fixed ``name``: ``LearningRateMonitor`` names an
    unnamed one after the optimizer class (``lr-Adam`` -> ``lr-SGD``), which would split the
    logged series at the switch."""
    if config is not None and config.name is None:
        config.name = name
        rank_zero_info(
            f"OptimizerSwitch: named the LR scheduler {name!r} so its logged series survives the switch"
        )


def replace_optimizer(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    old: Optimizer,
    new: Optimizer,
    group_sources: Sequence[int],
) -> None:
    """Put ``new`` in the place of ``old`` (the trainer's only optimizer) and continue its
    ``LambdaLR`` schedules on it.

    ``group_sources[i]`` is the group of ``old`` whose multiplier group ``i`` of ``new`` follows;
    ``new``'s groups carry ``initial_lr``, their base LR. Each rebuilt scheduler stands at the old one's step, so the LR of a new group is its base LR
    times ``f(that step)``: a schedule keeps its shape and warmup is not replayed. The configs
    keep every other field (``name``, ``interval``, ...).
    """
    configs = []
    for config in trainer.lr_scheduler_configs:
        if config.scheduler.optimizer is old:
            previous = config.scheduler
            lambdas = [previous.lr_lambdas[index] for index in group_sources]
            # The constructor takes one step: start one behind the old scheduler so both stand
            # at the same step. (On resume the old one is fresh, at 0, and Lightning loads the
            # checkpointed state into the new one next.)
            scheduler = LambdaLR(new, lambdas, last_epoch=previous.last_epoch - 1)
            config = dataclasses.replace(config, scheduler=scheduler)
        configs.append(config)
    trainer.strategy.optimizers = [new]
    trainer.strategy.lr_scheduler_configs = configs
    notify_optimizers_changed(trainer, pl_module)
