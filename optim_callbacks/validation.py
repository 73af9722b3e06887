"""Argument checks that fail with one clear message.

Every message names the parameter, the value it got and what is allowed; for names it also
suggests the closest valid one. Numeric checks refuse NaN and infinities (an ``lr`` of ``inf``
would otherwise pass ``> 0`` and turn every weight into NaN at the first step). All checks
raise ``ValueError`` so callers (and the CLI) can report them without a stack trace from deep
inside torch.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "check_at_least",
    "check_betas",
    "check_choice",
    "check_in_range",
    "check_lr",
    "check_non_negative",
    "check_positive",
    "check_unknown_options",
    "closest",
]


def closest(name: str, choices: Iterable[str], n: int = 1) -> list[str]:
    """Return up to ``n`` valid names closest to ``name`` (case-insensitive)."""
    lowered = {c.lower(): c for c in choices}
    matches = difflib.get_close_matches(str(name).lower(), list(lowered), n=n, cutoff=0.4)
    return [lowered[m] for m in matches]


def _did_you_mean(value: object, choices: Iterable[str]) -> str:
    suggestion = closest(str(value), choices)
    return f"; did you mean '{suggestion[0]}'?" if suggestion else ""


def check_choice(param: str, value: Any, choices: Iterable[str]) -> str:
    """Check that ``value`` is one of ``choices`` and return it."""
    choices = sorted(choices)
    if value not in choices:
        raise ValueError(
            f"{param}: unknown value {value!r}; allowed: {', '.join(choices)}"
            f"{_did_you_mean(value, choices)}"
        )
    return value


def check_unknown_options(param: str, given: Iterable[str], allowed: Iterable[str]) -> None:
    """Reject keyword options that are not in ``allowed``, naming each bad one."""
    allowed = sorted(set(allowed))
    for key in given:
        if key not in allowed:
            listing = ", ".join(allowed) if allowed else "none"
            raise ValueError(
                f"{param}: unknown option {key!r}; allowed: {listing}{_did_you_mean(key, allowed)}"
            )


def _is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(param: str, value: Any) -> Any:
    """Check that ``value`` is a finite number ``> 0``."""
    if not _is_finite_number(value) or value <= 0:
        raise ValueError(f"{param}: got {value!r}; allowed: a finite number > 0")
    return value


def check_lr(value: Any, param: str = "lr") -> Any:
    """Check a learning rate: a finite number ``> 0``, or a 1-element tensor holding one (what
    torch's optimizers accept for ``capturable`` / compiled use)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{param}: got a tensor of shape {tuple(value.shape)}; allowed: a finite "
                "number > 0 or a 1-element tensor (Tensor lr must be 1-element)"
            )
        check_positive(param, value.item())
        return value
    return check_positive(param, value)


def check_non_negative(param: str, value: Any) -> Any:
    """Check that ``value`` is a finite number ``>= 0``."""
    if not _is_finite_number(value) or value < 0:
        raise ValueError(f"{param}: got {value!r}; allowed: a finite number >= 0")
    return value


def check_at_least(param: str, value: Any, minimum: int) -> int:
    """Check that ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{param}: got {value!r}; allowed: an integer >= {minimum}")
    return value


def check_in_range(
    param: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = False,
) -> Any:
    """Check that ``value`` is a finite number with ``low <= value < high`` (bounds'
    inclusivity configurable). NaN and infinities are refused even against an infinite bound."""
    ok = _is_finite_number(value) and (
        (value >= low if low_inclusive else value > low)
        and (value <= high if high_inclusive else value < high)
    )
    if not ok:
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        # Within finite bounds "a number in [a, b)" already says "finite".
        kind = "a number" if math.isfinite(low) and math.isfinite(high) else "a finite number"
        raise ValueError(f"{param}: got {value!r}; allowed: {kind} in {interval}")
    return value


def check_betas(param: str, value: Any) -> tuple[float, ...]:
    """Check a betas tuple: every beta in [0, 1)."""
    try:
        betas = tuple(value)
    except TypeError:
        raise ValueError(f"{param}: got {value!r}; allowed: a pair of numbers in [0, 1)") from None
    for i, beta in enumerate(betas):
        check_in_range(f"{param}[{i}]", beta, 0.0, 1.0)
    return betas
