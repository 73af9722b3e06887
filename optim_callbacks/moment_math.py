"""Optimizer moment statistics as batched reductions, with every formula in one place.

Notation (Kingma & Ba 2015, "Adam", https://arxiv.org/abs/1412.6980; Zhuang et al. 2020,
"AdaBelief", https://arxiv.org/abs/2010.07468): ``m`` the first moment, ``v`` the second moment
(``exp_avg_sq``; AdaBelief's belief ``s = exp_avg_var``; ``max_...`` under AMSGrad), ``g`` the
gradient, ``t`` the optimizer's step count, ``beta1``, ``beta2``, ``lr``, ``eps``.

- bias correction: ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)`` (Adam family;
  other adaptive optimizers have ``v_hat = v``)
- effective per-element step size: ``lr / (sqrt(v_hat) + eps)``; Adam's update is
  ``-step_size * m_hat``
- update-to-weight ratio: ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||``
- second-moment underflow: the fraction of entries with ``v < eps^2``, i.e. ``sqrt(v) < eps``:
  ``eps`` dominates the denominator there; in fp16 such entries are exactly zero
- gradient cosine: ``<m, g> / (||m|| ||g||)``

Norms of a layer (or of all parameters) are ``sqrt(sum of squared tensor norms)``; ratios and
cosines are taken between those sums.

How it stays cheap: tensor norms come from one ``torch._foreach_norm`` call and are summed per
layer by one matrix product with a 0/1 membership matrix. Percentiles count every element of
every layer and of the model, with no sampling: one pass over the second moments bins
``log10(sqrt(v_hat))`` and ``log10(step size)`` into fixed log-spaced bins (200 per decade,
``torch.bincount``), and the percentiles are read from the counts on the device, each within one
bin (1.16%) of the exact order statistic; the model's counts are the sum of the layers'. Every
result leaves the device in one transfer; under FSDP2 the ranks first sum their counts and norms
in one ``all_reduce``, so a sharded run logs what an unsharded one does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "STATISTICS",
    "GroupHistogram",
    "ParamMoments",
    "moment_statistics",
    "percentile_label",
    "snapshot_parameters",
]

STATISTICS: tuple[str, ...] = (
    "grad_norm",
    "weight_norm",
    "update_norm",
    "state_norm",
    "first_moment_hat_norm",
    "sqrt_second_moment",
    "step_size",
    "update_to_weight",
    "second_moment_underflow",
    "grad_cosine",
)


@dataclass
class ParamMoments:
    """What one parameter's optimizer state says at a logging step.

    ``states``: the tensors whose L2 norm is logged, by state key. ``second_moment``: the tensor
    the update divides by. ``betas`` (with ``step``): the optimizer bias-corrects with them, and
    ``lr``/``eps`` give its step size. ``before``: the parameter before the step, from
    :func:`snapshot_parameters`; :func:`moment_statistics` consumes it (overwrites it in place).
    """

    param: Tensor
    states: dict[str, Tensor] = field(default_factory=dict)
    before: Tensor | None = None
    grad: Tensor | None = None
    first_moment: Tensor | None = None
    second_moment: Tensor | None = None
    step: Tensor | float | None = None
    betas: tuple[float, float] | None = None
    lr: float | None = None
    eps: float | None = None
    # A factored second moment (Adafactor): row and column factors of shapes (..., R, 1) and
    # (..., 1, C); v[..., i, j] = row[..., i] * col[..., j] / mean(row[..., :]). Never
    # materialized for long: binned a parameter at a time (see _second_moment).
    factors: tuple[Tensor, Tensor] | None = None
    sharded: bool = False  # the tensors are this rank's shard of a DTensor (FSDP2)
    global_numel: int | None = None  # the whole parameter's size, when ``param`` is a shard

    @property
    def adam_like(self) -> bool:
        """Bias-corrected second moment and a known step size ``lr / (sqrt(v_hat) + eps)``."""
        return (
            self.second_moment is not None
            and self.betas is not None
            and self.step is not None
            and self.lr is not None
            and self.eps is not None
        )


@dataclass(frozen=True)
class GroupHistogram:
    """Counts of ``log10(step_size)`` in ``len(counts)`` equal bins from ``low`` to ``high``."""

    counts: list[float]
    low: float
    high: float

    @property
    def edges(self) -> list[float]:
        width = (self.high - self.low) / len(self.counts)
        return [self.low + i * width for i in range(len(self.counts) + 1)]


def percentile_label(q: float) -> str:
    """``5 -> 'p05'``, ``50 -> 'p50'``, ``99.9 -> 'p99_9'`` (no dots in metric keys)."""
    return "p" + f"{q:02g}".replace(".", "_")


def _fp32(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1).to(torch.float32)


class _Sums:
    """Per-parameter values summed per group: ``columns[name] = (parameters, values)``."""

    def __init__(self) -> None:
        self.columns: dict[str, tuple[list[int], Tensor]] = {}

    def add(self, name: str, indices: list[int], values: Tensor) -> None:
        if indices:
            self.columns[name] = (indices, values.to(torch.float32))

    def reduce(
        self,
        groups: Sequence[Sequence[int]],
        count: int,
        device: torch.device,
        weights: Sequence[float] | None = None,
    ) -> tuple[Tensor, list[list[int]]]:
        """``[columns, groups]`` sums (one matrix product) and, per column and group, how many
        parameters contributed (known on the host, no sync). ``weights[i]`` scales parameter
        ``i``'s values (0 leaves a replicated parameter to rank zero in a sharded sum)."""
        pairs = [(i, g) for g, members in enumerate(groups) for i in members]
        membership = torch.zeros(count, len(groups), dtype=torch.float32)
        membership[tuple(torch.tensor(pairs, dtype=torch.long).T)] = 1.0
        if weights is not None:
            membership *= torch.tensor(list(weights), dtype=torch.float32)[:, None]
        rows = [c for c, (indices, _) in enumerate(self.columns.values()) for _ in indices]
        columns = [i for indices, _ in self.columns.values() for i in indices]
        matrix = torch.zeros(len(self.columns), count, dtype=torch.float32, device=device)
        if rows:
            where = (torch.tensor(rows, device=device), torch.tensor(columns, device=device))
            matrix.index_put_(where, torch.cat([values for _, values in self.columns.values()]))
        contributors = []
        for indices, _ in self.columns.values():
            present = set(indices)
            contributors.append([sum(i in present for i in members) for members in groups])
        return matrix @ membership.to(device), contributors


