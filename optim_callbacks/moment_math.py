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
layer by one matrix product with a 0/1 membership matrix. Percentiles come from one
``torch.nanquantile`` pass over a NaN-padded ``[layers, samples]`` matrix, gathered with one
index from the concatenated second moments: a layer of at most ``max_samples`` elements is used
whole (exact percentiles), a larger one is sampled uniformly, with replacement, ``max_samples``
times. Every result leaves the device in one transfer.
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
    # materialized: sampled elements are computed from the factors.
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


@dataclass
class _SecondMoments:
    """The second moments of all adaptive parameters, concatenated group by group, so each
    layer is a contiguous range of positions; position ``total`` stands for "no element".

    Element-wise second moments are stored in ``flat`` (NaN at its end); factored ones
    (:attr:`ParamMoments.factors`) occupy positions but no storage: :meth:`gather` computes
    their elements from the factors.
    """

    flat: Tensor
    order: list[int]  # indices into ``moments``, in concatenation order
    sizes: list[int]
    starts: list[int]  # per group: first position
    counts: list[int]  # per group: number of elements
    stored: Tensor  # per order entry: its start in ``flat``, or -1 when factored
    factored: _Factors | None = None

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def gather(self, index: Tensor) -> Tensor:
        """The second-moment values at positions ``index`` (NaN at position ``total``)."""
        device = index.device
        sizes = torch.tensor(self.sizes, device=device)
        ends = sizes.cumsum(0)
        owner = torch.searchsorted(ends, index, right=True).clamp_max(len(self.sizes) - 1)
        local = index - (ends[owner] - sizes[owner])
        start = self.stored.to(device)[owner]
        values = self.flat[(start + local).clamp(0, self.flat.numel() - 1)]
        if self.factored is not None:
            values = torch.where(start < 0, self.factored.values(owner, local), values)
        return torch.where(index >= self.total, math.nan, values)


@dataclass
class _Factors:
    """The factored second moments' normalized rows and columns, concatenated, with where each
    parameter's start and its ``R`` and ``C`` (per order entry; zeros for stored ones)."""

    rows: Tensor  # row / mean(row) per leading index, flattened
    cols: Tensor
    row_start: Tensor
    col_start: Tensor
    n_rows: Tensor
    n_cols: Tensor

    def values(self, owner: Tensor, local: Tensor) -> Tensor:
        """``v`` at element ``local`` (row-major in ``(..., R, C)``) of parameter ``owner``."""
        n_rows = self.n_rows[owner].clamp_min(1)
        n_cols = self.n_cols[owner].clamp_min(1)
        batch, rest = local // (n_rows * n_cols), local % (n_rows * n_cols)
        row = (self.row_start[owner] + batch * n_rows + rest // n_cols).clamp(
            0, self.rows.numel() - 1
        )
        col = (self.col_start[owner] + batch * n_cols + rest % n_cols).clamp(
            0, self.cols.numel() - 1
        )
        return self.rows[row] * self.cols[col]


def _factors(
    moments: Sequence[ParamMoments], order: list[int], device: torch.device
) -> _Factors | None:
    factored = [k for k, i in enumerate(order) if moments[i].factors is not None]
    if not factored:
        return None
    zeros = [0] * len(order)
    row_start, col_start, n_rows, n_cols = list(zeros), list(zeros), list(zeros), list(zeros)
    rows, cols, r_pos, c_pos = [], [], 0, 0
    for k in factored:
        row, col = moments[order[k]].factors
        row32 = row.detach().to(torch.float32)
        rows.append((row32 / row32.mean(dim=-2, keepdim=True)).reshape(-1))
        cols.append(_fp32(col))
        row_start[k], col_start[k] = r_pos, c_pos
        n_rows[k], n_cols[k] = row.shape[-2], col.shape[-1]
        r_pos += row.numel()
        c_pos += col.numel()

    def as_tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, device=device)

    return _Factors(
        torch.cat(rows),
        torch.cat(cols),
        as_tensor(row_start),
        as_tensor(col_start),
        as_tensor(n_rows),
        as_tensor(n_cols),
    )


def _size(m: ParamMoments) -> int:
    if m.second_moment is not None:
        return m.second_moment.numel()
    row, col = m.factors
    return row.numel() * col.shape[-1]  # (..., R, 1) x (..., 1, C) elements


