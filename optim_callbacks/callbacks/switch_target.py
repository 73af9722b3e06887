"""The SGD optimizer an :class:`~optim_callbacks.callbacks.optimizer_switch.OptimizerSwitch`
switches to: its parameter groups, its base learning rates and its momentum buffer.

Nothing here touches the Trainer (:mod:`~optim_callbacks.callbacks.optimizer_swap` puts the
result in place).

- Units (:func:`switch_units`): the parameters SWATS measures together, a source group or (per
  layer) one parameter tensor; with estimated LRs each unit becomes one SGD group.
- Base LRs: a given ``lr`` keeps the source groups' ratios (:func:`given_lr_bases`); an
  estimate converts each unit's source base LR by ``Lambda / lr_used``
  (:func:`estimated_lr_conversions`), ``lr_used`` being the LR of the step the estimate was
  measured on (the estimate is proportional to it).
- :func:`build_sgd`: the SGD groups keep each source group's extra keys (``name``,
  ``lr_scale``, ...) and its no-decay split; ``initial_lr`` is the base the schedule multiplies.
- :func:`momentum_from_first_moment`: the buffer from Adam's bias-corrected first moment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim import Optimizer

from optim_callbacks.callbacks.swats import SwatsStatistics
from optim_callbacks.optimizers import OptimizerSpec, build_optimizer

__all__ = [
    "DEFAULT_BETA2",
    "SwitchUnit",
    "beta2_of",
    "build_sgd",
    "estimated_lr_conversions",
    "given_lr_bases",
    "momentum_from_first_moment",
    "source_base_lrs",
    "switch_units",
]

DEFAULT_BETA2 = 0.999


class SwitchUnit(NamedTuple):
    """Parameters measured together by SWATS and, when LRs are estimated, one SGD group."""

    group_index: int
    params: list[torch.Tensor]
    label: str | None  # parameter name in per-layer mode


def switch_units(source: Optimizer, *, per_tensor: bool, names: dict[int, str]) -> list[SwitchUnit]:
    """One unit per source group, or (``per_tensor``) per parameter tensor, labelled with its
    name from ``names`` (``id(param) -> name``; ``param<i>`` for one not in it)."""
    units = []
    for index, group in enumerate(source.param_groups):
        params = list(group["params"])
        if not per_tensor:
            units.append(SwitchUnit(index, params, None))
            continue
        for position, param in enumerate(params):
            units.append(SwitchUnit(index, [param], names.get(id(param), f"param{position}")))
    return units


def beta2_of(group: dict[str, Any], beta2: float | None) -> float:
    """The decay of the SWATS average for a source group: ``beta2`` if given, else the group's
    ``betas[1]``, else its ``alpha`` or ``rho``, else :data:`DEFAULT_BETA2`."""
    if beta2 is not None:
        return beta2
    if "betas" in group:
        return float(group["betas"][1])
    for key in ("alpha", "rho"):
        if key in group:
            return float(group[key])
    return DEFAULT_BETA2


def source_base_lrs(source: Optimizer, layout: Sequence[SwitchUnit]) -> list[float]:
    """Per unit, its source group's base LR (what the schedule multiplies: ``initial_lr``)."""
    bases = []
    for unit in layout:
        group = source.param_groups[unit.group_index]
        bases.append(float(group.get("initial_lr", group["lr"])))
    return bases


def given_lr_bases(lr: float, source: Optimizer, layout: Sequence[SwitchUnit]) -> list[float]:
    """SGD base LRs for a given ``lr``: ``lr * base_i / source_lr``, so per-group ratios such as
    ``lr_scale`` are kept (``source_lr`` is the LR the source optimizer was built with)."""
    reference = float(source.defaults["lr"])
    return [lr * base / reference for base in source_base_lrs(source, layout)]


