"""Effect sizes, their 95% confidence intervals over seeds, and the verdict they give.

An effect is oriented so that a positive number is what the claim predicts
(``orient * (arm - other)``, ``orient`` = +1 when the claim predicts a higher metric, -1 when
lower). Its interval is a two-sided Student t interval at level 1 - alpha (0.95):

- **paired by seed** (both arms ran the same seeds, >= 2 of them): the differences
  ``d_i = orient * (a_i - b_i)`` of the common seeds, ``mean(d) +- t_{1-alpha/2, n-1} * s_d /
  sqrt(n)`` (same seed = same initialisation, batch order and augmentation, so seed-to-seed
  variation cancels);
- **Welch** (no or too few common seeds): ``mean(a) - mean(b) +- t_{1-alpha/2, nu} *
  sqrt(s_a^2/n_a + s_b^2/n_b)`` with the Welch-Satterthwaite ``nu = (s_a^2/n_a +
  s_b^2/n_b)^2 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))``;
- **one sample** (a claim about one arm's value against 0): ``orient * mean(x) +-
  t_{1-alpha/2, n-1} * s / sqrt(n)``.

The verdict (issue 25): **supported** when the interval excludes 0 on the predicted side
(low > 0), **contradicted** when it excludes 0 on the other side (high < 0), **inconclusive**
otherwise: a difference inside the noise is never a win. Fewer than two values on a side give
no interval (inconclusive). **untested** when the two arms ran identically: paired by seed and
every paired difference exactly 0 (:func:`identical_pairs`). The zero-width interval such runs
give is no measurement: the treatment changed no run, so the comparison tested nothing. It is
never supported or contradicted; :func:`combine` counts it like inconclusive (a claim is
untested only when every comparison it combines is).

The t quantile is computed here (no SciPy needed): the t CDF through the regularized incomplete
beta function ``F(t) = 1 - I_{nu/(nu+t^2)}(nu/2, 1/2) / 2`` for ``t >= 0`` (Abramowitz & Stegun
26.7.1), evaluated by its continued fraction (modified Lentz, Numerical Recipes 6.4) and
inverted by bisection to 1e-12.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CONTRADICTED",
    "INCONCLUSIVE",
    "SUPPORTED",
    "UNTESTED",
    "Interval",
    "combine",
    "effect_interval",
    "identical_pairs",
    "one_sample_interval",
    "paired_interval",
    "paired_seeds",
    "t_cdf",
    "t_quantile",
    "verdict",
    "welch_interval",
]

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
INCONCLUSIVE = "inconclusive"
UNTESTED = "untested"
LEVEL = 0.95


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T <= t)`` for Student's t with ``df`` degrees of freedom (``df`` > 0, not an
    integer necessarily: Welch's)."""
    if not df > 0:
        raise ValueError(f"df: got {df!r}; allowed: a number > 0")
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf` to 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p: got {p!r}; allowed: a probability strictly between 0 and 1")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """An oriented effect (positive: as the claim predicts) and its interval."""

    effect: float
    low: float
    high: float
    n: int  # pairs (paired), values (one sample), or n_a + n_b (Welch)
    df: float
    method: str  # "paired t", "Welch t", "one-sample t"

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def _t_interval(mean: float, se: float, df: float, n: int, method: str) -> Interval:
    half = t_quantile(0.5 + LEVEL / 2.0, df) * se if se > 0 else 0.0
    return Interval(mean, mean - half, mean + half, n, df, method)


def _check(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if len(values) < 2:
        raise ValueError(f"{name}: got {len(values)} value(s); allowed: at least 2 for an interval")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name}: got {values}; allowed: finite numbers")
    return values


def paired_interval(a: Sequence[float], b: Sequence[float], orient: int = 1) -> Interval:
    """Mean paired difference ``orient * (a_i - b_i)`` and its t interval (df = n - 1)."""
    if len(a) != len(b):
        raise ValueError(f"b: got {len(b)} values for {len(a)} in a; allowed: one per pair")
    d = _check([orient * (x - y) for x, y in zip(a, b, strict=True)], "pairs")
    n = len(d)
    return _t_interval(
        statistics.fmean(d), statistics.stdev(d) / math.sqrt(n), n - 1, n, "paired t"
    )


def welch_interval(a: Sequence[float], b: Sequence[float], orient: int = 1) -> Interval:
    """``orient * (mean(a) - mean(b))`` and Welch's t interval."""
    a, b = _check(a, "a"), _check(b, "b")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se > 0:
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    else:
        df = float(len(a) + len(b) - 2)
    mean = orient * (statistics.fmean(a) - statistics.fmean(b))
    return _t_interval(mean, se, df, len(a) + len(b), "Welch t")


def one_sample_interval(x: Sequence[float], orient: int = 1) -> Interval:
    """``orient * mean(x)`` and its t interval (df = n - 1)."""
    x = _check([orient * v for v in x], "values")
    n = len(x)
    return _t_interval(
        statistics.fmean(x), statistics.stdev(x) / math.sqrt(n), n - 1, n, "one-sample t"
    )


def _finite(values: Mapping[int, float]) -> dict[int, float]:
    return {s: v for s, v in values.items() if math.isfinite(v)}


def paired_seeds(a: Mapping[int, float], b: Mapping[int, float]) -> list[int]:
    """The seeds at which both sides have a finite value: the pairs of :func:`effect_interval`
    when there are at least 2."""
    return sorted(set(_finite(a)) & set(_finite(b)))


def identical_pairs(a: Mapping[int, float], b: Mapping[int, float] | None) -> bool:
    """Whether ``a`` and ``b`` ran identically: they are paired by seed (at least 2 common seeds
    with finite values, as :func:`effect_interval` pairs them) and equal at every one of those
    seeds, so every paired difference is exactly 0. Never for a one-sample comparison."""
    if b is None:
        return False
    common = paired_seeds(a, b)
    return len(common) >= 2 and all(a[s] == b[s] for s in common)


def effect_interval(
    a: Mapping[int, float], b: Mapping[int, float] | None, orient: int
) -> Interval | None:
    """The interval of a comparison from per-seed values: paired on the common seeds when there
    are at least 2, else Welch; one sample when ``b`` is ``None``. ``None`` when a side has
    fewer than 2 finite values."""
    a = _finite(a)
    if b is None:
        return one_sample_interval(list(a.values()), orient) if len(a) >= 2 else None
    b = _finite(b)
    common = paired_seeds(a, b)
    if len(common) >= 2:
        return paired_interval([a[s] for s in common], [b[s] for s in common], orient)
    if len(a) >= 2 and len(b) >= 2:
        return welch_interval(list(a.values()), list(b.values()), orient)
    return None


def verdict(interval: Interval | None, identical: bool = False) -> str:
    """supported / contradicted / inconclusive, or untested when ``identical`` (the arms ran
    identically: :func:`identical_pairs`); see the module docstring."""
    if identical:
        return UNTESTED
    if interval is None:
        return INCONCLUSIVE
    if interval.low > 0:
        return SUPPORTED
    if interval.high < 0:
        return CONTRADICTED
    return INCONCLUSIVE


def combine(verdicts: Sequence[str], rule: str) -> str:
    """One verdict from the comparisons' (``rule``: all, any or first; see the registry). An
    untested comparison counts like an inconclusive one (it never makes a claim supported or
    contradicted); the claim is untested only when every comparison is."""
    if not verdicts:
        raise ValueError("verdicts: got none; allowed: at least one")
    if rule == "first":
        return verdicts[0]
    if rule not in ("any", "all"):
        raise ValueError(f"rule: got {rule!r}; allowed: all, any, first")
    if all(v == UNTESTED for v in verdicts):
        return UNTESTED
    if rule == "any":
        if SUPPORTED in verdicts:
            return SUPPORTED
        return CONTRADICTED if all(v == CONTRADICTED for v in verdicts) else INCONCLUSIVE
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return SUPPORTED if all(v == SUPPORTED for v in verdicts) else INCONCLUSIVE
