"""What :class:`~optim_callbacks.MomentStatistics` logged per layer, kept for heatmaps.

A :class:`MomentHistory` holds, for each per-layer statistic, one value per layer and logged
step (a ``[steps, layers]`` table; ``NaN`` where a layer had no value), plus the events worth a
marker on a heatmap:

- ``switch``: the optimizer was replaced (``on_optimizers_changed``, e.g. Adam -> SGD), at the
  step it happened;
- ``nonfinite``: at least one step since the previous logging step had non-finite gradients and
  was skipped (read from ``GradientClipping``'s counters), at the logging step;
- ``clipping``: clipping acted on at least a given share of the finite steps since the previous
  logging step, at the logging step;
- ``spike``: :class:`~optim_callbacks.SpikeSkip` skipped the step as a loss or gradient-norm
  spike, at the step it skipped (told through the ``on_spike_skipped`` hook).

It is filled from values the callback has already computed (no pass over the parameters) and
travels in checkpoints, so a resumed run's heatmaps cover the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["EVENT_KINDS", "MomentEvent", "MomentHistory"]

EVENT_KINDS = ("switch", "nonfinite", "clipping", "spike")


@dataclass(frozen=True)
class MomentEvent:
    """Something that happened at ``step``: one of :data:`EVENT_KINDS`, and what, in words."""

    step: int
    kind: str
    label: str


class MomentHistory:
    """Per-layer statistics at each logging step, and the events between them.

    ``values[statistic]`` is a list of rows, one per entry of ``steps``, each with one value per
    entry of ``layers``.
    """

    def __init__(self, layers: Sequence[str] = ()) -> None:
        self.layers: list[str] = list(layers)
        self.steps: list[int] = []
        self.values: dict[str, list[list[float]]] = {}
        self.events: list[MomentEvent] = []

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def statistics(self) -> list[str]:
        """The statistics recorded, in the order they first appeared."""
        return list(self.values)

    def reset(self, layers: Sequence[str]) -> None:
        """Start over for ``layers`` (a new fit whose layers differ from the recorded ones)."""
        self.layers = list(layers)
        self.steps, self.values, self.events = [], {}, []

    def record(self, step: int, per_layer: Mapping[str, Mapping[str, float]]) -> None:
        """Add ``per_layer[layer][statistic]`` at ``step``.

        Rows at ``step`` or later are dropped first: a run resumed from an earlier checkpoint
        logs those steps again.
        """
        self._truncate(step)
        self.steps.append(int(step))
        statistics = {stat for values in per_layer.values() for stat in values}
        for stat in sorted(statistics - set(self.values)):
            self.values[stat] = [[math.nan] * len(self.layers) for _ in self.steps[:-1]]
        for stat, rows in self.values.items():
            rows.append(
                [float(per_layer.get(layer, {}).get(stat, math.nan)) for layer in self.layers]
            )

    def add_event(self, step: int, kind: str, label: str) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"kind: got {kind!r}; allowed: {', '.join(EVENT_KINDS)}")
        event = MomentEvent(int(step), kind, label)
        if event not in self.events:
            self.events.append(event)

    def matrix(self, statistic: str) -> torch.Tensor:
        """``[layers, steps]`` float64 values of ``statistic`` (rows: layers, columns: steps)."""
        rows = self.values[statistic]
        if not rows:
            return torch.empty(len(self.layers), 0, dtype=torch.float64)
        return torch.tensor(rows, dtype=torch.float64).T

    def _truncate(self, step: int) -> None:
        keep = sum(1 for s in self.steps if s < step)
        del self.steps[keep:]
        for rows in self.values.values():
            del rows[keep:]

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Compact and loadable with ``torch.load(weights_only=True)``: tables as float32."""
        return {
            "layers": list(self.layers),
            "steps": list(self.steps),
            "values": {
                stat: torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(self.layers))
                for stat, rows in self.values.items()
            },
            "events": [asdict(event) for event in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.layers = list(state["layers"])
        self.steps = [int(s) for s in state["steps"]]
        self.values = {stat: table.tolist() for stat, table in state["values"].items()}
        self.events = [MomentEvent(**event) for event in state["events"]]

    def to_json(self) -> dict[str, Any]:
        """The history as JSON-ready values (``NaN`` as ``None``)."""
        return {
            "layers": self.layers,
            "steps": self.steps,
            "values": {
                stat: [[None if math.isnan(v) else v for v in row] for row in rows]
                for stat, rows in self.values.items()
            },
            "events": [asdict(event) for event in self.events],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> MomentHistory:
        history = cls(data["layers"])
        history.steps = [int(s) for s in data["steps"]]
        history.values = {
            stat: [[math.nan if v is None else float(v) for v in row] for row in rows]
            for stat, rows in data["values"].items()
        }
        history.events = [MomentEvent(**event) for event in data["events"]]
        return history