def estimated_lr_conversions(
    statistics: SwatsStatistics, scale: float
) -> tuple[list[float], list[float]]:
    """Per unit: the SWATS learning rate (times ``scale``; NaN without a usable estimate) and its
    ratio to the LR the source used when it was measured, the factor that converts the source's
    base LR into SGD's. A unit without a usable estimate (no measured step) gets the mean
    conversion of the others, or 1 (the source's LR) when none has one; that is warned about."""
    estimates: list[float | None] = []
    conversions: list[float | None] = []
    for unit in range(len(statistics)):
        if statistics.latched[unit]:
            estimate, lr_used = statistics.latched_estimate[unit], statistics.latched_lr[unit]
        else:
            estimate, lr_used = statistics.estimate(unit), statistics.last_lr[unit]
        if estimate is None or estimate <= 0 or not lr_used:
            estimates.append(None)
            conversions.append(None)
            continue
        estimate *= scale
        estimates.append(estimate)
        conversions.append(estimate / lr_used)
    known = [c for c in conversions if c is not None]
    if len(known) < len(conversions):
        fallback = sum(known) / len(known) if known else 1.0
        rank_zero_warn(
            "OptimizerSwitch: no usable SWATS estimate for some parameters (no measured step); they "
            + ("get the mean conversion of the others" if known else "keep Adam's learning rate")
        )
        conversions = [fallback if c is None else c for c in conversions]
    return [math.nan if e is None else e for e in estimates], [float(c) for c in conversions]


def build_sgd(
    source: Optimizer,
    layout: Sequence[SwitchUnit],
    base_lrs: Sequence[float],
    *,
    to: str,
    momentum: float,
    nesterov: bool,
    weight_decay: float | None,
) -> Optimizer:
    """The registry's ``to`` optimizer with one group per unit of ``layout`` at ``base_lrs``.

    Each group keeps its source group's extra keys (``name``, ``lr_scale``, ...); per-layer
    units are named ``<group name>.<parameter name>``. ``weight_decay`` ``None`` keeps each
    source group's decay; a number replaces it in the groups that decay (no-decay groups stay at
    0), with a warning when the source decays none.
    """
    decaying = [float(g.get("weight_decay", 0.0)) > 0 for g in source.param_groups]
    if weight_decay is not None and weight_decay > 0 and not any(decaying):
        rank_zero_warn(
            f"OptimizerSwitch: weight_decay={weight_decay:g} has no group to apply to: the source "
            "optimizer decays none (build it with weight_decay > 0 to get decay/no-decay groups)"
        )
    own_keys = set(source.defaults) | {"params", "initial_lr", "lr", "weight_decay"}
    groups = []
    for unit, base in zip(layout, base_lrs, strict=True):
        original = source.param_groups[unit.group_index]
        group = {k: v for k, v in original.items() if k not in own_keys}  # name, lr_scale, ...
        decay = float(original.get("weight_decay", 0.0))
        if weight_decay is not None:
            decay = weight_decay if decaying[unit.group_index] else 0.0
        group.update(params=unit.params, lr=base, weight_decay=decay)
        if unit.label is not None:
            group["name"] = f"{original.get('name', f'pg{unit.group_index + 1}')}.{unit.label}"
        groups.append(group)
    sgd = build_optimizer(to, groups, lr=max(base_lrs), momentum=momentum, nesterov=nesterov)
    for group, base in zip(sgd.param_groups, base_lrs, strict=True):
        group["initial_lr"] = base
    return sgd


@torch.no_grad()
def momentum_from_first_moment(
    source: Optimizer, sgd: Optimizer, spec: OptimizerSpec, momentum: float
) -> None:
    """``b = m / (1 - beta1 ** t) / (1 - momentum)``: Adam's bias-corrected first moment (an
    average of gradients) scaled to the heavy-ball buffer's steady state ``g / (1 - momentum)``."""
    assert spec.first_moment is not None
    beta1_of = {id(p): float(g["betas"][0]) for g in source.param_groups for p in g["params"]}
    for group in sgd.param_groups:
        for param in group["params"]:
            state = source.state.get(param, {})
            if spec.first_moment not in state:
                continue
            steps = float(state.get("step", 1))
            correction = 1.0 - beta1_of[id(param)] ** steps
            buffer = state[spec.first_moment].detach().clone().div_(correction * (1.0 - momentum))
            sgd.state[param]["momentum_buffer"] = buffer
