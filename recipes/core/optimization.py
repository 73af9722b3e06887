"""The optimizer settings of a recipe as one object: which optimizer and schedule, and how.

:class:`OptimizerSettings` travels from the command line (``--optimizer --scheduler --lr
--weight_decay --warmup`` and ``--model.optimization.*``) through the recipe's module into
``configure_optimizers``. Its checks are the registry entries' own
(:meth:`optim_callbacks.OptimizerSpec.check_options`,
:meth:`optim_callbacks.ScheduleSpec.check_options`), made when the settings are created, so a
bad value is reported before any data is read or any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from optim_callbacks import (
    OPTIMIZERS,
    SCHEDULE_FREE,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    lightning_scheduler_config,
)

__all__ = ["TOP_LEVEL_FLAGS", "OptimizerSettings"]

# The settings the recipes' command line offers as top-level flags (--optimizer adamw).
TOP_LEVEL_FLAGS = ("optimizer", "scheduler", "lr", "weight_decay", "warmup")


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer, schedule and their options.

    Args:
        optimizer: a name from ``optim_callbacks.OPTIMIZERS`` (``python -m optim_callbacks list``).
        scheduler: a name from ``optim_callbacks.SCHEDULES``; ``constant`` for none.
        lr: peak learning rate (``None``: the optimizer entry's default).
        weight_decay: decoupled or L2 decay as the optimizer defines it (``None``: the entry's
            default); never applied to biases and normalization weights.
        warmup: linear warmup, in steps (an int) or as a fraction of all steps (a float).
        layer_decay: layer-wise LR decay factor (ELECTRA/BEiT): layer ``i`` of ``L`` gets
            ``lr * layer_decay ** (L + 1 - i)``; ``None`` for the same LR everywhere.
        optimizer_options: more keyword arguments of the torch optimizer (``betas``, ``eps``, ...).
        scheduler_options: options of the schedule (``min_lr_ratio``, ``step_size_epochs``, ...).
    """

    optimizer: str = "adamw"
    scheduler: str = "cosine"
    lr: float | None = None
    weight_decay: float | None = None
    warmup: int | float = 0.06
    layer_decay: float | None = None
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    scheduler_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # None from a YAML ``optimizer_options: null`` means no options.
        object.__setattr__(self, "optimizer_options", dict(self.optimizer_options or {}))
        object.__setattr__(self, "scheduler_options", dict(self.scheduler_options or {}))
        self.check()

    def check(self) -> None:
        """Everything that can be checked before training starts, by the registry entries
        (one ``ValueError`` naming the parameter, the value, what is allowed, the closest name)."""
        OPTIMIZERS.get(self.optimizer).check_options(
            lr=self.lr,
            weight_decay=self.weight_decay,
            layer_decay=self.layer_decay,
            **self.optimizer_options,
        )
        SCHEDULES.get(self.scheduler).check_options(warmup=self.warmup, **self.scheduler_options)
        optimizer = OPTIMIZERS.canonical(self.optimizer)
        if optimizer in SCHEDULE_FREE and SCHEDULES.canonical(self.scheduler) != "constant":
            raise ValueError(
                f"scheduler: got {self.scheduler!r} with the schedule-free optimizer "
                f"{optimizer!r}; allowed: 'constant' (a schedule-free optimizer replaces the "
                "schedule; --warmup still applies)"
            )

    @property
    def schedule_free(self) -> bool:
        """Whether the optimizer needs train/eval switching (:class:`ScheduleFreeModes`)."""
        return OPTIMIZERS.canonical(self.optimizer) in SCHEDULE_FREE

    def replace(self, **changes: Any) -> OptimizerSettings:
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    def default_lr(self) -> float:
        """``lr``, or the optimizer entry's default learning rate when ``lr`` is ``None``."""
        return (
            self.lr if self.lr is not None else float(OPTIMIZERS.get(self.optimizer).defaults["lr"])
        )

    def configure(
        self,
        model: nn.Module,
        *,
        total_steps: int,
        steps_per_epoch: int | None = None,
        lr: float | None = None,
    ) -> dict[str, Any]:
        """What ``configure_optimizers`` returns: the registry optimizer over ``model``'s
        parameter groups and its per-step schedule over ``total_steps`` optimizer steps;
        ``lr`` replaces the peak learning rate (e.g. one scaled to the global batch)."""
        optimizer = build_optimizer(
            self.optimizer,
            model,
            lr=self.lr if lr is None else lr,
            weight_decay=self.weight_decay,
            layer_decay=self.layer_decay,
            **self.optimizer_options,
        )
        scheduler = build_scheduler(
            self.scheduler,
            optimizer,
            total_steps=total_steps,
            warmup=self.warmup,
            steps_per_epoch=steps_per_epoch,
            **self.scheduler_options,
        )
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler_config(scheduler)}