def _concatenate(
    moments: Sequence[ParamMoments], groups: Sequence[Sequence[int]], device: torch.device
) -> _SecondMoments | None:
    layer_of = {i: g for g, members in enumerate(groups[:-1]) for i in members}
    adaptive = [
        i for i, m in enumerate(moments) if m.second_moment is not None or m.factors is not None
    ]
    if not adaptive:
        return None
    order = sorted(adaptive, key=lambda i: layer_of.get(i, len(groups)))
    sizes = [_size(moments[i]) for i in order]
    nan = torch.full((1,), math.nan, device=device)
    stored_parts = [_fp32(moments[i].second_moment) for i in order if moments[i].factors is None]
    flat = torch.cat([*(p.flatten() for p in stored_parts), nan])
    stored, position = [], 0
    for i in order:
        if moments[i].factors is None:
            stored.append(position)
            position += moments[i].second_moment.numel()
        else:
            stored.append(-1)
    starts, counts, position = [], [], 0
    sizes_by_group = [0] * len(groups)
    for i, size in zip(order, sizes, strict=True):
        if i in layer_of:
            sizes_by_group[layer_of[i]] += size
    for g in range(len(groups) - 1):
        starts.append(position)
        counts.append(sizes_by_group[g])
        position += sizes_by_group[g]
    starts.append(0)  # all parameters
    counts.append(sum(sizes))
    return _SecondMoments(
        flat,
        order,
        sizes,
        starts,
        counts,
        torch.tensor(stored, device=device),
        _factors(moments, order, device),
    )


def _underflow_sums(moments: Sequence[ParamMoments], second: _SecondMoments, sums: _Sums) -> None:
    """Count ``v < eps^2`` per parameter with a stored second moment and an eps, in fp32 (in
    fp16, eps^2 itself would round to 0)."""
    stored = [k for k, i in enumerate(second.order) if moments[i].factors is None]
    with_eps = [k for k in stored if moments[second.order[k]].eps is not None]
    if not with_eps:
        return
    values = second.flat[:-1]
    stored_sizes = [second.sizes[k] for k in stored]
    eps = {moments[second.order[k]].eps for k in stored}
    if len(eps) == 1:
        below = values < (next(iter(eps)) or 0.0) ** 2
    else:
        eps2 = torch.tensor(
            [(moments[second.order[k]].eps or 0.0) ** 2 for k in stored], device=values.device
        )
        below = values < eps2.repeat_interleave(torch.tensor(stored_sizes, device=values.device))
    counts = torch.stack([torch.count_nonzero(part) for part in below.split(stored_sizes)])
    picked = torch.tensor([stored.index(k) for k in with_eps], device=values.device)
    sums.add("underflow", [second.order[k] for k in with_eps], counts[picked])
    sizes = torch.tensor([float(second.sizes[k]) for k in with_eps], device=values.device)
    sums.add("numel", [second.order[k] for k in with_eps], sizes)