def _norm_sums(moments: Sequence[ParamMoments], wanted: set[str], device: torch.device) -> _Sums:
    """Squared norms and dot products per parameter; the norms come from one foreach call."""
    inputs: list[Tensor] = []
    slots: dict[int, int] = {}

    def slot(tensor: Tensor) -> int:
        if id(tensor) not in slots:
            slots[id(tensor)] = len(inputs)
            inputs.append(tensor.detach())
        return slots[id(tensor)]

    state_slots: dict[str, list[tuple[int, int]]] = {}
    if "state_norm" in wanted:
        for i, m in enumerate(moments):
            for key, tensor in m.states.items():
                state_slots.setdefault(key, []).append((i, slot(tensor)))
    moved = [i for i, m in enumerate(moments) if m.before is not None]
    weight = torch.zeros(0, device=device)
    if {"update_to_weight", "update_norm"} & wanted and moved:
        befores = [moments[i].before for i in moved]
        weight = torch.stack(torch._foreach_norm(befores, 2, dtype=torch.float32)).square()
        # The snapshot becomes theta_{t-1} - theta_t in place: no second copy of the weights.
        torch._foreach_sub_(befores, [moments[i].param.detach() for i in moved])
    update = [(i, slot(moments[i].before)) for i in moved] if weight.numel() else []
    cosine: list[tuple[int, int, int]] = []
    if "grad_cosine" in wanted:
        cosine = [
            (i, slot(m.first_moment), slot(m.grad))
            for i, m in enumerate(moments)
            if m.first_moment is not None and m.grad is not None
        ]
    adam = [i for i, m in enumerate(moments) if m.adam_like and m.first_moment is not None]
    hat = (
        [(i, slot(moments[i].first_moment)) for i in adam]
        if "first_moment_hat_norm" in wanted
        else []
    )

    grads = [(i, slot(m.grad)) for i, m in enumerate(moments) if m.grad is not None]
    grads = grads if "grad_norm" in wanted else []
    weights = [(i, slot(m.param)) for i, m in enumerate(moments)] if "weight_norm" in wanted else []

    squares = torch.zeros(0, device=device)
    if inputs:
        squares = torch.stack(torch._foreach_norm(inputs, 2, dtype=torch.float32)).square()

    def take(positions: list[int]) -> Tensor:
        return squares[torch.tensor(positions, dtype=torch.long, device=device)]

    sums = _Sums()
    if grads:
        sums.add("grad", [i for i, _ in grads], take([s for _, s in grads]))
    if weights:
        sums.add("param", [i for i, _ in weights], take([s for _, s in weights]))
    for key, pairs in state_slots.items():
        sums.add(f"norm:{key}", [i for i, _ in pairs], take([s for _, s in pairs]))
    if hat:
        bias1, _ = _bias_corrections([moments[i] for i, _ in hat], device)
        sums.add("hat", [i for i, _ in hat], take([s for _, s in hat]) / bias1.square())
    if update:
        sums.add("delta", [i for i, _ in update], take([s for _, s in update]))
        sums.add("weight", [i for i, _ in update], weight)
    if cosine:
        indices = [i for i, _, _ in cosine]
        dots = [torch.vdot(_fp32(moments[i].first_moment), _fp32(moments[i].grad)) for i in indices]
        sums.add("dot", indices, torch.stack(dots))
        sums.add("cos_m", indices, take([s for _, s, _ in cosine]))
        sums.add("cos_g", indices, take([s for _, _, s in cosine]))
    return sums


