r"""Raise an optimizer's ``eps`` where, and only where, its state really is float16.

Adam-style updates divide by ``sqrt(v) + eps`` with ``v`` an EMA of ``g^2``. In float16 (smallest
subnormal ``2^-24 ~ 6.0e-8``):

- ``eps = 1e-8`` rounds to 0 (and ``1e-7`` to ``1.19e-7``);
- the stored increment ``(1 - beta2) g^2`` rounds to 0 for ``|g| < ~5.5e-3`` at ``beta2 = 0.999``
  (``g^2`` alone for ``|g| < ~2.4e-4``), so ``v`` stays 0 for small gradients.

With both at zero the update ``m / (sqrt(v) + eps)`` is ``x / 0``: inf, or NaN when ``m`` is 0
too, and the parameters are gone within a few steps. With ``eps = 1e-4`` the update is bounded
by ``lr * |m| / 1e-4``, so it stays finite (it is still larger than float32 Adam's where ``v``
underflows: float16 optimizer state is lossy, which is why ``16-mixed`` keeps it in float32).

What counts is the dtype of the optimizer's state, not the Trainer's precision flag: in
``16-mixed`` and ``bf16-mixed`` parameters and state stay float32, and bfloat16 has float32's
exponent range, so ``eps = 1e-8`` is fine there and is left alone. The callback reads the dtype of
each group's second-moment state (``spec_for(optimizer).second_moment``) where it exists, else of
its parameters (torch optimizers create and load their state in the parameter's dtype).

torch's ``fused=True`` Adam/AdamW kernels (the registry's default on CPU) compute each step in
float32 from float16 state: ``eps = 1e-8`` is not rounded away there and the current step's
``g^2`` is used before it is stored, so they do not produce inf/NaN; but the stored ``v`` still
underflows, so the second moment forgets its history for small gradients and steps grow (about
9x for a constant gradient of 1e-4 over 200 steps). Raising ``eps`` bounds them as well.

Safe values (``max(current eps, safe)`` is applied, so the callback never lowers an ``eps``):

- ``eps`` (default 1e-4) for optimizers that add ``eps`` outside a square root: Adam, AdamW,
  RMSprop, Adagrad, and any optimizer the registry does not know whose param groups have ``eps``;
- Adadelta adds ``eps`` inside both square roots (``sqrt(u + eps) / sqrt(v + eps)``): any
  ``eps`` float16 holds keeps it finite, so its safe value is its own default 1e-6;
- AdaBelief adds ``eps`` to its stored second moment each step: 1e-7 (1.19e-7 in float16)
  keeps ``sqrt(s) >= 3.4e-4``;
- ADOPT divides by ``max(sqrt(v), eps)`` and clips the result: its default 1e-6 is safe;
- Lion has no ``eps`` (the sign bounds every step) and Adafactor's ``eps`` is a pair whose
  first entry defaults to the state dtype's own epsilon: both are left alone, as is the
  Muon part of ``muon`` (its ``eps`` normalizes the Newton-Schulz input); its AdamW part is
  treated as AdamW.

``eps_by_optimizer`` overrides these per registry name.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from optim_callbacks.optimizers import OPTIMIZERS, OptimizerSpec, spec_for
from optim_callbacks.validation import check_at_least, check_choice, check_in_range

__all__ = ["DEFAULT_EPS_BY_OPTIMIZER", "POLICIES", "AmpEpsilon", "second_moment_zero_fraction"]

POLICIES = ("auto", "force", "never")

# Where eps sits inside a square root a smaller value is already safe (see the module docstring).
DEFAULT_EPS_BY_OPTIMIZER: Mapping[str, float] = MappingProxyType(
    {"adadelta": 1e-6, "adabelief": 1e-7, "adopt": 1e-6}
)

# The smallest positive float16 (a subnormal); a smaller eps would itself round to 0.
FLOAT16_TINIEST = 2.0**-24


def _check_eps(param: str, value: Any) -> float:
    return check_in_range(param, value, FLOAT16_TINIEST, 1.0, high_inclusive=True)


def _optimizer_name(optimizer: Optimizer, spec: OptimizerSpec | None) -> str:
    return spec.name if spec is not None else type(optimizer).__name__


def second_moment_zero_fraction(optimizer: Optimizer) -> torch.Tensor | None:
    """The fraction of the optimizer's second-moment entries that are exactly 0, as a tensor
    (``None`` when the optimizer has no known second moment or no state yet).

    In float16 state this is the share of entries where ``(1 - beta2) g^2`` underflowed; entries
    whose gradient was exactly 0 every step (unused parameters, dead units) count too, and so
    does state created by a step a GradScaler then skipped.
    """
    spec = spec_for(optimizer)
    if spec is None or spec.second_moment is None:
        return None
    moments = [
        state[spec.second_moment]
        for state in optimizer.state.values()
        if isinstance(state.get(spec.second_moment), torch.Tensor)
    ]
    if not moments:
        return None
    zeros = torch.stack([(m == 0).sum() for m in moments]).sum()
    return zeros.double() / sum(m.numel() for m in moments)


class AmpEpsilon(Callback):
    """Precision-aware Adam epsilon: raise ``eps`` where the optimizer state is float16.

    Args:
        eps: the safe value for the Adam family and for optimizers without an entry in
            ``eps_by_optimizer`` (default 1e-4; at least ``2**-24``, the smallest float16).
        eps_by_optimizer: safe values by registry name (``"adamw": 1e-3``), over the defaults
            ``DEFAULT_EPS_BY_OPTIMIZER`` (Adadelta 1e-6, AdaBelief 1e-7).
        policy: ``auto`` (default) raises ``eps`` to ``max(eps, safe)`` where the state is
            float16 and leaves it elsewhere; ``force`` raises it in every group that has one,
            whatever the dtype; ``never`` changes nothing and warns where float16 state has an
            unsafe ``eps``.
        log_underflow_every_n_steps: every this many optimizer steps, log
            ``amp_epsilon/second_moment_zero_fraction`` (suffixed ``_<i>`` with several
            optimizers): the fraction of second-moment entries that are exactly 0, a warning
            sign in float16 runs. 0 (default) turns it off.

    When: ``on_fit_start`` (optimizers exist), again ``on_train_start`` (after Lightning has
    restored a checkpoint's optimizer state, which brings its own ``eps``) and in
    ``on_optimizers_changed`` (called by callbacks that replace the optimizer, e.g. an
    Adam->SGD switch). Applying it twice changes nothing, so the raised ``eps`` is what
    checkpoints hold. Each change is reported once, ``old -> new``; an ``eps`` left alone is
    reported once per optimizer with the dtype that justified it (rank zero only).
    ``adjustments`` lists the changes made (kept in checkpoints).
    """

    def __init__(
        self,
        eps: float = 1e-4,
        *,
        eps_by_optimizer: Mapping[str, float] | None = None,
        policy: str = "auto",
        log_underflow_every_n_steps: int = 0,
    ) -> None:
        self.eps = _check_eps("eps", eps)
        overrides = {}
        for name, value in (eps_by_optimizer or {}).items():
            overrides[OPTIMIZERS.canonical(name)] = _check_eps(f"eps_by_optimizer[{name!r}]", value)
        self.eps_by_optimizer = {**DEFAULT_EPS_BY_OPTIMIZER, **overrides}
        self.policy = check_choice("policy", policy, POLICIES)
        self.log_underflow_every_n_steps = check_at_least(
            "log_underflow_every_n_steps", log_underflow_every_n_steps, 0
        )
        self.adjustments: list[dict[str, Any]] = []
        self._reported: set[str] = set()

    def safe_eps(self, optimizer: Optimizer) -> float:
        """The ``eps`` this callback considers safe for float16 state of ``optimizer``."""
        spec = spec_for(optimizer)
        return self.eps_by_optimizer.get(spec.name, self.eps) if spec is not None else self.eps

    # ---------------------------------------------------------------------------------- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer)

    def on_optimizers_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        every = self.log_underflow_every_n_steps
        if not every or trainer.global_step % every:
            return
        optimizers = trainer.optimizers
        for index, optimizer in enumerate(optimizers):
            fraction = second_moment_zero_fraction(optimizer)
            if fraction is None:
                continue
            key = "amp_epsilon/second_moment_zero_fraction"
            if len(optimizers) > 1:
                key += f"_{index}"
            pl_module.log(key, fraction.float(), on_step=True, on_epoch=False)

    # ------------------------------------------------------------------------------ the rule
    def apply(self, trainer: pl.Trainer) -> None:
        """Apply the policy to every optimizer of ``trainer`` (idempotent)."""
        for index, optimizer in enumerate(trainer.optimizers):
            self._apply_to(index, optimizer, trainer.precision)

    def _apply_to(self, index: int, optimizer: Optimizer, precision: str) -> None:
        spec = spec_for(optimizer)
        name = _optimizer_name(optimizer, spec)
        if spec is not None and not spec.has_eps:
            return
        safe = self.safe_eps(optimizer)
        left_alone: dict[str, list[int]] = {}
        for group_index, group in enumerate(optimizer.param_groups):
            if "eps" not in group or group.get("use_muon"):
                continue  # Muon's eps normalizes its Newton-Schulz input, not a denominator
            if not _is_number(group["eps"]):
                # Adafactor's (eps1, eps2): eps1=None is the state dtype's own epsilon, and
                # eps2 clips the update's RMS; neither is an eps added to a denominator.
                left_alone.setdefault("eps not one number", []).append(group_index)
                continue
            dtype = _state_dtype(optimizer, group, spec)
            old = float(group["eps"])
            half = dtype == torch.float16
            where = f"AmpEpsilon: {name} (optimizer {index}) group {group_index}"
            if self.policy == "never" or (self.policy == "auto" and not half):
                left_alone.setdefault(str(dtype).removeprefix("torch."), []).append(group_index)
                if half and old < safe:
                    self._report(
                        f"{where}: optimizer state is float16 and eps={old:g} is below the safe "
                        f"{safe:g}, left so because policy='never'; expect inf/NaN updates",
                        warn=True,
                    )
                continue
            new = max(old, safe)
            if new == old:
                if not self._adjusted_to(index, group_index, old):
                    left_alone.setdefault(str(dtype).removeprefix("torch."), []).append(group_index)
                continue
            group["eps"] = new
            record = {
                "optimizer": index,
                "name": name,
                "group": group_index,
                "old": old,
                "new": new,
            }
            if record not in self.adjustments:
                self.adjustments.append(record)
            reason = "float16 optimizer state" if half else "policy='force'"
            self._report(f"{where}: eps {old:g} -> {new:g} ({reason}, precision {precision!r})")
        for dtype_name, groups in left_alone.items():
            if dtype_name == "eps not one number":
                eps = optimizer.param_groups[groups[0]]["eps"]
                self._report(
                    f"AmpEpsilon: {name} (optimizer {index}): eps is {eps!r}, not one number "
                    f"added to a denominator; left alone in group(s) {groups}"
                )
                continue
            eps_values = sorted({float(optimizer.param_groups[g]["eps"]) for g in groups})
            self._report(
                f"AmpEpsilon: {name} (optimizer {index}): optimizer state is {dtype_name} under "
                f"precision {precision!r}; eps left at {', '.join(f'{e:g}' for e in eps_values)} "
                f"in group(s) {groups} (policy={self.policy!r})"
            )

    def _adjusted_to(self, index: int, group_index: int, eps: float) -> bool:
        return any(
            (r["optimizer"], r["group"], r["new"]) == (index, group_index, eps)
            for r in self.adjustments
        )

    def _report(self, message: str, warn: bool = False) -> None:
        if message in self._reported:
            return
        self._reported.add(message)
        (rank_zero_warn if warn else rank_zero_info)(message)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"adjustments": [dict(record) for record in self.adjustments]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.adjustments = [dict(record) for record in state_dict["adjustments"]]


def _state_dtype(
    optimizer: Optimizer, group: dict[str, Any], spec: OptimizerSpec | None
) -> torch.dtype:
    """The dtype the group's second moment has (or, before the first step, will have): float16
    if any of its tensors is float16, else the first one's dtype."""
    dtypes = []
    for param in group["params"]:
        state = optimizer.state.get(param, {})
        moment = state.get(spec.second_moment) if spec is not None and spec.second_moment else None
        dtypes.append(moment.dtype if isinstance(moment, torch.Tensor) else param.dtype)
    if torch.float16 in dtypes:
        return torch.float16
    return dtypes[0] if dtypes else torch.float32


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | torch.Tensor) and not isinstance(value, bool)
