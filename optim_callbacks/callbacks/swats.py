"""SWATS statistics: when to switch from Adam to SGD, and with which learning rate.

Keskar & Socher 2017, "Improving Generalization Performance by Switching from Adam to SGD"
(arXiv:1712.07628), Algorithm 1. For the optimizer's step ``p_k`` (new minus old parameters)
and the gradient ``g_k`` it was computed from, the SGD learning rate that would have produced
the projection of ``p_k`` onto ``-g_k`` is

    gamma_k = (p_k . p_k) / (-p_k . g_k)

Its exponential average ``lambda_k = beta2 * lambda_{k-1} + (1 - beta2) * gamma_k`` is
bias-corrected as ``Lambda_k = lambda_k / (1 - beta2 ** k)`` (``k`` counts the updates of the
average). The switch criterion is ``|Lambda_k - gamma_k| < epsilon`` (absolute, as in the
paper; its 1e-9 rarely fires at practical LRs, hence configurable), checked once ``k`` reaches
``min_steps``; ``Lambda_k`` then is the SGD learning rate. Steps with ``p_k . g_k == 0`` (a
step the AMP scaler skipped) leave the statistics untouched, as in the paper.

The statistics are kept per *unit*: a parameter group, or a single parameter tensor (per
layer). A unit *latches* the first time its criterion holds with a positive estimate; its
estimate and the learning rate the optimizer used in that step are frozen then. The switch
happens once every unit that has statistics has latched.

``StepTracker`` measures ``p_k . p_k`` and ``-p_k . g_k`` per unit in float64 (one snapshot of
the parameters before the step, one host sync after it; under FSDP2 the snapshot is this rank's
shard and the sums of sharded parameters take one all-reduce); ``SwatsStatistics`` is plain Python
so its state goes into checkpoints as numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from optim_callbacks.sharded import is_sharded, local_part, shard_group, sum_across

__all__ = ["StepTracker", "SwatsStatistics"]


class StepTracker:
    """Per-unit ``(p . p, -p . g)`` of one optimizer step, where ``p`` is the parameter change.

    ``units[i]`` is the unit index of ``params[i]``. Call :meth:`before_step` right before the
    optimizer steps and :meth:`after_step` after it (gradients still in ``.grad``).
    """

    def __init__(
        self, params: Sequence[torch.Tensor], units: Sequence[int], num_units: int
    ) -> None:
        if len(params) != len(units):
            raise ValueError(f"units: got {len(units)} unit indices for {len(params)} parameters")
        self.params = list(params)
        self.units = torch.tensor(list(units), dtype=torch.long)
        self.num_units = num_units
        self._before: list[torch.Tensor] | None = None
        self._pending = False

    @property
    def pending(self) -> bool:
        """Whether :meth:`before_step` was called and :meth:`after_step` not yet."""
        return self._pending

    @torch.no_grad()
    def before_step(self) -> None:
        local = [local_part(p.detach()) for p in self.params]  # FSDP2: this rank's rows
        if self._before is None:
            self._before = [t.clone() for t in local]
        else:
            torch._foreach_copy_(self._before, local)
        self._pending = True

    @torch.no_grad()
    def after_step(self) -> torch.Tensor:
        """A float64 tensor ``[num_units, 2]``: ``p . p`` and ``-p . g`` summed over each unit."""
        assert self._before is not None and self._pending, "after_step() without before_step()"
        self._pending = False
        device = self.params[0].device
        per_tensor = torch.zeros(len(self.params), 2, dtype=torch.float64, device=device)
        for i, (param, before) in enumerate(zip(self.params, self._before, strict=True)):
            if param.grad is None:
                continue
            after = local_part(param.detach()).to(torch.float64)
            backwards = before.to(torch.float64) - after  # -p
            per_tensor[i, 0] = torch.sum(backwards * backwards)
            per_tensor[i, 1] = torch.sum(backwards * local_part(param.grad.detach()).double())
        group = shard_group(self.params)
        if group is not None:  # sharded parameters: their dot products are sums over the ranks
            sharded = torch.tensor([is_sharded(p) for p in self.params], device=device)
            totals = sum_across(per_tensor * sharded[:, None], group)
            per_tensor = torch.where(sharded[:, None], totals, per_tensor)
        per_unit = torch.zeros(self.num_units, 2, dtype=torch.float64, device=device)
        per_unit.index_add_(0, self.units.to(device), per_tensor)
        return per_unit

    def release(self) -> None:
        """Drop the parameter snapshot (after the switch it is no longer needed)."""
        self._before = None
        self._pending = False


class SwatsStatistics:
    """The SWATS running averages and latches, one entry per unit (see the module docstring)."""

    def __init__(self, beta2: Sequence[float], epsilon: float, min_steps: int) -> None:
        self.beta2 = [float(b) for b in beta2]
        self.epsilon = float(epsilon)
        self.min_steps = int(min_steps)
        n = len(self.beta2)
        self.average = [0.0] * n  # lambda_k
        self.count = [0] * n  # k: updates of the average
        self.last_gamma: list[float | None] = [None] * n
        self.last_lr: list[float | None] = [None] * n  # the LR of the last measured step
        self.latched = [False] * n
        self.latched_estimate: list[float | None] = [None] * n
        self.latched_lr: list[float | None] = [None] * n

    def __len__(self) -> int:
        return len(self.beta2)

    def estimate(self, unit: int) -> float | None:
        """``Lambda_k = lambda_k / (1 - beta2 ** k)``, or ``None`` before the first update."""
        k = self.count[unit]
        if k == 0:
            return None
        return self.average[unit] / (1.0 - self.beta2[unit] ** k)

    def update(
        self, step_squared: Sequence[float], step_dot_descent: Sequence[float], lrs: Sequence[float]
    ) -> None:
        """One optimizer step: per unit ``p . p``, ``-p . g`` and the LR the optimizer used."""
        for unit, (pp, descent) in enumerate(zip(step_squared, step_dot_descent, strict=True)):
            if descent == 0.0 or not math.isfinite(descent) or not math.isfinite(pp):
                continue
            gamma = pp / descent
            beta2 = self.beta2[unit]
            self.average[unit] = beta2 * self.average[unit] + (1.0 - beta2) * gamma
            self.count[unit] += 1
            self.last_gamma[unit] = gamma
            self.last_lr[unit] = float(lrs[unit])
            if self.latched[unit] or self.count[unit] < self.min_steps:
                continue
            estimate = self.estimate(unit)
            if estimate is not None and estimate > 0 and abs(estimate - gamma) < self.epsilon:
                self.latched[unit] = True
                self.latched_estimate[unit] = estimate
                self.latched_lr[unit] = float(lrs[unit])

    def gap(self, unit: int) -> float | None:
        """``|Lambda_k - gamma_k|`` after the last update: how far the criterion is from firing."""
        estimate, gamma = self.estimate(unit), self.last_gamma[unit]
        return None if estimate is None or gamma is None else abs(estimate - gamma)

    def should_switch(self) -> bool:
        """Every unit with statistics has latched (and at least one has)."""
        measured = [unit for unit in range(len(self)) if self.count[unit] > 0]
        return bool(measured) and all(self.latched[unit] for unit in measured)

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta2": list(self.beta2),
            "epsilon": self.epsilon,
            "min_steps": self.min_steps,
            "average": list(self.average),
            "count": list(self.count),
            "last_gamma": list(self.last_gamma),
            "last_lr": list(self.last_lr),
            "latched": list(self.latched),
            "latched_estimate": list(self.latched_estimate),
            "latched_lr": list(self.latched_lr),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["average"]) != len(self):
            raise ValueError(
                f"checkpoint: SWATS statistics for {len(state['average'])} units, but the optimizer "
                f"now has {len(self)}; allowed: the same parameter groups as the checkpointed run"
            )
        for key in (
            "average",
            "count",
            "last_gamma",
            "last_lr",
            "latched",
            "latched_estimate",
            "latched_lr",
        ):
            setattr(self, key, list(state[key]))
