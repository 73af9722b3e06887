"""Learning-rate schedules as pure, picklable functions ``step -> multiplier``.

A schedule multiplies each parameter group's base LR (``LambdaLR``), so per-group scales such as
layer-wise decay are kept. Warmup wraps any schedule: for ``step < W`` the multiplier ramps up,
afterwards the schedule runs over the remaining ``T - W`` steps (its "decay horizon"), so
``progress = min(step - W, T - W) / (T - W)``.

Closed forms (``m`` = ``min_lr_ratio``, ``p`` = progress in [0, 1], ``s`` = step after warmup):

- ``constant``: 1
- ``step``: ``gamma ** (s // step_size)``
- ``multistep``: ``gamma ** (number of milestones <= s)``
- ``exponential``: ``gamma ** s`` (``gamma`` defaults to ``m ** (1 / (T - W))``)
- ``cosine``: ``m + (1 - m) * (1 + cos(pi p)) / 2`` (Loshchilov & Hutter 2017)
- ``cosine_restarts``: cosine within cycles of ``cycle_steps * cycle_mult ** i`` steps, peak
  ``cycle_decay ** i`` (SGDR)
- ``linear``: ``1 - (1 - m) p``
- ``polynomial``: ``m + (1 - m) (1 - p) ** power``
- ``wsd``: warmup-stable-decay: 1 until the last ``decay_fraction`` of the horizon, then a
  linear, cosine or ``1 - sqrt`` decay to ``m`` (Hu et al. 2024, MiniCPM)

Warmup: ``linear`` gives ``(step + 1) / (W + 1)`` (never 0, so no step is wasted);
``exponential`` gives ``start_ratio ** (1 - step / W)``.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from optim_callbacks.registry import Registry
from optim_callbacks.validation import (
    check_at_least,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
    check_unknown_options,
)

__all__ = [
    "SCHEDULES",
    "ScheduleSpec",
    "build_scheduler",
    "check_warmup",
    "is_schedule_free",
    "lightning_scheduler_config",
    "register_schedule",
    "resolve_warmup_steps",
    "schedule_multiplier",
]


def _progress(step: int, horizon: int) -> float:
    return min(max(step, 0), horizon) / horizon


def constant(step: int, horizon: int) -> float:
    return 1.0


def step_decay(
    step: int, horizon: int, *, step_size: int | None = None, gamma: float = 0.1
) -> float:
    size = step_size or max(1, horizon // 3)
    return gamma ** (max(step, 0) // size)


def multistep(
    step: int, horizon: int, *, milestones: Sequence[int] | None = None, gamma: float = 0.1
) -> float:
    marks = sorted(milestones) if milestones is not None else [horizon // 2, (3 * horizon) // 4]
    return gamma ** bisect.bisect_right(marks, max(step, 0))


def exponential(
    step: int, horizon: int, *, gamma: float | None = None, min_lr_ratio: float = 0.01
) -> float:
    rate = gamma if gamma is not None else min_lr_ratio ** (1.0 / horizon)
    return rate ** min(max(step, 0), horizon)


def cosine(step: int, horizon: int, *, min_lr_ratio: float = 0.0) -> float:
    p = _progress(step, horizon)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def cosine_restarts(
    step: int,
    horizon: int,
    *,
    cycle_steps: int | None = None,
    cycle_mult: float = 1.0,
    cycle_decay: float = 1.0,
    min_lr_ratio: float = 0.0,
) -> float:
    first = cycle_steps or max(1, horizon // 4)
    s = max(step, 0)
    if cycle_mult == 1.0:
        index, length = s // first, first
        position = s - index * first
    else:
        # Walk the cycles (their count grows only logarithmically); a closed-form log would
        # misplace exact cycle boundaries by rounding.
        index, start, length = 0, 0.0, float(first)
        while s >= start + length:
            start += length
            length *= cycle_mult
            index += 1
        position = s - start
    peak = cycle_decay**index
    return min_lr_ratio + (peak - min_lr_ratio) * 0.5 * (
        1.0 + math.cos(math.pi * position / length)
    )


def linear(step: int, horizon: int, *, min_lr_ratio: float = 0.0) -> float:
    return 1.0 - (1.0 - min_lr_ratio) * _progress(step, horizon)


def polynomial(step: int, horizon: int, *, power: float = 0.9, min_lr_ratio: float = 0.0) -> float:
    return min_lr_ratio + (1.0 - min_lr_ratio) * (1.0 - _progress(step, horizon)) ** power


def warmup_stable_decay(
    step: int,
    horizon: int,
    *,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
    min_lr_ratio: float = 0.0,
) -> float:
    decay_steps = max(1, round(horizon * decay_fraction))
    start = horizon - decay_steps
    if step < start:
        return 1.0
    p = _progress(step - start, decay_steps)
    if decay_shape == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * p))
    elif decay_shape == "sqrt":
        shape = 1.0 - math.sqrt(p)
    else:
        shape = 1.0 - p
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def with_warmup(
    step: int,
    *,
    schedule: Callable[..., float],
    warmup_steps: int,
    total_steps: int,
    warmup_kind: str = "linear",
    warmup_start_ratio: float = 0.01,
    options: Mapping[str, Any] | None = None,
) -> float:
    """The multiplier at ``step``: warmup, then ``schedule`` over the steps after warmup."""
    if step < warmup_steps:
        if warmup_kind == "exponential":
            return warmup_start_ratio ** (1.0 - step / warmup_steps)
        return (step + 1) / (warmup_steps + 1)
    return schedule(step - warmup_steps, max(1, total_steps - warmup_steps), **(options or {}))


WARMUP_KINDS = ("linear", "exponential")
# Options whose value is a list of steps (their ``_epochs`` form a list of epochs).
_LIST_OPTIONS = ("milestones",)


@dataclass(frozen=True)
class ScheduleSpec:
    """A named schedule: the multiplier function, its options' defaults and which options may
    also be given in epochs (``<option>_epochs``, converted with ``steps_per_epoch``)."""

    name: str
    function: Callable[..., float]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    epoch_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    def check_options(
        self,
        warmup: int | float = 0,
        *,
        warmup_kind: str = "linear",
        warmup_start_ratio: float = 0.01,
        **options: Any,
    ) -> None:
        """Refuse, with one ``ValueError`` naming the parameter, what :func:`schedule_multiplier`
        would refuse for this schedule before it knows the number of steps: a warmup that is
        neither steps (an int >= 0) nor a fraction in [0, 1), an unknown warmup kind or start
        ratio, an option the schedule does not take (``<option>_epochs`` included, with the
        closest name), an option given both in steps and in epochs, and option values out of
        range. What needs the step count (warmup shorter than training, converting epochs)
        :func:`schedule_multiplier` checks."""
        check_warmup(warmup)
        check_choice("warmup_kind", warmup_kind, WARMUP_KINDS)
        check_in_range(
            "warmup_start_ratio",
            warmup_start_ratio,
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=True,
        )
        epoch_keys = {f"{k}_epochs": k for k in self.epoch_options}
        check_unknown_options(
            f"{self.name} scheduler options", options, [*self.defaults, *epoch_keys]
        )
        for epochs_key, key in epoch_keys.items():
            epochs = options.get(epochs_key)
            if epochs is None:
                continue
            if options.get(key) is not None:
                raise ValueError(f"{key}: give either {key} or {epochs_key}, not both")
            _check_epochs(epochs_key, epochs, as_list=key in _LIST_OPTIONS)
        _check_option_values({k: v for k, v in options.items() if k not in epoch_keys})

    def epochs_to_steps(
        self, options: Mapping[str, Any], steps_per_epoch: int | None
    ) -> dict[str, Any]:
        """``options`` with every ``<option>_epochs`` replaced by ``<option>`` in steps."""
        epoch_keys = {f"{k}_epochs" for k in self.epoch_options}
        resolved = {k: v for k, v in options.items() if k not in epoch_keys}
        for key in self.epoch_options:
            epochs = options.get(f"{key}_epochs")
            if epochs is None:
                continue
            if steps_per_epoch is None:
                raise ValueError(f"{key}_epochs: needs steps_per_epoch to convert epochs to steps")
            check_at_least("steps_per_epoch", steps_per_epoch, 1)
            if isinstance(epochs, (list, tuple)):
                resolved[key] = [round(e * steps_per_epoch) for e in epochs]
            else:
                resolved[key] = max(1, round(epochs * steps_per_epoch))
        return resolved


SCHEDULES: Registry[ScheduleSpec] = Registry("scheduler")


def register_schedule(
    spec: ScheduleSpec, *, aliases: tuple[str, ...] = (), replace: bool = False
) -> ScheduleSpec:
    """Add a schedule; ``spec.function(step, horizon, **options)`` must be a module-level
    function (so schedulers pickle into checkpoints)."""
    return SCHEDULES.register(spec.name, spec, aliases=aliases, replace=replace)


for _spec, _aliases in (
    (ScheduleSpec("constant", constant, "the base LR throughout (after any warmup)"), ("none",)),
    (
        ScheduleSpec(
            "step",
            step_decay,
            "x gamma every step_size steps: the simple baseline",
            {"step_size": None, "gamma": 0.1},
            ("step_size",),
        ),
        (),
    ),
    (
        ScheduleSpec(
            "multistep",
            multistep,
            "x gamma at each milestone",
            {"milestones": None, "gamma": 0.1},
            ("milestones",),
        ),
        (),
    ),
    (
        ScheduleSpec(
            "exponential",
            exponential,
            "x gamma every step (default: to min_lr_ratio at the end)",
            {"gamma": None, "min_lr_ratio": 0.01},
        ),
        (),
    ),
    (
        ScheduleSpec(
            "cosine",
            cosine,
            "half cosine down to min_lr_ratio: smooth, usually ends lowest",
            {"min_lr_ratio": 0.0},
        ),
        (),
    ),
    (
        ScheduleSpec(
            "cosine_restarts",
            cosine_restarts,
            "SGDR: cosine cycles, each cycle_mult times longer",
            {"cycle_steps": None, "cycle_mult": 1.0, "cycle_decay": 1.0, "min_lr_ratio": 0.0},
            ("cycle_steps",),
        ),
        ("sgdr",),
    ),
    (
        ScheduleSpec("linear", linear, "straight line down to min_lr_ratio", {"min_lr_ratio": 0.0}),
        (),
    ),
    (
        ScheduleSpec(
            "polynomial",
            polynomial,
            "(1 - progress) ** power down to min_lr_ratio",
            {"power": 0.9, "min_lr_ratio": 0.0},
        ),
        ("poly",),
    ),
    (
        ScheduleSpec(
            "wsd",
            warmup_stable_decay,
            "warmup-stable-decay: flat, then decay over the last fraction",
            {"decay_fraction": 0.2, "decay_shape": "linear", "min_lr_ratio": 0.0},
        ),
        (),
    ),
):
    register_schedule(_spec, aliases=_aliases)


def check_warmup(warmup: Any) -> None:
    """Warmup is steps (an int >= 0) or a fraction of all steps (a float in [0, 1))."""
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)):
        raise ValueError(
            f"warmup: got {warmup!r}; allowed: steps (an int >= 0) or a fraction in [0, 1)"
        )
    if isinstance(warmup, float):
        check_in_range("warmup", warmup, 0.0, 1.0)
    else:
        check_at_least("warmup", warmup, 0)


def resolve_warmup_steps(warmup: int | float, total_steps: int) -> int:
    """Warmup given as steps (an int) or as a fraction of ``total_steps`` (a float in [0, 1))."""
    check_warmup(warmup)
    steps = round(warmup * total_steps) if isinstance(warmup, float) else warmup
    if steps >= total_steps:
        raise ValueError(
            f"warmup: got {warmup!r} ({steps} steps); allowed: fewer than total_steps ({total_steps})"
        )
    return steps


def _check_epochs(param: str, epochs: Any, *, as_list: bool) -> None:
    if not as_list:
        check_positive(param, epochs)
        return
    if isinstance(epochs, str) or not isinstance(epochs, (list, tuple)):
        raise ValueError(f"{param}: got {epochs!r}; allowed: a list of epochs >= 0")
    for i, mark in enumerate(epochs):
        check_non_negative(f"{param}[{i}]", mark)


def _check_option_values(options: Mapping[str, Any]) -> None:
    """The value checks of the options the registry's schedules share (by name)."""
    for key in ("gamma", "cycle_mult", "power", "cycle_decay"):
        if options.get(key) is not None:
            check_positive(key, options[key])
    if options.get("cycle_mult") is not None and options["cycle_mult"] < 1:
        raise ValueError(f"cycle_mult: got {options['cycle_mult']!r}; allowed: a number >= 1")
    if "min_lr_ratio" in options:
        check_in_range("min_lr_ratio", options["min_lr_ratio"], 0.0, 1.0, high_inclusive=True)
    if "decay_fraction" in options:
        check_in_range(
            "decay_fraction",
            options["decay_fraction"],
            0.0,
            1.0,
            low_inclusive=False,
            high_inclusive=True,
        )
    if "decay_shape" in options:
        check_choice("decay_shape", options["decay_shape"], ("linear", "cosine", "sqrt"))
    for key in ("step_size", "cycle_steps"):
        if options.get(key) is not None:
            check_at_least(key, options[key], 1)
    milestones = options.get("milestones")
    if milestones is not None:
        if isinstance(milestones, str) or not isinstance(milestones, (list, tuple)):
            raise ValueError(f"milestones: got {milestones!r}; allowed: a list of steps >= 0")
        for i, mark in enumerate(milestones):
            check_at_least(f"milestones[{i}]", mark, 0)


