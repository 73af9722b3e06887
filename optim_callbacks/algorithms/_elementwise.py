"""The shared frame of our element-wise optimizers (Lion, LAMB, ADOPT, schedule-free, AdaBelief).

A subclass states its update ONCE, as a pure per-element function of one parameter, its
gradient, its state tensors and a coefficient vector ``c`` (the ``rule``, wrapped in a
:class:`~optim_callbacks.compiled_update.CompiledUpdate`), plus :meth:`coefficients`, the
values ``c`` holds for a group at a step count. The frame derives every implementation from
that one function (:func:`~optim_callbacks.compiled_update.step_rows`):

- ``fused=True`` (the registry's ``impl="fused"``, its default): the rule compiled by
  ``torch.compile``, one pass over each tensor;
- ``foreach=None``/``True`` (``impl="foreach"``, and the fallback when compiling fails): the
  same function run eagerly (plain torch ops) on slices of 128k elements, small tensors packed
  into one call (measured faster than the hand-written ``torch._foreach_*`` kernels it replaced:
  bench/optimizer_step.py ``--bert-paths``);
- ``foreach=False`` (``impl="for-loop"``): the same, one tensor at a time, nothing packed.

A rule whose uncompiled paths must repeat a reference package's order of operations bit for bit
(AdaBelief) keeps them in :meth:`~ElementwiseOptimizer.reference_update`; the frame runs them in
place of the eager rule.

All compute in float32 (float64 for float64 parameters) and round once to the storage dtype.
The frame also does the rest the same way for all of them: argument checks, state creation
(``step`` a float32 CPU scalar tensor, the rest ``zeros_like`` the parameter unless
:meth:`initial_state` says otherwise), step counting, FSDP2's sharded tensors (updated through
their local shards).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from optim_callbacks.compiled_update import (
    CompiledUpdate,
    coefficient_rows,
    local_rows,
    step_rows,
)
from optim_callbacks.validation import check_betas, check_lr, check_non_negative, check_positive

Tensors = list[torch.Tensor]


class GroupTensors(NamedTuple):
    """What a group steps: its parameters that have a gradient, their gradients, their state
    tensors (one list per parameter, in :meth:`ElementwiseOptimizer.keys_for` order) and their
    step counts."""

    params: Tensors
    grads: Tensors
    states: list[Tensors]
    steps: Tensors


def adam_defaults(
    lr: Any, betas: Any, eps: float, weight_decay: float, **options: Any
) -> dict[str, Any]:
    """The defaults of an Adam-family rule (ADOPT, LAMB, AdaBelief): ``betas`` checked (each
    in [0, 1), returned as a tuple), ``eps > 0``, then ``lr``, ``betas``, ``eps``,
    ``weight_decay`` and the rule's own ``options`` in that order. ``lr`` and ``weight_decay``
    are checked by :class:`ElementwiseOptimizer`'s ``__init__``."""
    betas = check_betas("betas", betas)
    check_positive("eps", eps)
    return dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **options)


def adam_init(
    betas: tuple[float, float], eps: float, decoupled_weight_decay: bool
) -> Callable[..., None]:
    """The ``__init__`` of ADOPT and LAMB, which differ only in the defaults of ``betas``,
    ``eps`` and ``decoupled_weight_decay`` (given here): ``(params, lr=1e-3, betas, eps,
    weight_decay=0.0, *, decoupled_weight_decay, maximize=False, foreach=None, fused=None)``,
    with those defaults in its signature (``help()``, :func:`inspect.signature`)."""
    default_betas, default_eps, default_decoupled = betas, eps, decoupled_weight_decay

    def __init__(
        self: ElementwiseOptimizer,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = default_betas,
        eps: float = default_eps,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = default_decoupled,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = adam_defaults(
            lr,
            betas,
            eps,
            weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )
        ElementwiseOptimizer.__init__(self, params, defaults, foreach=foreach, fused=fused)

    return __init__


class ElementwiseOptimizer(torch.optim.Optimizer, abc.ABC):
    """Base class: subclasses set ``state_keys`` and ``compiled`` (their rule) and implement
    :meth:`coefficients`."""

    #: Per-parameter state tensors besides ``step``, in the order the rule takes them.
    state_keys: tuple[str, ...] = ()
    #: The per-element rule (one function per variant of the state: see :meth:`compiled_for`).
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
        """The values the rule reads from ``c`` for a parameter at ``step``."""

    def initial_state(self, key: str, param: torch.Tensor) -> torch.Tensor:
        """A new state tensor ``key`` for ``param`` (zeros unless a subclass says otherwise)."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        """The rule for this group's options (one per variant of the state)."""
        assert self.compiled is not None
        return self.compiled

    def keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state keys this group's options use (``state_keys`` by default)."""
        return self.state_keys

    def reference_update(self, group: dict[str, Any], rows: list[Tensors], steps: Tensors) -> bool:
        """Whether it updated ``rows`` (``[param, grad, *state]``, local shards; ``steps``
        already counted) itself, in place of the rule run eagerly (foreach, for-loop and after a
        failed compile). For a rule whose uncompiled paths repeat a reference package's own
        order of operations, where the eager rule would round differently (AdaBelief); the
        default leaves every uncompiled step to the rule."""
        return False

    # --- the frame ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            tensors = self._collect(group)
            if tensors.params:
                torch._foreach_add_(tensors.steps, 1.0)
                self._update(group, tensors)
        return loss

    def _collect(self, group: dict[str, Any]) -> GroupTensors:
        """The group's parameters with a gradient, their gradients, state tensors (created if
        missing) and step counts (kept as float32 CPU scalars, whatever a loaded state held)."""
        name = type(self).__name__
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
            step = state.get("step", 0.0)
            if not isinstance(step, torch.Tensor) or step.device.type != "cpu":
                # new, an int from another package, or moved to the device by load_state_dict
                # (torch does that for groups with ``fused=True``): keep it a host scalar.
                state["step"] = torch.as_tensor(step, dtype=torch.float32).to("cpu")
            for key in keys:
                if key not in state:
                    state[key] = self.initial_state(key, p)
            params.append(p)
            grads.append(p.grad)
            states.append([state[key] for key in keys])
            steps.append(state["step"])
        return GroupTensors(params, grads, states, steps)

    def _update(self, group: dict[str, Any], tensors: GroupTensors) -> None:
        """The rule on every tensor (local shards), by the group's implementation (uncompiled:
        :meth:`reference_update` where a subclass has one)."""
        params, grads, states, steps = tensors
        rows = local_rows(params, grads, *zip(*states, strict=True))
        compiled = group.get("fused") and self.compile_failure is None
        if not compiled and self.reference_update(group, rows, steps):
            return
        coefficients = coefficient_rows(rows, lambda step: self.coefficients(group, step), steps)
        step_rows(self, group, self.compiled_for(group), rows, coefficients)
