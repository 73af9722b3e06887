"""What :class:`~optim_callbacks.callbacks.optimizer_switch.OptimizerSwitch` refuses, and when.

Its arguments are checked when the callback is built (:func:`check_switch_arguments`); the
Trainer, the source optimizer and its LR scheduler in ``on_fit_start``, before the first step
(:func:`check_trainer`, :func:`check_source_optimizer`, :func:`check_lr_scheduler`). Each check
raises one ``ValueError`` that names the parameter, what it got and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from optim_callbacks.optimizers import OPTIMIZERS, OptimizerSpec, spec_for
from optim_callbacks.validation import (
    check_at_least,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
)

__all__ = [
    "GRANULARITIES",
    "MOMENTUM_INITS",
    "TARGET_MOMENTUM",
    "check_adam_family",
    "check_lr_scheduler",
    "check_source_optimizer",
    "check_switch_arguments",
    "check_trainer",
    "fraction_to_step",
]

# The SGD flavours of the optimizer registry a switch may go to, with their default momentum.
TARGET_MOMENTUM = {"sgd": 0.0, "momentum": 0.9, "nesterov": 0.9}
GRANULARITIES = ("group", "layer")
MOMENTUM_INITS = ("zero", "adam")


def check_switch_arguments(switch: Any, momentum: float | None) -> float:
    """Check the arguments of ``OptimizerSwitch(...)``: ``switch`` is the callback being built,
    its other arguments already set as attributes of the same names. Return the momentum
    (``to``'s default when it is ``None``)."""
    check_choice("to", switch.to, TARGET_MOMENTUM)
    when = ("at_step", "at_epoch", "at_fraction")
    given = {k: getattr(switch, k) for k in when if getattr(switch, k) is not None}
    if len(given) > 1:
        listing = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(
            f"at_step/at_epoch/at_fraction: got {listing}; allowed: at most one of them "
            "(none: switch automatically by the SWATS criterion)"
        )
    if switch.at_step is not None:
        check_at_least("at_step", switch.at_step, 1)
    if switch.at_epoch is not None:
        check_at_least("at_epoch", switch.at_epoch, 1)
    if switch.at_fraction is not None:
        check_in_range("at_fraction", switch.at_fraction, 0.0, 1.0, low_inclusive=False)
    if switch.lr is not None:
        check_positive("lr", switch.lr)
    momentum = TARGET_MOMENTUM[switch.to] if momentum is None else momentum
    check_in_range("momentum", momentum, 0.0, 1.0)
    if switch.to == "nesterov" and momentum == 0:
        raise ValueError(
            "momentum: got 0 with to='nesterov'; allowed: a number in (0, 1) for Nesterov momentum"
        )
    if switch.weight_decay is not None:
        check_non_negative("weight_decay", switch.weight_decay)
    check_choice("momentum_init", switch.momentum_init, MOMENTUM_INITS)
    if switch.momentum_init == "adam" and momentum == 0:
        raise ValueError(
            "momentum_init: got 'adam' with momentum=0; allowed: 'zero' (plain SGD keeps no buffer)"
        )
    check_choice("granularity", switch.granularity, GRANULARITIES)
    check_positive("epsilon", switch.epsilon)
    check_at_least("min_steps", switch.min_steps, 1)
    if switch.beta2 is not None:
        check_in_range("beta2", switch.beta2, 0.0, 1.0)
    check_positive("estimated_lr_scale", switch.estimated_lr_scale)
    return float(momentum)


def check_trainer(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optimizer:
    """Automatic optimization with exactly one optimizer; return that optimizer."""
    if not pl_module.automatic_optimization:
        raise ValueError(
            "automatic_optimization: got False; allowed: True (OptimizerSwitch steers Lightning's optimizer loop)"
        )
    if len(trainer.optimizers) != 1:
        raise ValueError(
            f"optimizers: got {len(trainer.optimizers)}; allowed: exactly one optimizer to switch"
        )
    return trainer.optimizers[0]


def swats_sources() -> list[str]:
    """Registry entries SWATS is defined for: Adam's bias-corrected moments and ``betas``."""
    return sorted(name for name, s in OPTIMIZERS.items() if _is_adam_like(s))


def _is_adam_like(spec: OptimizerSpec) -> bool:
    return (
        spec.adaptive and spec.has_betas and spec.bias_corrected and spec.first_moment is not None
    )


def check_source_optimizer(
    optimizer: Optimizer, *, momentum_init: str, estimates_lr: bool = True
) -> OptimizerSpec:
    """The source is a registry optimizer (any entry for a scheduled switch with a given
    ``lr``; an adaptive one when the SGD LR is estimated from its steps, which needs a second
    moment), with a first moment when the SGD buffer starts from it; return its entry."""
    spec = spec_for(optimizer)
    adaptive = sorted(name for name, s in OPTIMIZERS.items() if s.adaptive)
    if spec is None:
        raise ValueError(
            f"optimizer: got {type(optimizer).__name__}, which the optimizer registry does not know; "
            f"allowed: a registry optimizer ({', '.join(OPTIMIZERS.names())}) or one registered "
            "with register_optimizer(...)"
        )
    if estimates_lr and not spec.adaptive:
        raise ValueError(
            f"optimizer: got {spec.name!r} ({type(optimizer).__name__}), which keeps no adaptive "
            "second moment to estimate the SGD learning rate from; allowed: "
            f"{', '.join(adaptive)}, or any registry optimizer with a given lr=... and a "
            "scheduled switch (at_step, at_epoch or at_fraction)"
        )
    if momentum_init == "adam" and spec.first_moment is None:
        raise ValueError(
            f"momentum_init: got 'adam' but optimizer {spec.name!r} keeps no first moment; allowed: 'zero'"
        )
    return spec


def check_adam_family(spec: OptimizerSpec) -> None:
    """``AdamToSGD``'s narrower source: where SWATS is defined, Adam's bias-corrected first
    and second moments with ``betas`` (Keskar & Socher 2017)."""
    if not _is_adam_like(spec):
        raise ValueError(
            f"optimizer: got {spec.name!r}; allowed for AdamToSGD: {', '.join(swats_sources())} "
            "(SWATS is defined for Adam's bias-corrected moments; use OptimizerSwitch with "
            "lr=... to switch from another optimizer)"
        )


def check_lr_scheduler(trainer: pl.Trainer, optimizer: Optimizer) -> Any:
    """At most one scheduler on ``optimizer``, a ``LambdaLR`` (whose multiplier the switch
    continues on SGD); return its Lightning config, or ``None`` without a scheduler."""
    configs = [c for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
    if len(configs) > 1:
        raise ValueError(
            f"lr_scheduler: got {len(configs)} schedulers on the optimizer; allowed: at most one"
        )
    if not configs:
        return None
    if type(configs[0].scheduler) is not LambdaLR:
        raise ValueError(
            f"lr_scheduler: got {type(configs[0].scheduler).__name__}; allowed: LambdaLR (build_scheduler), "
            "whose multiplier OptimizerSwitch continues on SGD, or no scheduler"
        )
    return configs[0]


def fraction_to_step(at_fraction: float, trainer: pl.Trainer) -> int:
    """The optimizer step ``at_fraction`` of training stands for (training must be bounded)."""
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            f"at_fraction: got {at_fraction!r} but the training length is unbounded; "
            "allowed: set max_steps or max_epochs, or use at_step/at_epoch"
        )
    return max(1, round(at_fraction * int(total)))
