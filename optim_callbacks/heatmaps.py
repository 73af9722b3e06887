"""Layers x steps heatmaps of a :class:`~optim_callbacks.moment_history.MomentHistory`, as PNG.

One picture per statistic: a row per layer (module order, top to bottom), a column per logged
step, the colour the statistic's value. The colour scale is logarithmic where the statistic's
positive values span two decades or more (norms, step sizes, update/weight ratios), linear
otherwise (fractions, cosines); missing values are grey. Events are drawn over the picture: the
optimizer switch as a vertical line; heavy clipping, skipped non-finite steps and skipped spikes
as markers in three rows above the top row.

matplotlib (the ``plots`` extra: ``pip install 'optim-callbacks[plots]'``) is imported only
here, when a picture is drawn; figures are saved through Agg, never shown, and the process's
backend is left as it is.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from optim_callbacks.moment_history import MomentEvent, MomentHistory

__all__ = [
    "HEATMAP_ORDER",
    "heatmap_statistics",
    "matplotlib_available",
    "render_heatmap",
    "render_heatmaps",
    "short_layer_names",
    "uses_log_scale",
]

# Drawn first: the questions a reader asks first (does a layer move too fast or too slowly,
# where does the step size spread, where does the second moment underflow).
HEATMAP_ORDER = (
    "update_to_weight",
    "step_size_p50",
    "step_size_p95",
    "step_size_p05",
    "second_moment_underflow",
    "sqrt_second_moment_p50",
    "grad_norm",
    "grad_cosine",
    "update_norm",
    "weight_norm",
)
_EVENT_STYLE = {  # kind -> (marker, colour, legend text, points above the top row)
    "nonfinite": ("x", "#d62728", "skipped non-finite step(s)", 15),
    "clipping": ("v", "#ff7f0e", "clipping share above threshold", 6),
    "spike": ("D", "#9467bd", "skipped spike(s)", 24),
}


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported (it is imported here, once, if so)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def heatmap_statistics(history: MomentHistory) -> list[str]:
    """The statistics of ``history``, those of :data:`HEATMAP_ORDER` first, then the rest."""
    recorded = history.statistics
    first = [stat for stat in HEATMAP_ORDER if stat in recorded]
    return first + sorted(stat for stat in recorded if stat not in first)


def uses_log_scale(values: torch.Tensor) -> bool:
    """Whether a log colour scale suits ``values``: all finite ones positive, spanning >= 100x."""
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0 or bool((finite <= 0).any()):
        return False
    return float(finite.max()) / float(finite.min()) >= 100.0


def short_layer_names(layers: Sequence[str]) -> list[str]:
    """Layer paths without the dotted prefix they all share (``network.bert.`` and the like)."""
    if len(layers) < 2:
        return list(layers)
    parts = [layer.split(".") for layer in layers]
    shared = 0
    while all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def _column_edges(steps: Sequence[int]) -> list[float]:
    """Edges of one column per step, halfway between neighbours (width 1 for a single step)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    middles = [(a + b) / 2 for a, b in itertools.pairwise(steps)]
    return [2 * steps[0] - middles[0], *middles, 2 * steps[-1] - middles[-1]]


