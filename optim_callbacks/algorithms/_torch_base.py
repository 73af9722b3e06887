"""What the compiled subclasses of torch's optimizers share: the ``fused`` option and state.

A subclass keeps torch's class as its base, so ``isinstance`` checks, the registry's
:func:`~optim_callbacks.optimizers.spec_for` and state dicts treat it as torch's optimizer;
state is created exactly as torch creates it (``step`` a float32 scalar tensor, the rest
``zeros_like`` the parameter), so a state dict moves between torch's class and ours in either
direction. Non-fused steps call torch's public functional API (``torch.optim.adadelta.adadelta``,
...), not ``super().step()``, whose class-level hook wrapper would run step hooks twice.
"""

from __future__ import annotations

from typing import Any

import torch


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


def foreach_after_failure(group: dict[str, Any]) -> bool | None:
    """The ``foreach`` flag for a group whose compiled path failed: foreach unless the user
    turned it off (torch's ``None`` on CPU would mean a for-loop)."""
    return True if group["foreach"] is None else group["foreach"]
