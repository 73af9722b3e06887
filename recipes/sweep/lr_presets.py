"""The learning rate each optimizer gets in a comparison sweep, and the LRs its search tries.

A recipe's learning rate is tuned for its own optimizer (the BERT recipe: AdamW at 1e-4), and
other optimizers need other rates: moving from Adam to SGD with momentum the LR must grow
10-100x (the SWATS estimate does this from data), plain SGD needs ``1 / (1 - momentum)`` = 10x more again for the same
steady-state step, Adagrad's accumulated denominator wants about 10x Adam's. So each optimizer
has a *scale*, its typical peak LR relative to Adam's on the same task, and its preset is

    lr(optimizer) = lr(recipe) * scale(optimizer) / scale(recipe's optimizer)

Adadelta has no global LR (its updates are unit-corrected), and optimizers without a scale
(user-registered ones) keep their registry default. ``--lrs name=value`` overrides a preset.

The LR search of an optimizer (``--lr-search``, ``--lr-trials K``) tries the preset and ``K - 1``
learning rates drawn log-uniformly from ``[preset / R, preset * R]`` (``--lr-range R``, default
10) by Optuna's ``RandomSampler`` seeded with ``--sampler-seed`` and the optimizer's name, so the
same command gives the same trials whatever else the sweep holds, and ``K + 2`` trials extend
the ``K`` of an earlier run. With fewer than ten trials Optuna's default TPE sampler would draw
at random too (its ``n_startup_trials`` is 10), so nothing adaptive is lost; drawing up front
makes the trials independent of how many workers run them and in which order. ``--lr-grid``
tries ``preset * factor`` for given factors instead. The LR with the best final validation
accuracy wins (lower validation loss breaks ties; test metrics are never used to choose).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from optim_callbacks import OPTIMIZERS
from optim_callbacks.validation import check_choice, check_positive

__all__ = [
    "DEFAULT_LR_RANGE",
    "DEFAULT_LR_TRIALS",
    "LR_SCALE",
    "LearningRate",
    "choose_lr",
    "lr_bounds",
    "lr_grid",
    "parse_lr_overrides",
    "preset_lrs",
    "sampled_lrs",
]

# Typical peak LR relative to Adam's on the same task; None: the optimizer's own default LR.
LR_SCALE: Mapping[str, float | None] = {
    "adam": 1.0,
    "adamw": 1.0,
    "adabelief": 1.0,
    "rmsprop": 1.0,
    "adagrad": 10.0,
    "momentum": 100.0,
    "nesterov": 100.0,
    "sgd": 1000.0,
    "adadelta": None,
    # Chen et al. 2023, section 5: Lion's LR is 3-10x smaller than AdamW's (10x in their
    # image-classification runs), its weight decay 3-10x larger.
    "lion": 0.1,
    # You et al. 2019 tune LAMB's LR with the batch size; at a fine-tuning batch it is Adam's
    # (pytorch-optimizer's default equals Adam's 1e-3).
    "lamb": 1.0,
    # Taniguchi et al. 2024 train ADOPT with Adam's learning rates.
    "adopt": 1.0,
    # schedulefree's README: schedule-free AdamW wants 1-10x the LR of scheduled AdamW.
    "schedule_free_adamw": 3.0,
    # Their own defaults: Adafactor's step is relative to each weight's RMS, Muon's matrix LR
    # (0.02) is on another scale than its AdamW part's (3e-4), schedule-free SGD's is 1.0.
    "adafactor": None,
    "muon": None,
    "schedule_free_sgd": None,
}

DEFAULT_LR_TRIALS = 4
DEFAULT_LR_RANGE = 10.0


@dataclass(frozen=True)
class LearningRate:
    """An optimizer's learning rate in the sweep and where it came from (for the report)."""

    value: float
    source: str


