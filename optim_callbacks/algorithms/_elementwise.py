"""The shared frame of our element-wise optimizers (Lion, ADOPT, schedule-free, ...).

A subclass says what its state is and how one step updates one tensor, three ways: a
per-element function for :class:`~optim_callbacks.compiled_update.CompiledUpdate` (the
``fused=True`` path the registry picks), ``torch._foreach_*`` kernels (``foreach``) and a loop
over single tensors (``foreach=False``). This base class does the rest the same way for all of
them: argument checks, state creation (``step`` a float32 scalar tensor, the rest
``zeros_like`` the parameter unless :meth:`initial_state` says otherwise), step counting,
FSDP2's sharded tensors (updated through their local shards), and the per-instance fallback
to foreach when compiling fails.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch

from optim_callbacks.compiled_update import (
    CompiledUpdate,
    check_compiled_devices,
    coefficient_rows,
    local_rows,
    step_compiled,
)
from optim_callbacks.sharded import local_part
from optim_callbacks.validation import check_lr, check_non_negative

Tensors = list[torch.Tensor]


class ElementwiseOptimizer(torch.optim.Optimizer, abc.ABC):
    """Base class: subclasses set ``state_keys``, ``compiled`` and implement
    :meth:`coefficients`, :meth:`foreach_update` and :meth:`single_update`."""

    #: Per-parameter state tensors besides ``step``, in the order the update functions take them.
    state_keys: tuple[str, ...] = ()
    #: The compiled per-element update (one function per variant: see :meth:`compiled_for`).
    compiled: CompiledUpdate | None = None
    #: Why compiling the fused update failed for this instance (then it steps with foreach).
    compile_failure: str | None = None

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        foreach: bool | None,
        fused: bool | None,
    ) -> None:
        check_lr(defaults["lr"])
        check_non_negative("weight_decay", defaults.get("weight_decay", 0.0))
        if fused and foreach:
            raise ValueError("fused: cannot be True together with foreach=True; pick one")
        super().__init__(params, {**defaults, "foreach": foreach, "fused": fused})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    # --- what a subclass provides ------------------------------------------------------------
    @abc.abstractmethod
    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        """The values the compiled update reads from ``c`` for a parameter at ``step``."""

    @abc.abstractmethod
    def foreach_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[list[torch.Tensor]],
        step: float,
    ) -> None:
        """One step of tensors at the same ``step`` count with ``torch._foreach_*`` kernels;
        ``states[k]`` lists state ``state_keys[k]`` of every tensor."""

    @abc.abstractmethod
    def single_update(
        self,
        group: dict[str, Any],
        param: torch.Tensor,
        grad: torch.Tensor,
        state: list[torch.Tensor],
        step: float,
    ) -> None:
        """One step of one tensor, operation by operation as the reference implementation."""

    def initial_state(self, key: str, param: torch.Tensor) -> torch.Tensor:
        """A new state tensor ``key`` for ``param`` (zeros unless a subclass says otherwise)."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        """The compiled update for this group's options (one per variant of the state)."""
        assert self.compiled is not None
        return self.compiled

    def keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state keys this group's options use (``state_keys`` by default)."""
        return self.state_keys

    # --- the frame ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            keys = self.keys_for(group)
            params, grads, states, steps = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                if torch.is_complex(p):
                    raise RuntimeError(f"{name} does not support complex parameters")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for key in keys:
                    if key not in state:
                        state[key] = self.initial_state(key, p)
                params.append(p)
                grads.append(p.grad)
                states.append([state[key] for key in keys])
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)
            if group["fused"] and self.compile_failure is None:
                check_compiled_devices(params, name)
                self._compiled_step(group, params, grads, states, steps)
            elif group["foreach"] is False:
                for p, g, s, t in zip(params, grads, states, steps, strict=True):
                    self.single_update(group, p, g, s, t.item())
            else:
                self._foreach_step(group, params, grads, states, steps)
        return loss

    def _compiled_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[list[torch.Tensor]],
        steps: list[torch.Tensor],
    ) -> None:
        rows = local_rows(params, grads, *zip(*states, strict=True))
        coefficients = coefficient_rows(rows, lambda step: self.coefficients(group, step), steps)
        step_compiled(self, self.compiled_for(group), rows, coefficients)

    def _foreach_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[list[torch.Tensor]],
        steps: list[torch.Tensor],
    ) -> None:
        """Foreach kernels per (step count, device, dtype), on local shards."""
        buckets: dict[tuple[float, torch.device, torch.dtype], list[int]] = {}
        for i, (p, t) in enumerate(zip(params, steps, strict=True)):
            buckets.setdefault((t.item(), p.device, p.dtype), []).append(i)
        for (step, _, _), indices in buckets.items():
            self.foreach_update(
                group,
                [local_part(params[i]) for i in indices],
                [local_part(grads[i]) for i in indices],
                [
                    [local_part(states[i][k]) for i in indices]
                    for k in range(len(states[indices[0]]))
                ],
                step,
            )
