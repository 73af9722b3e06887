"""What the compiled subclasses of torch's optimizers share: the ``fused`` option and state.

A subclass keeps torch's class as its base, so ``isinstance`` checks, the registry's
:func:`~optim_callbacks.optimizers.spec_for` and state dicts treat it as torch's optimizer;
state is created exactly as torch creates it (``step`` a float32 scalar tensor, the rest
``zeros_like`` the parameter), so a state dict moves between torch's class and ours in either
direction. Non-fused steps call torch's public functional API (``torch.optim.adadelta.adadelta``,
...), not ``super().step()``, whose class-level hook wrapper would run step hooks twice.
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
from optim_callbacks.validation import check_lr


def check_fused_options(fused: bool | None, foreach: bool | None, **flags: bool) -> None:
    """``fused=True`` excludes ``foreach=True`` and each of ``flags`` (``capturable``, ...)."""
    if not fused:
        return
    if foreach:
        raise ValueError("fused: cannot be True together with foreach=True; pick one")
    for name, value in flags.items():
        if value:
            raise ValueError(f"fused: cannot be True together with {name}=True")


def add_fused_option(optimizer: torch.optim.Optimizer, fused: bool | None) -> None:
    """Record ``fused`` in the defaults and in every parameter group (as torch's fused
    optimizers do), so state dicts and groups added later carry it."""
    optimizer.defaults["fused"] = fused
    for group in optimizer.param_groups:
        group.setdefault("fused", fused)


def new_state(p: torch.Tensor, keys: tuple[str, ...], capturable: bool = False) -> dict[str, Any]:
    """Fresh state for ``p`` as torch creates it: ``step`` 0 and zeros for each key."""
    step = torch.zeros((), dtype=torch.float32, device=p.device if capturable else None)
    return {
        "step": step,
        **{key: torch.zeros_like(p, memory_format=torch.preserve_format) for key in keys},
    }


def averaging_coefficients(group: dict[str, Any], rate: str) -> tuple[float, ...]:
    """The columns a compiled update that keeps a running average of ``g^2`` starts with:
    ``(weight_decay, rate, 1 - rate, eps, -lr, sign)``, with ``rate`` the group option that
    decays it (Adadelta's ``rho``, RMSprop's ``alpha``) and ``sign`` -1 with ``maximize``."""
    decay = float(group[rate])
    return (
        float(group["weight_decay"]),
        decay,
        1.0 - decay,
        float(group["eps"]),
        -float(group["lr"]),
        -1.0 if group["maximize"] else 1.0,
    )


def foreach_after_failure(group: dict[str, Any]) -> bool | None:
    """The ``foreach`` flag for a group whose compiled path failed: foreach unless the user
    turned it off (torch's ``None`` on CPU would mean a for-loop)."""
    return True if group["foreach"] is None else group["foreach"]


class CompiledTorchStep(abc.ABC):
    """Mixin, placed before the torch class: the step of a compiled subclass.

    It collects each group's tensors (creating state as torch does), then steps them with the
    compiled update when ``fused`` is on (and compiling has not failed for this instance),
    else with torch's own functional update (:meth:`torch_update`). A subclass provides
    :meth:`state_keys_for`, :meth:`compiled_for`, :meth:`coefficients` and names torch's
    functional update with its state lists and options (:attr:`functional`,
    :attr:`functional_states`, :attr:`functional_options`).
    """

    #: Why compiling the fused update failed for this instance (then it steps with foreach).
    compile_failure: str | None = None
    #: torch's functional update (``torch.optim.adadelta.adadelta``, ...), as a staticmethod.
    functional: Callable[..., None]
    #: The state lists ``functional`` takes between ``grads`` and ``steps``, in its order.
    functional_states: tuple[str, ...] = ()
    #: The group's options ``functional`` takes as keywords (besides ``foreach``, ``has_complex``).
    functional_options: tuple[str, ...] = ()
    param_groups: list[dict[str, Any]]
    state: dict[torch.Tensor, dict[str, Any]]

    @abc.abstractmethod
    def state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The state tensors (besides ``step``) this group's options use, as torch names them."""

    @abc.abstractmethod
    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        """The compiled update for this group's options."""

    @abc.abstractmethod
    def coefficients(self, group: dict[str, Any]) -> tuple[float, ...]:
        """The values the compiled update reads from its coefficient vector."""

    def __init__(self, params: Any, *, fused: bool | None, **options: Any) -> None:
        """torch's ``__init__`` with ``options`` (which hold ``lr``, ``foreach``,
        ``capturable`` and ``differentiable``): ``lr`` checked, ``fused=True`` refused with any
        of the other three, then ``fused`` recorded in the defaults and every group."""
        check_lr(options["lr"])
        check_fused_options(
            fused,
            options["foreach"],
            capturable=options["capturable"],
            differentiable=options["differentiable"],
        )
        super().__init__(params, **options)  # type: ignore[call-arg]
        add_fused_option(self, fused)

    def torch_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: dict[str, list[torch.Tensor]],
        steps: list[torch.Tensor],
        foreach: bool | None,
    ) -> None:
        """torch's functional update for one group (``foreach`` already resolved), called as
        torch's own ``step`` calls it: ``functional(params, grads, *state lists, steps, ...)``
        with the lists of :attr:`functional_states` in order (one the group does not use
        empty) and the group's :attr:`functional_options` as keywords."""
        self.functional(
            params,
            grads,
            *(states.get(key, []) for key in self.functional_states),
            steps,
            foreach=foreach,
            has_complex=any(torch.is_complex(p) for p in params),
            **{key: group[key] for key in self.functional_options},
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        for group in self.param_groups:
            group.setdefault("fused", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        name = type(self).__name__
        for group in self.param_groups:
            keys = self.state_keys_for(group)
            params, grads, steps = [], [], []
            states: dict[str, list[torch.Tensor]] = {key: [] for key in keys}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{name} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state.update(new_state(p, keys, group["capturable"]))
                params.append(p)
                grads.append(p.grad)
                steps.append(state["step"])
                for key in keys:
                    states[key].append(state[key])
            if not params:
                continue
            if group["fused"] and self.compile_failure is None:
                check_compiled_devices(params, name)
                torch._foreach_add_(steps, 1.0)
                rows = local_rows(params, grads, *states.values())
                values = self.coefficients(group)
                coefficients = coefficient_rows(rows, lambda _, values=values: values)
                step_compiled(self, self.compiled_for(group), rows, coefficients)
            else:
                foreach = foreach_after_failure(group) if group["fused"] else group["foreach"]
                self.torch_update(group, params, grads, states, steps, foreach)
        return loss