def schedule_multiplier(
    name: str,
    total_steps: int,
    warmup: int | float = 0,
    *,
    warmup_kind: str = "linear",
    warmup_start_ratio: float = 0.01,
    steps_per_epoch: int | None = None,
    **options: Any,
) -> Callable[[int], float]:
    """The picklable function ``step -> multiplier`` for schedule ``name`` with warmup.

    The options are checked by :meth:`ScheduleSpec.check_options` first."""
    spec = SCHEDULES.get(name)
    check_at_least("total_steps", total_steps, 1)
    spec.check_options(
        warmup, warmup_kind=warmup_kind, warmup_start_ratio=warmup_start_ratio, **options
    )
    resolved = spec.epochs_to_steps(options, steps_per_epoch)
    warmup_steps = resolve_warmup_steps(warmup, total_steps)
    return functools.partial(
        with_warmup,
        schedule=spec.function,
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        warmup_kind=warmup_kind,
        warmup_start_ratio=warmup_start_ratio,
        options=resolved,
    )


def build_scheduler(
    name: str,
    optimizer: Optimizer,
    total_steps: int,
    warmup: int | float = 0,
    *,
    warmup_kind: str = "linear",
    warmup_start_ratio: float = 0.01,
    steps_per_epoch: int | None = None,
    **options: Any,
) -> LambdaLR:
    """A ``LambdaLR`` that applies schedule ``name`` (with warmup) to every param group.

    Each group's own LR (which already includes its ``lr_scale``) is the base the multiplier
    scales, so layer-wise decay and other per-group LRs keep their ratios. Step it once per
    optimizer step; ``total_steps`` is the number of optimizer steps (in Lightning:
    ``trainer.estimated_stepping_batches``).

    A schedule-free optimizer (one with ``train()``/``eval()``) takes only ``constant`` (with
    any warmup): its averaging replaces the schedule.
    """
    if is_schedule_free(optimizer) and SCHEDULES.canonical(name) != "constant":
        raise ValueError(
            f"schedule: got {name!r} with the schedule-free optimizer "
            f"{type(optimizer).__name__}; allowed: 'constant' (a schedule-free optimizer "
            "replaces the schedule; warmup still applies)"
        )
    multiplier = schedule_multiplier(
        name,
        total_steps,
        warmup,
        warmup_kind=warmup_kind,
        warmup_start_ratio=warmup_start_ratio,
        steps_per_epoch=steps_per_epoch,
        **options,
    )
    return LambdaLR(optimizer, multiplier)


def lightning_scheduler_config(scheduler: LambdaLR, name: str | None = "lr") -> dict[str, Any]:
    """The ``lr_scheduler`` dict Lightning expects for a per-step schedule.

    A fixed ``name`` keeps ``LearningRateMonitor``'s key the same whatever the optimizer class,
    so the LR series stays one curve across an optimizer switch.
    """
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "step", "frequency": 1}
    if name is not None:
        config["name"] = name
    return config


def is_schedule_free(optimizer: Optimizer) -> bool:
    """Keeps train and eval points (``train()``/``eval()``), as schedule-free optimizers do."""
    return callable(getattr(optimizer, "train", None)) and callable(
        getattr(optimizer, "eval", None)
    )