@torch.no_grad()
def snapshot_parameters(params: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``params`` for :attr:`ParamMoments.before`, in at least fp32 (so that the
    update ``theta_{t-1} - theta_t`` of fp16/bf16 weights is not rounded away)."""
    low = [p for p in params if p.dtype not in (torch.float32, torch.float64)]
    if not low:
        return list(torch._foreach_mul([p.detach() for p in params], 1.0))
    return [p.detach().to(torch.float32, copy=True) for p in params]


def _bias_corrections(
    moments: Sequence[ParamMoments], device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(1 - beta1^t, 1 - beta2^t)`` per parameter, on the device (no host sync)."""
    dtype = torch.float32 if device.type == "mps" else torch.float64
    steps = torch.stack(
        [torch.as_tensor(m.step, device=device).to(dtype).reshape(()) for m in moments]
    )
    beta1 = torch.tensor([m.betas[0] for m in moments], dtype=dtype, device=device)
    beta2 = torch.tensor([m.betas[1] for m in moments], dtype=dtype, device=device)
    return 1 - beta1**steps, 1 - beta2**steps


# Percentiles: log10 of sqrt(v_hat) and of the step size, every element counted in fixed bins of
# 1/LOG_BINS decade from 1e{LOG_LOW} to 1e{LOG_HIGH}, plus one bin below (zeros included) and
# one above. A bin is 10^(1/200) - 1 = 1.16% wide: an order statistic read from the counts
# (interpolated within its bin) is within 1.16% of the exact one.
LOG_LOW, LOG_HIGH, LOG_BINS = -24.0, 12.0, 200
LOG_COLUMNS = int((LOG_HIGH - LOG_LOW) * LOG_BINS) + 2
PERCENTILE_RELATIVE_ERROR = 10 ** (1 / LOG_BINS) - 1  # 0.0116: the bound a logged percentile meets
# Elements binned per call: bounds the temporary buffers (16 MB each).
CHUNK = 1 << 22


def _counts_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _second_moment(m: ParamMoments) -> Tensor:
    """The parameter's second moment as a flat tensor; a factored one (Adafactor) materialized:
    ``v[..., i, j] = row[..., i] * col[..., j] / mean(row[..., :])``."""
    if m.factors is None:
        return m.second_moment.detach().reshape(-1)
    row, col = (f.detach().to(torch.float32) for f in m.factors)
    return (row / row.mean(dim=-2, keepdim=True) * col).reshape(-1)


def _bin(values: Tensor) -> Tensor:
    """Counts of ``values`` (log10, float32; overwritten) in the :data:`LOG_COLUMNS` bins:
    column ``floor((value - LOG_LOW) * LOG_BINS) + 1``, -inf (a zero) and anything below in
    column 0, +inf and anything above in the last; NaN is dropped. (``bincount`` of the columns:
    twice as fast as ``torch.histc`` on CPU.)"""
    values.sub_(LOG_LOW - 1.0 / LOG_BINS).mul_(LOG_BINS).clamp_(0, LOG_COLUMNS - 1)
    values.nan_to_num_(nan=LOG_COLUMNS)  # one column past the end, cut off below
    return torch.bincount(values.to(torch.int32), minlength=LOG_COLUMNS + 1)[:LOG_COLUMNS]


def _log_counts(
    moments: Sequence[ParamMoments],
    groups: Sequence[Sequence[int]],
    weights: Sequence[float],
    wanted: set[str],
    counting: bool,
    sums: _Sums,
    device: torch.device,
) -> Tensor | None:
    """One pass over every second-moment element: ``[2, groups, LOG_COLUMNS]`` counts of
    ``log10(sqrt(v_hat))`` (``[0]``) and ``log10(lr / (sqrt(v_hat) + eps))`` (``[1]``,
    Adam-like parameters only), or ``None`` without ``counting``; also adds the underflow
    counts (``v < eps^2``, in fp32) to ``sums``. Parameters of weight 0 (replicated ones on a
    rank other than zero) are left to rank zero. The last group (all parameters) is the sum of
    the layers' rows and of the parameters in no layer."""
    # Decided alike on every rank (each issues the same collective with the same columns).
    adaptive = [
        i for i, m in enumerate(moments) if m.second_moment is not None or m.factors is not None
    ]
    underflow = "second_moment_underflow" in wanted
    if not adaptive or not (counting or underflow):
        return None
    rest = len(groups) - 1
    row_of = {i: g for g, members in enumerate(groups[:-1]) for i in members}
    dtype = _counts_dtype(device)
    counts = torch.zeros(2, len(groups), LOG_COLUMNS, dtype=dtype, device=device)
    adam = [i for i in adaptive if moments[i].adam_like and weights[i] > 0]
    corrections = {}
    if adam:
        _, bias2 = _bias_corrections([moments[i] for i in adam], device)
        corrections = dict(zip(adam, bias2.to(torch.float32).unbind(), strict=True))
    below: list[Tensor] = []
    counted: list[int] = []
    for i in adaptive:
        m = moments[i]
        row = row_of.get(i, rest)
        eps2 = m.eps**2 if underflow and m.eps is not None and m.factors is None else None
        below_here = torch.zeros((), dtype=torch.int64, device=device)
        if weights[i] == 0:  # rank zero counts this replicated parameter
            if eps2 is not None:
                below.append(below_here)
                counted.append(i)
            continue
        log_lr = torch.tensor(
            math.log10(m.lr) if m.adam_like and m.lr > 0 else -math.inf, device=device
        )
        for chunk in _second_moment(m).split(CHUNK):
            x = chunk.to(torch.float32, copy=True)
            if eps2 is not None:
                below_here += torch.count_nonzero(x < eps2)
            if not counting:
                continue
            if i in corrections:
                x.div_(corrections[i])  # in place: 5x faster than x / 0-d tensor on CPU
            x.sqrt_()  # sqrt(v_hat)
            logs = torch.log10(x)
            counts[0, row] += _bin(logs)
            if i in corrections:
                torch.log10(x.add_(m.eps), out=logs)
                counts[1, row] += _bin(torch.sub(log_lr, logs, out=logs))
        if eps2 is not None:
            below.append(below_here)
            counted.append(i)
    if counted:
        sums.add("underflow", counted, torch.stack(below))
        sizes = [float(_second_moment_size(moments[i])) for i in counted]
        sums.add("numel", counted, torch.tensor(sizes, device=device))
    if not counting:
        return None
    counts[:, -1] += counts[:, :-1].sum(dim=1)  # all parameters: every layer and the rest
    return counts


def _second_moment_size(m: ParamMoments) -> int:
    if m.second_moment is not None:
        return m.second_moment.numel()
    row, col = m.factors
    return row.numel() * col.shape[-1]  # (..., R, 1) x (..., 1, C) elements


def _order_statistics(counts: Tensor, cumulative: Tensor, ranks: Tensor) -> Tensor:
    """The values at 0-based ``ranks [..., K]`` of the elements counted in ``counts [..., C]``
    (``cumulative`` its cumsum): within its bin, the ``j``-th of ``n`` elements is read at
    ``(j + 0.5) / n`` of the bin's width in log10; the bin below is 0, the bin above its edge."""
    index = torch.searchsorted(cumulative, ranks, right=True).clamp_max(LOG_COLUMNS - 1)
    in_bin = counts.gather(-1, index)
    before = cumulative.gather(-1, index) - in_bin
    share = ((ranks - before + 0.5) / in_bin.clamp_min(1)).clamp(0, 1)
    values = 10.0 ** (LOG_LOW + (index - 1 + share) / LOG_BINS)
    values = torch.where(index == 0, 0.0, values)
    return torch.where(index == LOG_COLUMNS - 1, 10.0**LOG_HIGH, values)


def _percentiles(counts: Tensor, percentiles: Sequence[float]) -> Tensor:
    """``numpy.percentile``'s linear interpolation of every row of ``counts [..., C]``: between
    the order statistics at ranks ``floor(r)`` and ``floor(r) + 1``, ``r = q / 100 (n - 1)``.
    Returns ``[..., len(percentiles)]`` (NaN-free garbage where a row is empty)."""
    cumulative = counts.cumsum(-1)
    total = cumulative[..., -1:]
    q = torch.tensor([p / 100 for p in percentiles], dtype=counts.dtype, device=counts.device)
    rank = q * (total - 1).clamp_min(0)
    low = rank.floor()
    high = torch.minimum(low + 1, (total - 1).clamp_min(0))
    both = _order_statistics(counts, cumulative, torch.cat([low, high], dim=-1))
    below, above = both.split(len(percentiles), dim=-1)
    return below + (above - below) * (rank - low)


def _coarse_histograms(counts: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's occupied fine bins (from its first to its last non-empty one) merged into
    ``bins`` equal bins: ``counts [R, bins]``, ``low [R]``, ``high [R]`` (log10 edges)."""
    occupied = counts > 0
    index = torch.arange(LOG_COLUMNS, device=counts.device)
    first = torch.where(occupied, index, LOG_COLUMNS).amin(dim=-1).clamp_max(LOG_COLUMNS - 1)
    last = torch.where(occupied, index, -1).amax(dim=-1).clamp_min(first)
    share = (index - first[:, None]) / (last - first + 1)[:, None]
    coarse = (share * bins).floor().clamp(0, bins - 1).long()
    inside = (index >= first[:, None]) & (index <= last[:, None])
    merged = torch.zeros(counts.shape[0], bins, dtype=counts.dtype, device=counts.device)
    merged.scatter_add_(1, coarse, torch.where(inside, counts, 0))
    low = LOG_LOW + (first - 1) / LOG_BINS
    high = LOG_LOW + last / LOG_BINS
    return merged, low.to(counts.dtype), high.to(counts.dtype)


@torch.no_grad()
def moment_statistics(
    moments: Sequence[ParamMoments],
    layers: Sequence[Sequence[int]],
    *,
    statistics: Sequence[str] = STATISTICS,
    percentiles: Sequence[float] = (5.0, 50.0, 95.0),
    histogram_bins: int = 0,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[dict[str, float]], list[GroupHistogram | None]]:
    """Statistics of each layer and of all parameters.

    ``layers[j]`` lists indices into ``moments`` (layers must not overlap; a parameter may be in
    none). Returns one ``{statistic: value}`` per layer plus a last one for all parameters, each
    with the keys its members contribute to: ``<state key>_norm``, ``first_moment_hat_norm``,
    ``sqrt_second_moment_<pXX>``, ``step_size_<pXX>``, ``update_to_weight``,
    ``second_moment_underflow``, ``grad_cosine`` (formulas in the module docstring). With
    ``histogram_bins > 0``, also a histogram of ``log10(step_size)`` per group (``None`` where
    no member is Adam-like).

    Percentiles count every element: ``log10`` of each one's ``sqrt(v_hat)`` and step size
    lands in a fixed bin of :data:`LOG_BINS` per decade (:func:`_log_counts`, one pass over the
    second moments, a few elementwise kernels and one ``bincount`` per :data:`CHUNK`), and each
    percentile is read from the counts on the device, as ``numpy.percentile`` interpolates
    between order statistics, each within 1.16% (a bin) of the exact one.

    Sharded state (FSDP2): ``moments`` hold this rank's shards (``ParamMoments.sharded``) and
    ``group`` is the process group they are split over. Every rank counts its shards (a
    replicated parameter counts once, on rank zero) and contributes its partial sums; the ranks
    exchange all of it as one packed buffer, one ``all_reduce`` (SUM), so every rank gets the
    same results, and the same as one process holding the whole tensors.
    """
    seen: set[int] = set()
    for j, members in enumerate(layers):
        if seen & set(members):
            raise ValueError(f"layers[{j}]: overlaps an earlier layer; allowed: disjoint layers")
        seen |= set(members)
    groups = [*layers, list(range(len(moments)))]
    if not moments:
        return [{} for _ in groups], [None for _ in groups]
    wanted = set(statistics)
    device = moments[0].param.device
    rank = dist.get_rank(group) if group is not None else 0
    weights = [1.0 if m.sharded or rank == 0 else 0.0 for m in moments]
    has_adam = [any(moments[i].adam_like for i in members) for members in groups]
    want_percentiles = bool(percentiles) and bool({"sqrt_second_moment", "step_size"} & wanted)
    histogram_bins = histogram_bins if any(has_adam) else 0

    sums = _norm_sums(moments, wanted, device)
    counts = _log_counts(
        moments,
        groups,
        weights,
        wanted,
        want_percentiles or histogram_bins > 0,
        sums,
        device,
    )
    reduced, contributors = sums.reduce(groups, len(moments), device, weights)
    buffer = _HostBuffer()
    buffer.pack("sums", reduced)  # [columns, groups]
    if counts is not None:
        if group is not None:  # the one collective: sums and counts in one buffer
            shared = torch.cat([reduced.reshape(-1).to(counts.dtype), counts.reshape(-1)])
            dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group)
            buffer = _HostBuffer()
            buffer.pack("sums", shared[: reduced.numel()].reshape(reduced.shape))
            counts = shared[reduced.numel() :].reshape(counts.shape)
            group = None
        buffer.pack("totals", counts.sum(dim=-1))  # [2, groups]
        if want_percentiles:
            buffer.pack(
                "quantiles", _percentiles(counts, percentiles).reshape(-1, len(percentiles))
            )
        if histogram_bins > 0:
            coarse, low, high = _coarse_histograms(counts[1], histogram_bins)
            buffer.pack("histogram_counts", coarse)  # [groups, bins]
            buffer.pack("histogram_low", low)  # [groups]
            buffer.pack("histogram_high", high)
    buffer.transfer(group)  # (with a group: the one collective) and the one device-to-host copy

    # --- decode on the host ---------------------------------------------------------------
    width = len(groups)
    sums_host = buffer["sums"]
    table = {name: (sums_host[c], contributors[c]) for c, name in enumerate(sums.columns)}
    results: list[dict[str, float]] = []
    for g in range(width):
        values = {name: column[g] for name, (column, present) in table.items() if present[g] > 0}
        results.append(_scalars(values, wanted))
    histograms: list[GroupHistogram | None] = [None] * width
    if "totals" not in buffer:
        return results, histograms
    roots_total, steps_total = buffer["totals"]
    if "quantiles" in buffer:
        quantiles = buffer["quantiles"]  # rows: roots of each group, then steps of each group
        for g in range(width):
            for k, p in enumerate(percentiles):
                label = percentile_label(p)
                if "sqrt_second_moment" in wanted and roots_total[g] > 0:
                    results[g][f"sqrt_second_moment_{label}"] = quantiles[g][k]
                if "step_size" in wanted and has_adam[g] and steps_total[g] > 0:
                    results[g][f"step_size_{label}"] = quantiles[width + g][k]
    if "histogram_counts" in buffer:
        counts_host = buffer["histogram_counts"]
        lows, highs = buffer["histogram_low"], buffer["histogram_high"]
        for g in range(width):
            if has_adam[g] and steps_total[g] > 0:
                histograms[g] = GroupHistogram(counts_host[g], lows[g], highs[g])
    return results, histograms


class _HostBuffer:
    """Device tensors packed under names into one flat buffer, so that all of them leave the
    device in one transfer; the host then reads each back by name (``buffer[name]``), as a list
    (1-D) or a list of rows (2-D), from the slice :meth:`pack` recorded for it."""

    def __init__(self) -> None:
        self._parts: list[Tensor] = []
        self._layout: dict[str, tuple[slice, tuple[int, ...]]] = {}
        self._size = 0
        self._host: list[float] = []

    def pack(self, name: str, tensor: Tensor) -> None:
        if tensor.ndim > 2:
            raise ValueError(f"{name}: got a {tensor.ndim}-d tensor; allowed: 1-d or 2-d")
        flat = tensor.reshape(-1)
        self._layout[name] = (slice(self._size, self._size + flat.numel()), tuple(tensor.shape))
        self._size += flat.numel()
        self._parts.append(flat)

    def transfer(self, group: dist.ProcessGroup | None = None) -> None:
        """The device-to-host copy (one ``cat`` on the device, one ``tolist``); with a
        ``group``, summed over its ranks first (one ``all_reduce``)."""
        if not self._parts:
            self._host = []
            return
        packed = torch.cat(self._parts)
        if group is not None:
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        self._host = packed.tolist()

    def __contains__(self, name: str) -> bool:
        return name in self._layout

    def __getitem__(self, name: str) -> list[Any]:
        where, shape = self._layout[name]
        values = self._host[where]
        if len(shape) < 2:
            return values
        rows, columns = shape
        return [values[r * columns : (r + 1) * columns] for r in range(rows)]


def _scalars(sums: dict[str, float], wanted: set[str]) -> dict[str, float]:
    """Statistics of one group from its sums (only those its members contribute to)."""
    result = {
        f"{name[5:]}_norm": math.sqrt(value)
        for name, value in sums.items()
        if name.startswith("norm:")
    }
    if "hat" in sums:
        result["first_moment_hat_norm"] = math.sqrt(sums["hat"])
    if "grad" in sums:
        result["grad_norm"] = math.sqrt(sums["grad"])
    if "param" in sums:
        result["weight_norm"] = math.sqrt(sums["param"])
    if "delta" in sums:
        delta, weight = math.sqrt(sums["delta"]), math.sqrt(sums["weight"])
        if "update_norm" in wanted:
            result["update_norm"] = delta
        if "update_to_weight" in wanted:
            result["update_to_weight"] = (
                delta / weight if weight > 0 else (math.inf if delta > 0 else 0.0)
            )
    if "dot" in sums and sums["cos_m"] > 0 and sums["cos_g"] > 0:
        result["grad_cosine"] = sums["dot"] / math.sqrt(sums["cos_m"] * sums["cos_g"])
    if "underflow" in sums:
        result["second_moment_underflow"] = sums["underflow"] / sums["numel"]
    return result