def _sampled_rows(
    moments: Sequence[ParamMoments],
    second: _SecondMoments,
    max_samples: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """``sqrt(v_hat)`` and step size of up to ``max_samples`` elements per group, NaN-padded:
    two ``[groups, width]`` matrices (step size NaN where the optimizer is not Adam-like)."""
    device = second.flat.device
    total = second.total
    starts = torch.tensor(second.starts, device=device)
    counts = torch.tensor(second.counts, device=device)
    width = max(1, min(max_samples, max(second.counts)))
    column = torch.arange(width, device=device)[None, :]
    exact = (counts <= max_samples)[:, None]
    uniform = torch.rand(
        len(second.counts), width, generator=generator, device=generator.device
    ).to(device)
    offset = torch.where(
        exact, column, (uniform * counts[:, None]).long().clamp_max(counts[:, None] - 1)
    )
    valid = torch.where(exact, column < counts[:, None], counts[:, None] > 0)
    index = torch.where(valid, starts[:, None] + offset, total)
    values = second.gather(index)

    # Which parameter each sampled element belongs to, for its bias correction, lr and eps.
    ends = torch.tensor(second.sizes, device=device).cumsum(0)
    owner = torch.searchsorted(ends, index, right=True).clamp_max(len(second.order) - 1)
    return _roots_and_steps([moments[i] for i in second.order], values, owner)


def _roots_and_steps(
    params: Sequence[ParamMoments], values: Tensor, owner: Tensor
) -> tuple[Tensor, Tensor]:
    """``sqrt(v_hat)`` and the step size ``lr / (sqrt(v_hat) + eps)`` of second-moment
    ``values``, element ``k`` belonging to ``params[owner[k]]`` (step size NaN where that
    parameter is not Adam-like; ``v_hat = v`` without bias correction)."""
    device = values.device
    adam = [m.adam_like for m in params]
    bias2 = torch.ones(
        len(params), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device
    )
    if any(adam):
        picked = torch.tensor([k for k, a in enumerate(adam) if a], device=device)
        _, corrections = _bias_corrections(
            [m for m, a in zip(params, adam, strict=True) if a], device
        )
        bias2 = bias2.index_copy(0, picked, corrections.to(bias2.dtype))
    roots = (values / bias2.to(torch.float32)[owner]).sqrt()
    lr = torch.tensor(
        [m.lr if a else math.nan for m, a in zip(params, adam, strict=True)], device=device
    )
    eps = torch.tensor(
        [m.eps if a else math.nan for m, a in zip(params, adam, strict=True)], device=device
    )
    steps = lr[owner] / (roots + eps[owner])
    return roots, steps


def _row_histograms(rows: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row histograms of a NaN-padded matrix without a host sync: ``counts [R, bins]``,
    ``low [R]``, ``high [R]`` (each row binned between its own min and max)."""
    valid = ~torch.isnan(rows)
    low = torch.where(valid, rows, math.inf).amin(dim=1)
    high = torch.where(valid, rows, -math.inf).amax(dim=1)
    width = (high - low).clamp_min(1e-12)
    position = ((rows - low[:, None]) / width[:, None] * bins).floor().clamp(0, bins - 1)
    position = torch.where(valid, position, 0).to(torch.long)
    counts = torch.zeros(rows.shape[0], bins, device=rows.device).scatter_add_(
        1, position, valid.float()
    )
    return counts, low, high


@torch.no_grad()
def moment_statistics(
    moments: Sequence[ParamMoments],
    layers: Sequence[Sequence[int]],
    *,
    statistics: Sequence[str] = STATISTICS,
    percentiles: Sequence[float] = (5.0, 50.0, 95.0),
    max_samples: int = 1024,
    histogram_bins: int = 0,
    generator: torch.Generator | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[dict[str, float]], list[GroupHistogram | None]]:
    """Statistics of each layer and of all parameters.

    ``layers[j]`` lists indices into ``moments`` (layers must not overlap; a parameter may be in
    none). Returns one ``{statistic: value}`` per layer plus a last one for all parameters, each
    with the keys its members contribute to: ``<state key>_norm``, ``first_moment_hat_norm``,
    ``sqrt_second_moment_<pXX>``, ``step_size_<pXX>``, ``update_to_weight``,
    ``second_moment_underflow``, ``grad_cosine`` (formulas in the module docstring). With
    ``histogram_bins > 0``, also a histogram of ``log10(step_size)`` per group (``None`` where
    no member is Adam-like). Sampling uses ``generator`` (default: a fresh one seeded with 0, so
    the global random state that training relies on is never consumed).

    Sharded state (FSDP2): ``moments`` hold this rank's shards (``ParamMoments.sharded``) and
    ``group`` is the process group they are split over. Every rank then contributes its
    partial sums and counts in fixed log-spaced bins (:data:`LOG_BINS` per decade from
    1e:data:`LOG_LOW` to 1e:data:`LOG_HIGH`) of every element of a layer of at most
    ``max_samples`` elements, or of its shard's share of ``max_samples`` uniform draws; the ranks
    exchange all of it as one packed buffer, one ``all_reduce`` (SUM). Percentiles are read from
    the summed counts, linearly interpolated as ``numpy.percentile`` does: for whole layers each
    order statistic is within half a bin (1.2% relative) of the exact one; sampled layers add
    the sampling error the unsharded path has too. Replicated parameters count once (rank
    zero's). Every rank gets the same results.
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
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)

    sums = _norm_sums(moments, wanted, device)
    second = _concatenate(moments, groups, device)
    if second is not None and "second_moment_underflow" in wanted:
        _underflow_sums(moments, second, sums)
    rank = dist.get_rank(group) if group is not None else 0
    weights = [1.0 if m.sharded or rank == 0 else 0.0 for m in moments]
    reduced, contributors = sums.reduce(groups, len(moments), device, weights)
    width = len(groups)
    buffer = _HostBuffer()
    buffer.pack("sums", reduced)  # [columns, groups]

    want_percentiles = bool(percentiles) and bool({"sqrt_second_moment", "step_size"} & wanted)
    has_adam = [any(moments[i].adam_like for i in members) for members in groups]
    if group is not None:
        if second is not None and (want_percentiles or histogram_bins > 0):
            log_counts = _log_histograms(moments, second, groups, weights, max_samples, generator)
            buffer.pack("log_counts", log_counts)
        buffer.transfer(group)  # the one collective, and the one device-to-host copy
        return _sharded_results(
            buffer, sums, contributors, wanted, percentiles, histogram_bins, has_adam, second
        )
    if second is not None and (want_percentiles or histogram_bins > 0):
        roots, steps = _sampled_rows(moments, second, max_samples, generator)
        if want_percentiles:
            q = torch.tensor([p / 100 for p in percentiles], dtype=roots.dtype, device=device)
            quantiles = torch.nanquantile(torch.cat([roots, steps]), q, dim=1)  # [Q, 2 * groups]
            buffer.pack("sqrt_second_moment_quantiles", quantiles[:, :width])  # [Q, groups]
            buffer.pack("step_size_quantiles", quantiles[:, width:])
        if histogram_bins > 0 and any(has_adam):
            counts, low, high = _row_histograms(steps.log10(), histogram_bins)
            buffer.pack("histogram_counts", counts)  # [groups, bins]
            buffer.pack("histogram_low", low)  # [groups]
            buffer.pack("histogram_high", high)
    buffer.transfer()  # the one device-to-host copy

    # --- decode on the host ---------------------------------------------------------------
    sums_host = buffer["sums"]
    table = {name: (sums_host[c], contributors[c]) for c, name in enumerate(sums.columns)}
    results: list[dict[str, float]] = []
    for g in range(width):
        values = {name: column[g] for name, (column, present) in table.items() if present[g] > 0}
        results.append(_scalars(values, wanted))
    if "sqrt_second_moment_quantiles" in buffer:
        roots_q = buffer["sqrt_second_moment_quantiles"]
        steps_q = buffer["step_size_quantiles"]
        for g in range(width):
            for k, p in enumerate(percentiles):
                label = percentile_label(p)
                if "sqrt_second_moment" in wanted and second.counts[g] > 0:
                    results[g][f"sqrt_second_moment_{label}"] = roots_q[k][g]
                if "step_size" in wanted and has_adam[g]:
                    results[g][f"step_size_{label}"] = steps_q[k][g]
    histograms: list[GroupHistogram | None] = [None] * width
    if "histogram_counts" in buffer:
        counts_host, lows, highs = (
            buffer["histogram_counts"],
            buffer["histogram_low"],
            buffer["histogram_high"],
        )
        for g in range(width):
            if has_adam[g]:
                histograms[g] = GroupHistogram(counts_host[g], lows[g], highs[g])
    return results, histograms


# Sharded percentiles: log10 of sqrt(v_hat) and of the step size binned in fixed bins, plus one
# bin below (zeros included) and one above.
LOG_LOW, LOG_HIGH, LOG_BINS = -16.0, 6.0, 100  # bins per decade: 2.3% wide


def _log_histograms(
    moments: Sequence[ParamMoments],
    second: _SecondMoments,
    groups: Sequence[Sequence[int]],
    weights: Sequence[float],
    max_samples: int,
    generator: torch.Generator,
) -> Tensor:
    """``[2 * groups, bins + 2]`` weighted counts: rows ``g`` sqrt(v_hat), rows ``groups + g``
    the step size (Adam-like parameters only). A layer of at most ``max_samples`` elements (in
    all shards) counts every element, as the unsharded path does; a larger one is sampled:
    each rank draws, with replacement, its shard's share of ``max_samples`` from each of its
    parameters, each draw weighted by the elements it stands for. The last row of each half
    (all parameters) is the sum of the layers' rows and of the parameters in no layer."""
    device = second.flat.device
    params = [moments[i] for i in second.order]
    layer_of = {i: g for g, members in enumerate(groups[:-1]) for i in members}
    rest = len(groups) - 1  # the row of parameters in no layer, summed into "all" below
    row_of = [layer_of.get(i, rest) for i in second.order]
    whole = [m.global_numel if m.global_numel is not None else m.param.numel() for m in params]
    in_group = [0] * len(groups)
    for row, size in zip(row_of, whole, strict=True):
        in_group[row] += size
    picks, owners, draw_weights = [], [], []
    start = 0
    for k, size in enumerate(second.sizes):
        if size:
            if in_group[row_of[k]] <= max_samples:
                index = torch.arange(start, start + size, device=device)
                weight = 1.0
            else:
                draws = max(1, math.ceil(max_samples * size / in_group[row_of[k]]))
                uniform = torch.rand(draws, generator=generator, device=generator.device)
                index = start + (uniform.to(device) * size).long().clamp_max(size - 1)
                weight = size / draws
            picks.append(index)
            owners.append(torch.full_like(index, k))
            draw_weights.append(torch.full((index.numel(),), weight * weights[second.order[k]]))
        start += size
    columns = int((LOG_HIGH - LOG_LOW) * LOG_BINS) + 2
    counts = torch.zeros(2 * len(groups) * columns, device=device)
    if not picks:
        return counts.reshape(2 * len(groups), columns)
    index, owner = torch.cat(picks), torch.cat(owners)
    weight = torch.cat(draw_weights).to(device)
    roots, steps = _roots_and_steps(params, second.gather(index), owner)
    rows = torch.tensor(row_of, device=device)[owner]
    for offset, series in ((0, roots), (len(groups), steps)):
        valid = ~torch.isnan(series)
        position = ((series.log10() - LOG_LOW) * LOG_BINS).floor() + 1
        position = position.nan_to_num(0.0, posinf=columns - 1, neginf=0.0)
        position = position.clamp(0, columns - 1).long()
        flat = (offset + rows) * columns + position
        counts.index_add_(0, flat[valid], weight[valid])
    counts = counts.reshape(2, len(groups), columns)
    counts[:, -1] += counts[:, :-1].sum(dim=1)  # all parameters: every layer and the rest
    return counts.reshape(2 * len(groups), columns)


def _bin_value(index: int) -> float:
    """The value a log bin stands for: its geometric center (0 below, the top edge above)."""
    bins = int((LOG_HIGH - LOG_LOW) * LOG_BINS)
    if index == 0:
        return 0.0
    if index > bins:
        return 10.0**LOG_HIGH
    return 10.0 ** (LOG_LOW + (index - 0.5) / LOG_BINS)


def _histogram_percentile(counts: Sequence[float], q: float) -> float:
    """``numpy.percentile``'s linear interpolation between the order statistics at ranks
    ``floor(r)`` and ``floor(r) + 1``, ``r = q / 100 * (n - 1)``, each read as its bin's value."""
    total = round(sum(counts))
    rank = q / 100.0 * (total - 1)
    low = math.floor(rank)
    wanted = (low, min(low + 1, total - 1))
    found: list[float] = []
    cumulative = 0.0
    for index, count in enumerate(counts):
        cumulative += count
        while len(found) < 2 and cumulative > wanted[len(found)]:
            found.append(_bin_value(index))
        if len(found) == 2:
            break
    return found[0] + (found[1] - found[0]) * (rank - low)


def _coarse_histogram(counts: Sequence[float], bins: int) -> GroupHistogram:
    """The fine log bins that hold elements, merged into ``bins`` equal bins (for W&B)."""
    nonzero = [i for i, c in enumerate(counts) if c > 0]
    first, last = nonzero[0], nonzero[-1]
    low = LOG_LOW + (first - 1) / LOG_BINS
    high = LOG_LOW + last / LOG_BINS
    coarse = [0.0] * bins
    for index in nonzero:
        share = (index - first) / max(1, last - first + 1)
        coarse[min(bins - 1, int(share * bins))] += counts[index]
    return GroupHistogram(coarse, low, high)


def _sharded_results(
    buffer: _HostBuffer,
    sums: _Sums,
    contributors: list[list[int]],
    wanted: set[str],
    percentiles: Sequence[float],
    histogram_bins: int,
    has_adam: list[bool],
    second: _SecondMoments | None,
) -> tuple[list[dict[str, float]], list[GroupHistogram | None]]:
    """Decode the summed buffer of the sharded path (see :func:`moment_statistics`)."""
    sums_host = buffer["sums"]
    width = len(has_adam)
    table = {name: (sums_host[c], contributors[c]) for c, name in enumerate(sums.columns)}
    results: list[dict[str, float]] = []
    for g in range(width):
        values = {name: column[g] for name, (column, present) in table.items() if present[g] > 0}
        results.append(_scalars(values, wanted))
    histograms: list[GroupHistogram | None] = [None] * width
    if "log_counts" not in buffer:
        return results, histograms
    rows = buffer["log_counts"]
    for g in range(width):
        roots, steps = rows[g], rows[width + g]
        for p in percentiles:
            label = percentile_label(p)
            if "sqrt_second_moment" in wanted and sum(roots) > 0:
                results[g][f"sqrt_second_moment_{label}"] = _histogram_percentile(roots, p)
            if "step_size" in wanted and has_adam[g] and sum(steps) > 0:
                results[g][f"step_size_{label}"] = _histogram_percentile(steps, p)
        if histogram_bins > 0 and has_adam[g] and sum(steps) > 0:
            histograms[g] = _coarse_histogram(steps, histogram_bins)
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