def parse_lr_overrides(text: str | None) -> dict[str, float]:
    """``"adamw=1e-4,sgd=0.05"`` as ``{"adamw": 1e-4, "sgd": 0.05}`` (names checked)."""
    overrides: dict[str, float] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"lrs: got {item!r}; allowed: name=value pairs such as adamw=1e-4")
        known = [*OPTIMIZERS.names(), *OPTIMIZERS.aliases()]
        canonical = OPTIMIZERS.canonical(check_choice("lrs", name.strip().lower(), known))
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"lrs: got {value!r} for {canonical}; allowed: a number > 0") from None
        overrides[canonical] = check_positive(f"lrs[{canonical}]", number)
    return overrides


def _registry_lr(name: str) -> float:
    return float(OPTIMIZERS.get(name).defaults["lr"])


def preset_lrs(
    optimizers: Iterable[str],
    recipe_optimizer: str,
    recipe_lr: float | None,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, LearningRate]:
    """The preset learning rate of each optimizer (see the module docstring for the rule)."""
    overrides = overrides or {}
    recipe_optimizer = OPTIMIZERS.canonical(recipe_optimizer)
    base_scale = LR_SCALE.get(recipe_optimizer)
    presets: dict[str, LearningRate] = {}
    for name in optimizers:
        scale = LR_SCALE.get(name)
        if name in overrides:
            presets[name] = LearningRate(overrides[name], "--lrs")
        elif recipe_lr is None:
            presets[name] = LearningRate(_registry_lr(name), "registry default")
        elif name == recipe_optimizer:
            presets[name] = LearningRate(recipe_lr, "recipe")
        elif scale is None or base_scale is None:
            presets[name] = LearningRate(_registry_lr(name), "registry default")
        else:
            factor = scale / base_scale
            presets[name] = LearningRate(
                _round_lr(recipe_lr * factor), f"recipe's {recipe_optimizer} LR x {factor:g}"
            )
    return presets


def _round_lr(lr: float) -> float:
    """Four significant digits: ``1e-4 * 100`` is 0.01, not 0.010000000000000002."""
    return float(f"{lr:.4g}")


def lr_grid(preset: float, factors: Sequence[float]) -> list[float]:
    """``preset * factor`` for each factor, smallest first, duplicates removed."""
    return sorted({_round_lr(preset * factor) for factor in factors})


def sampled_lrs(
    optimizer: str, preset: float, trials: int, lr_range: float, seed: int
) -> list[float]:
    """The preset, then ``trials - 1`` learning rates drawn log-uniformly from
    ``[preset / lr_range, preset * lr_range]`` by Optuna's ``RandomSampler`` (seeded with
    ``seed`` and the optimizer's name), rounded to 4 significant digits, in drawing order,
    duplicates dropped."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.RandomSampler(seed=zlib.crc32(f"{seed}:{optimizer}".encode()))
    study = optuna.create_study(sampler=sampler)  # in memory: only the sampler's draws
    space = {"lr": optuna.distributions.FloatDistribution(*lr_bounds(preset, lr_range), log=True)}
    lrs = [_round_lr(preset)]
    while len(lrs) < trials:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = study.ask(space)
        study.tell(trial, 0.0)
        lr = _round_lr(trial.params["lr"])
        if lr not in lrs:
            lrs.append(lr)
    return lrs


def lr_bounds(preset: float, lr_range: float) -> tuple[float, float]:
    """The searched interval ``[preset / lr_range, preset * lr_range]``."""
    return preset / lr_range, preset * lr_range


def choose_lr(candidates: Mapping[float, tuple[float, float]]) -> float | None:
    """The LR whose run ended with the best validation accuracy (then the lower validation
    loss); ``candidates`` maps LR to ``(val_acc, val_loss)``; runs with a NaN accuracy never
    win; ``None`` when no run has a finite accuracy."""
    finite = {
        lr: (acc, loss if math.isfinite(loss) else math.inf)
        for lr, (acc, loss) in candidates.items()
        if math.isfinite(acc)
    }
    if not finite:
        return None
    return max(finite, key=lambda lr: (finite[lr][0], -finite[lr][1], -lr))
