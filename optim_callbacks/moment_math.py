"""Optimizer moment statistics as batched reductions, with every formula in one place.

Notation (Kingma & Ba 2015, "Adam", https://arxiv.org/abs/1412.6980; Zhuang et al. 2020,
"AdaBelief", https://arxiv.org/abs/2010.07468): ``m`` the first moment, ``v`` the second moment
(``exp_avg_sq``; AdaBelief's belief ``s = exp_avg_var``; ``max_...`` under AMSGrad), ``g`` the
gradient, ``t`` the optimizer's step count, ``beta1``, ``beta2``, ``lr``, ``eps``.

- bias correction: ``m_hat = m / (1 - beta1^t)``, ``v_hat = v / (1 - beta2^t)`` (Adam family;
  other adaptive optimizers keep ``v_hat = v``)
- effective per-element step size: ``lr / (sqrt(v_hat) + eps)``; Adam's update is
  ``-step_size * m_hat``
- update-to-weight ratio: ``||theta_t - theta_{t-1}|| / ||theta_{t-1}||``
- second-moment underflow: the fraction of entries with ``v < eps^2``, i.e. ``sqrt(v) < eps``:
  ``eps`` dominates the denominator, and in fp16 these entries are exactly zero
- gradient cosine: ``<m, g> / (||m|| ||g||)``

How it stays cheap: norms are taken per tensor by one ``torch._foreach_norm`` call, summed per
group (layer, or all parameters) by one matrix product with a 0/1 membership matrix, and
percentiles come from one ``torch.nanquantile`` pass over a NaN-padded ``[groups, samples]``
matrix. A group with more than ``max_samples`` elements is sampled uniformly (with replacement,
each tensor in proportion to its size); smaller groups are used whole, so their percentiles
are exact. Every result leaves the device in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "STATISTICS",
    "GroupHistogram",
    "ParamMoments",
    "moment_statistics",
    "percentile_label",
]

STATISTICS: tuple[str, ...] = (
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

    ``states`` are the tensors whose L2 norm is logged (by state key); ``second_moment`` is the
    tensor the update divides by; ``betas`` set means the optimizer bias-corrects with them at
    step ``step``; ``before`` is the parameter before the step (for the update-to-weight ratio).
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

    @property
    def bias_corrected(self) -> bool:
        return self.betas is not None and self.step is not None


@dataclass(frozen=True)
class GroupHistogram:
    """Counts of ``log10(step_size)`` in ``len(counts)`` equal bins between ``low`` and ``high``."""

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


class _Columns:
    """Per-parameter values (``[C, P]``) plus how many parameters contributed to each column."""

    def __init__(self, num_params: int, device: torch.device) -> None:
        self.num_params = num_params
        self.device = device
        self.names: list[str] = []
        self.values: list[Tensor] = []
        self.contributors: list[list[int]] = []

    def add(self, name: str, indices: list[int], values: Tensor) -> None:
        if not indices:
            return
        column = torch.zeros(self.num_params, dtype=torch.float32, device=self.device)
        index = torch.tensor(indices, device=self.device)
        self.names.append(name)
        self.values.append(column.index_copy_(0, index, values.to(torch.float32)))
        self.contributors.append(indices)


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


def _flat(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1).to(torch.float32)


def _sample(
    tensors: list[Tensor], max_samples: int, generator: torch.Generator | None
) -> list[Tensor]:
    """All elements of ``tensors`` when they fit in ``max_samples``, else a uniform sample of
    about ``max_samples`` (each tensor in proportion to its size). Returns flat fp32 pieces."""
    total = sum(t.numel() for t in tensors)
    if total <= max_samples:
        return [_flat(t) for t in tensors]
    pieces = []
    for tensor in tensors:
        count = max(1, round(max_samples * tensor.numel() / total))
        device = generator.device if generator is not None else tensor.device
        index = torch.randint(tensor.numel(), (count,), generator=generator, device=device)
        pieces.append(_flat(tensor)[index.to(tensor.device)])
    return pieces


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
    groups: Sequence[Sequence[int]],
    *,
    statistics: Sequence[str] = STATISTICS,
    percentiles: Sequence[float] = (5.0, 50.0, 95.0),
    max_samples: int = 4096,
    histogram_bins: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, float]], list[GroupHistogram | None]]:
    """Statistics of each group of parameters (``groups[i]`` lists indices into ``moments``).

    Returns, per group, ``{statistic key: value}`` (only keys some member contributes to; see
    the module docstring for the formulas) and, with ``histogram_bins > 0``, a histogram of
    ``log10(step_size)`` (``None`` where the group has no Adam-family parameter).
    Keys: ``<state key>_norm``, ``first_moment_hat_norm``, ``sqrt_second_moment_<pXX>``,
    ``step_size_<pXX>``, ``update_to_weight``, ``second_moment_underflow``, ``grad_cosine``.
    """
    wanted = set(statistics)
    if not moments or not groups:
        return [{} for _ in groups], [None for _ in groups]
    device = moments[0].param.device
    count = len(moments)

    # --- one foreach norm over every tensor some statistic needs -----------------------
    norm_inputs: list[Tensor] = []
    norm_slot: dict[int, int] = {}

    def slot(tensor: Tensor) -> int:
        key = id(tensor)
        if key not in norm_slot:
            norm_slot[key] = len(norm_inputs)
            norm_inputs.append(tensor.detach())
        return norm_slot[key]

    state_slots: dict[str, list[tuple[int, int]]] = {}
    if "state_norm" in wanted:
        for i, m in enumerate(moments):
            for key, tensor in m.states.items():
                state_slots.setdefault(key, []).append((i, slot(tensor)))
    moved = [i for i, m in enumerate(moments) if m.before is not None]
    update_slots: list[tuple[int, int, int]] = []
    if "update_to_weight" in wanted and moved:
        deltas = torch._foreach_sub(
            [moments[i].param.detach() for i in moved], [moments[i].before for i in moved]
        )
        update_slots = [
            (i, slot(d), slot(moments[i].before)) for i, d in zip(moved, deltas, strict=True)
        ]
    cosine = [i for i, m in enumerate(moments) if m.first_moment is not None and m.grad is not None]
    cosine_slots: list[tuple[int, int, int]] = []
    if "grad_cosine" in wanted:
        cosine_slots = [(i, slot(moments[i].first_moment), slot(moments[i].grad)) for i in cosine]
    adam = [i for i, m in enumerate(moments) if m.bias_corrected and m.second_moment is not None]
    hat_slots: list[tuple[int, int]] = []
    if "first_moment_hat_norm" in wanted:
        hat_slots = [
            (i, slot(moments[i].first_moment)) for i in adam if moments[i].first_moment is not None
        ]
    squares = (
        torch.stack(torch._foreach_norm(norm_inputs, 2, dtype=torch.float32)).square()
        if norm_inputs
        else torch.zeros(0, device=device)
    )

    def gather(slots: list[int]) -> Tensor:
        return squares[torch.tensor(slots, dtype=torch.long, device=device)]

    bias1 = bias2 = torch.ones(count, device=device)
    if adam:
        b1, b2 = _bias_corrections([moments[i] for i in adam], device)
        index = torch.tensor(adam, device=device)
        bias1 = torch.ones(count, dtype=b1.dtype, device=device).index_copy_(0, index, b1)
        bias2 = torch.ones(count, dtype=b2.dtype, device=device).index_copy_(0, index, b2)

    # --- per-parameter columns, summed per group by one matrix product --------------------
    columns = _Columns(count, device)
    for key, pairs in state_slots.items():
        columns.add(f"norm:{key}", [i for i, _ in pairs], gather([s for _, s in pairs]))
    if hat_slots:
        idx = [i for i, _ in hat_slots]
        correction = bias1[torch.tensor(idx, device=device)]
        columns.add("hat", idx, gather([s for _, s in hat_slots]) / correction.square())
    if update_slots:
        idx = [i for i, _, _ in update_slots]
        columns.add("delta", idx, gather([s for _, s, _ in update_slots]))
        columns.add("weight", idx, gather([s for _, _, s in update_slots]))
    if cosine_slots:
        idx = [i for i, _, _ in cosine_slots]
        dots = torch.stack(
            [torch.vdot(_flat(moments[i].first_moment), _flat(moments[i].grad)) for i in idx]
        )
        columns.add("dot", idx, dots)
        columns.add("cos_m", idx, gather([s for _, s, _ in cosine_slots]))
        columns.add("cos_g", idx, gather([s for _, _, s in cosine_slots]))
    underflow = [
        i for i, m in enumerate(moments) if m.second_moment is not None and m.eps is not None
    ]
    if "second_moment_underflow" in wanted and underflow:
        # Compare in fp32: in fp16 eps^2 itself rounds to zero.
        below = torch.stack(
            [
                torch.count_nonzero(
                    moments[i].second_moment.to(torch.float32) < moments[i].eps ** 2
                )
                for i in underflow
            ]
        )
        columns.add("underflow", underflow, below)
        sizes = torch.tensor(
            [float(moments[i].second_moment.numel()) for i in underflow], device=device
        )
        columns.add("numel", underflow, sizes)

    membership = torch.zeros(count, len(groups), dtype=torch.float32)
    for g, members in enumerate(groups):
        membership[list(members), g] = 1.0
    membership = membership.to(device)
    sums = (
        torch.stack(columns.values) @ membership
        if columns.values
        else torch.zeros(0, len(groups), device=device)
    )
    contributor_sets = [set(contrib) for contrib in columns.contributors]
    contributors = [
        [sum(1 for i in members if i in c) for members in groups] for c in contributor_sets
    ]

    # --- percentiles of sampled elements: one nanquantile pass -----------------------------
    want_sqrt = "sqrt_second_moment" in wanted
    want_step = "step_size" in wanted or histogram_bins > 0
    rows: list[Tensor] = []
    row_kind: list[tuple[str, int]] = []
    adam_set = set(adam)
    if want_sqrt or want_step:
        adaptive = {i for i, m in enumerate(moments) if m.second_moment is not None}
        for g, members in enumerate(groups):
            inside = [i for i in members if i in adaptive]
            if not inside:
                continue
            pieces = _sample([moments[i].second_moment for i in inside], max_samples, generator)
            roots = [
                (piece / bias2[i].to(torch.float32)).sqrt()
                for i, piece in zip(inside, pieces, strict=True)
            ]
            if want_sqrt:
                rows.append(torch.cat(roots))
                row_kind.append(("sqrt_second_moment", g))
            steps = [
                moments[i].lr / (root + moments[i].eps)
                for i, root in zip(inside, roots, strict=True)
                if i in adam_set and moments[i].lr is not None and moments[i].eps is not None
            ]
            if want_step and steps:
                rows.append(torch.cat(steps))
                row_kind.append(("step_size", g))
    outputs = [sums.flatten()]
    quantiles = torch.zeros(0, device=device)
    if rows:
        padded = pad_sequence(rows, batch_first=True, padding_value=math.nan)
        if percentiles and ("sqrt_second_moment" in wanted or "step_size" in wanted):
            q = torch.tensor([p / 100 for p in percentiles], dtype=padded.dtype, device=device)
            quantiles = torch.nanquantile(padded, q, dim=1)  # [Q, rows]
            outputs.append(quantiles.flatten())
        step_rows = [r for r, (kind, _) in enumerate(row_kind) if kind == "step_size"]
        if histogram_bins > 0 and step_rows:
            logs = padded[torch.tensor(step_rows, device=device)].log10()
            counts, low, high = _row_histograms(logs, histogram_bins)
            outputs += [counts.flatten(), low, high]
    host = torch.cat([o.to(torch.float32) for o in outputs]).tolist()  # the one device-to-host sync

    # --- decode on the host -----------------------------------------------------------------
    results: list[dict[str, float]] = [{} for _ in groups]
    position = 0
    width = len(groups)
    table = {}
    for name, counts in zip(columns.names, contributors, strict=True):
        table[name] = (host[position : position + width], counts)
        position += width
    for g, result in enumerate(results):

        def value(name: str, g: int = g) -> float | None:
            entry = table.get(name)
            return entry[0][g] if entry is not None and entry[1][g] > 0 else None

        for name in table:
            if name.startswith("norm:") and value(name) is not None:
                result[f"{name[5:]}_norm"] = math.sqrt(value(name))
        if value("hat") is not None:
            result["first_moment_hat_norm"] = math.sqrt(value("hat"))
        if value("delta") is not None:
            delta, weight = math.sqrt(value("delta")), math.sqrt(value("weight"))
            result["update_to_weight"] = (
                delta / weight if weight > 0 else (math.inf if delta > 0 else 0.0)
            )
        if value("dot") is not None and value("cos_m") > 0 and value("cos_g") > 0:
            result["grad_cosine"] = value("dot") / math.sqrt(value("cos_m") * value("cos_g"))
        if value("underflow") is not None:
            result["second_moment_underflow"] = value("underflow") / value("numel")
    if quantiles.numel():
        values = host[position : position + quantiles.numel()]
        position += quantiles.numel()
        for r, (kind, g) in enumerate(row_kind):
            if kind in wanted:
                for k, p in enumerate(percentiles):
                    results[g][f"{kind}_{percentile_label(p)}"] = values[k * len(row_kind) + r]
    histograms: list[GroupHistogram | None] = [None for _ in groups]
    if histogram_bins > 0 and rows:
        step_groups = [g for kind, g in row_kind if kind == "step_size"]
        n = len(step_groups)
        if n:
            counts = host[position : position + n * histogram_bins]
            lows = host[position + n * histogram_bins : position + n * histogram_bins + n]
            highs = host[position + n * histogram_bins + n : position + n * histogram_bins + 2 * n]
            for r, g in enumerate(step_groups):
                histograms[g] = GroupHistogram(
                    counts[r * histogram_bins : (r + 1) * histogram_bins], lows[r], highs[r]
                )
    return results, histograms