def render_heatmap(
    history: MomentHistory, statistic: str, path: str | Path, *, title: str | None = None
) -> Path:
    """Draw ``statistic`` of ``history`` into the PNG ``path`` (its folder is created)."""
    import matplotlib  # no pyplot and no backend switch: a Figure saves through Agg on its own
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure

    values = history.matrix(statistic)  # [layers, steps]
    layers = short_layer_names(history.layers)
    steps = history.steps
    log = uses_log_scale(values)
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        norm: Any = Normalize(0.0, 1.0)
    elif log:
        norm = LogNorm(float(finite.min()), float(finite.max()))
    else:
        low, high = float(finite.min()), float(finite.max())
        norm = Normalize(low, high if high > low else low + 1.0)

    width, height = 9.0, min(2.0 + 0.16 * len(layers), 14.0)
    font = 6 if len(layers) > 24 else 8
    figure = Figure(figsize=(width, height), dpi=100)
    # A fixed layout (1.6x faster to draw than matplotlib's constrained layout): the layer
    # names' width on the left, the colour bar on the right, title and markers on top, the
    # step axis and the events' legend below.
    left = 0.25 + 0.55 * font / 72 * max((len(name) for name in layers), default=1)
    bottom, top = 0.75, 0.7
    axis = figure.add_axes(
        (left / width, bottom / height, 1 - (left + 1.05) / width, 1 - (bottom + top) / height)
    )
    bar = figure.add_axes(
        (1 - 0.95 / width, bottom / height, 0.15 / width, 1 - (bottom + top) / height)
    )
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    masked = values.masked_fill(~torch.isfinite(values), math.nan).numpy()  # inf grey too
    mesh = axis.pcolormesh(
        _column_edges(steps), range(len(layers) + 1), masked, cmap=cmap, norm=norm, shading="flat"
    )
    axis.invert_yaxis()  # the first layer (embeddings) on top
    label_every = max(1, math.ceil(len(layers) / 80))
    axis.set_yticks([i + 0.5 for i in range(0, len(layers), label_every)])
    axis.set_yticklabels(layers[::label_every], fontsize=font)
    axis.set_xlabel("optimizer step", fontsize=9, labelpad=2)
    axis.set_title(title or statistic, fontsize=10, pad=32)
    colorbar = figure.colorbar(mesh, cax=bar)
    colorbar.set_label(f"{statistic} ({'log' if log else 'linear'} scale)", fontsize=8)
    handles = _draw_events(axis, history.events)
    if handles:
        figure.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.02 / height),
            ncol=len(handles),
            fontsize=7,
            frameon=False,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(temporary, format="png")
    temporary.replace(path)
    return path


def _draw_events(axis: Any, events: Sequence[MomentEvent]) -> list[Any]:
    """Lines for switches, markers above the top row for the other events; legend handles."""
    from matplotlib.lines import Line2D

    handles = []
    switches = [e for e in events if e.kind == "switch"]
    for event in switches:
        axis.axvline(event.step, color="white", linestyle="--", linewidth=1.5)
        axis.axvline(event.step, color="black", linestyle=":", linewidth=1.0)
    if switches:
        label = "; ".join(f"{e.label} at step {e.step}" for e in switches)
        handles.append(Line2D([], [], color="black", linestyle="--", label=label))
    from matplotlib.transforms import offset_copy

    for kind, (marker, colour, text, above) in _EVENT_STYLE.items():
        steps = [e.step for e in events if e.kind == kind]
        if not steps:
            continue
        # x in steps; y a fixed number of points above the top row, whatever the height
        transform = offset_copy(
            axis.get_xaxis_transform(), fig=axis.figure, y=above, units="points"
        )
        axis.scatter(
            steps,
            [1.0] * len(steps),
            marker=marker,
            color=colour,
            s=28,
            transform=transform,
            clip_on=False,
            zorder=3,
        )
        handles.append(
            Line2D(
                [], [], marker=marker, color=colour, linestyle="", label=f"{text} ({len(steps)})"
            )
        )
    return handles


def render_heatmaps(
    history: MomentHistory, folder: str | Path, statistics: Sequence[str] | None = None
) -> dict[str, Path]:
    """``<folder>/<statistic>.png`` for each statistic (default: all, :func:`heatmap_statistics`
    order); ``{statistic: path}``. Nothing is drawn before the first logged step."""
    if not len(history):
        return {}
    chosen = heatmap_statistics(history) if statistics is None else list(statistics)
    folder = Path(folder)
    return {stat: render_heatmap(history, stat, folder / f"{stat}.png") for stat in chosen}
