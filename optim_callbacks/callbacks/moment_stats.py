"""``MomentStatistics``: what an optimizer's state says, per layer, to any Lightning logger.

Every ``every_n_steps`` optimizer steps, rank zero reads each optimizer's state (the tensors its
registry entry names, :func:`optim_callbacks.optimizers.spec_for`; for an unregistered optimizer
every state tensor shaped like its parameter) and logs the statistics of
:mod:`optim_callbacks.moment_math`, laid out for dashboards (W&B and TensorBoard group panels by
the part of a key before its first ``/``):

- ``<prefix>/<statistic>`` over all parameters: one section of a few curves;
- ``<prefix>.<statistic>/<layer>`` per layer (``per_layer_scalars=False`` to skip): one section
  per statistic, holding that statistic's layers;
- ``heatmaps/<statistic>``: layers x steps pictures (:mod:`optim_callbacks.heatmaps`), as images
  to W&B and TensorBoard every ``heatmap_every_n_steps`` and at the end of fit, and as PNG files
  in the run folder, with the optimizer switch, skipped non-finite steps and heavy clipping
  marked. They are drawn from the values already computed, kept in a
  :class:`~optim_callbacks.moment_history.MomentHistory` that checkpoints carry.

With a ``WandbLogger`` it also logs histograms of ``log10(step size)`` and declares each key
with ``define_metric``: the run table's summary keeps the global statistics only.

Steps that don't log cost one integer test. On a logging step the parameters are copied in
``on_before_optimizer_step`` (for the update-to-weight ratio) and everything is computed in
``on_train_batch_end``, after the step, with batched reductions and one device-to-host copy.

Under DDP the state is replicated and rank zero alone computes. Under FSDP2 every rank reads its
shards and the ranks exchange one packed buffer per logging step (see
:func:`optim_callbacks.moment_math.moment_statistics`); rank zero logs.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from optim_callbacks._compat import batches_that_stepped
from optim_callbacks.callbacks._strategy import check_supported_strategy, is_fsdp2
from optim_callbacks.callbacks.fit_state import FitStateCallback
from optim_callbacks.heatmaps import (
    HEATMAP_ORDER,
    heatmap_statistics,
    matplotlib_available,
    render_heatmaps,
)
from optim_callbacks.moment_history import MomentHistory
from optim_callbacks.moment_math import (
    STATISTICS,
    GroupHistogram,
    ParamMoments,
    moment_statistics,
    snapshot_parameters,
)
from optim_callbacks.optimizers import OptimizerSpec, spec_for
from optim_callbacks.run_files import run_folder
from optim_callbacks.sharded import is_sharded, local_part, shard_group
from optim_callbacks.validation import check_at_least, check_choice, check_in_range

__all__ = ["STATISTICS", "MomentStatistics", "moment_key"]

GLOBAL = "global"
HEATMAP_PREFIX = "heatmaps"
# Drawn into W&B and TensorBoard during training (all statistics are drawn at the end of fit).
HEADLINE_HEATMAPS = HEATMAP_ORDER[:4]
_CLIPPING_COUNTERS = ("finite_steps", "clipped_steps", "nonfinite_steps")  # GradientClipping's
# How W&B summarizes each statistic in the run table (the last value unless a peak matters).
_WANDB_SUMMARY = {"second_moment_underflow": "max,last", "update_to_weight": "max,last"}


@dataclass
class _Snapshot:
    """One optimizer just before a logging step: its parameters and hyperparameters then."""

    optimizer: Optimizer
    params: list[Tensor]
    before: list[Tensor] | None
    # per parameter: lr, eps, betas, amsgrad of its group, and the group
    hyperparameters: list[dict[str, Any]]
    step: int  # the step Lightning's loggers get for this batch


class MomentStatistics(FitStateCallback):
    r"""Log optimizer moment statistics per layer every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: log after every N-th optimizer step (counted like Lightning's
            ``log_every_n_steps``: steps that log are those where ``(step + 1) % N == 0``).
        statistics: which statistics to compute (default: all of
            :data:`optim_callbacks.moment_math.STATISTICS`).
        layer_filter: regular expression; only layers (module paths such as
            ``encoder.layer.0.attention.self.query``) it matches (``re.search``) are logged per
            layer. The global statistics always cover every parameter.
        max_layers: log at most this many layers (the first ones in module order);
            ``None`` for all.
        percentiles: percentiles (0-100) of ``sqrt(v_hat)`` and of the step size, over every
            element of the layer (of the model for the global ones), each within 1.16% of the
            exact order statistic (read from log-spaced bins, 200 per decade; see
            :mod:`optim_callbacks.moment_math`), under every strategy.
        max_samples: no effect (percentiles count every element, none are sampled);
            accepted so that configurations that set it still load. A value other than the
            default warns.
        histograms: with a ``WandbLogger``, also log histograms of ``log10(step size)``
            (per layer too when ``per_layer_scalars``).
        histogram_bins: bins per histogram.
        prefix: first component of every key.
        seed: no effect (nothing is sampled any more), accepted like ``max_samples``.
        per_layer_scalars: log each layer's statistics as scalars. ``False`` keeps a big
            model's dashboard to the global statistics; the heatmaps still show every layer.
        heatmaps: keep the per-layer values and draw layers x steps heatmaps (needs
            matplotlib, the ``plots`` extra; without it a warning says so and none are drawn).
        heatmap_every_n_steps: also send the headline heatmaps (update/weight ratio, step
            sizes) to W&B and TensorBoard as images every this many optimizer steps;
            ``None``: only at the end of fit, when every statistic's heatmap is drawn.
        heatmap_dir: folder of the PNG files (default: ``heatmaps/`` in the run folder, the
            folder above the checkpoints; see :func:`optim_callbacks.run_files.run_folder`).
        clipping_event_share: mark a logging step on the heatmaps when ``GradientClipping``
            clipped at least this share of the steps since the previous logging step.

    Example::

        trainer = Trainer(logger=WandbLogger(), callbacks=[MomentStatistics(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        *,
        statistics: Sequence[str] | None = None,
        layer_filter: str | None = None,
        max_layers: int | None = 64,
        percentiles: Sequence[float] = (5.0, 50.0, 95.0),
        max_samples: int = 1024,
        histograms: bool = True,
        histogram_bins: int = 64,
        prefix: str = "moments",
        seed: int = 0,
        per_layer_scalars: bool = True,
        heatmaps: bool = True,
        heatmap_every_n_steps: int | None = 500,
        heatmap_dir: str | None = None,
        clipping_event_share: float = 0.5,
    ) -> None:
        self.every_n_steps = check_at_least("every_n_steps", every_n_steps, 1)
        if statistics is None:
            statistics = STATISTICS
        elif isinstance(statistics, str) or not list(statistics):
            raise ValueError(
                f"statistics: got {statistics!r}; allowed: a non-empty list of {', '.join(STATISTICS)}"
            )
        self.statistics = tuple(check_choice("statistics", name, STATISTICS) for name in statistics)
        self.layer_filter = layer_filter
        self._layer_pattern = _compile_layer_filter(layer_filter)
        self.max_layers = (
            None if max_layers is None else check_at_least("max_layers", max_layers, 1)
        )
        if isinstance(percentiles, str) or not isinstance(percentiles, Sequence):
            raise ValueError(
                f"percentiles: got {percentiles!r}; allowed: a list of numbers in [0, 100]"
            )
        self.percentiles = tuple(
            check_in_range(f"percentiles[{i}]", p, 0, 100, high_inclusive=True)
            for i, p in enumerate(percentiles)
        )
        self.max_samples = check_at_least("max_samples", max_samples, 2)
        self.seed = check_at_least("seed", seed, 0)
        if max_samples != 1024 or seed != 0:
            warnings.warn(
                f"MomentStatistics: max_samples={max_samples}, seed={seed} have no effect: "
                "percentiles count every element (nothing is sampled); drop both options",
                DeprecationWarning,
                stacklevel=2,
            )
        self.histograms = bool(histograms)
        self.histogram_bins = check_at_least("histogram_bins", histogram_bins, 1)
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"prefix: got {prefix!r}; allowed: a non-empty string without '/'")
        self.prefix = prefix
        self.per_layer_scalars = bool(per_layer_scalars)
        self.heatmaps = bool(heatmaps)
        self.heatmap_every_n_steps = (
            None
            if heatmap_every_n_steps is None
            else check_at_least("heatmap_every_n_steps", heatmap_every_n_steps, 1)
        )
        if heatmap_dir is not None and (not isinstance(heatmap_dir, str) or not heatmap_dir):
            raise ValueError(f"heatmap_dir: got {heatmap_dir!r}; allowed: a folder path or None")
        self.heatmap_dir = heatmap_dir
        self.clipping_event_share = check_in_range(
            "clipping_event_share", clipping_event_share, 0, 1, high_inclusive=True
        )
        self.history = MomentHistory()
        self.heatmap_files: dict[str, Path] = {}  # statistic -> the PNG drawn last
        self._last_heatmap_step: int | None = None
        self._clipping_counts = (0, 0, 0)  # GradientClipping's finite, clipped, non-finite steps
        self._optimizer_names: list[str] = []
        self._draw = True
        self._summary_hidden: set[str] = set()  # W&B keys the run table should not show
        self._layer_of: dict[int, str] = {}  # id(parameter) -> layer name
        self._layers: list[str] = []  # layers logged one by one
        self._specs: dict[int, tuple[Optimizer, OptimizerSpec | None]] = {}  # id(optimizer) -> spec
        self._pending: dict[int, _Snapshot] = {}
        self._defined_keys: set[tuple[int, str]] = set()
        self._sharded = False

    # --- configuration checks --------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_supported_strategy("MomentStatistics", trainer.strategy)
        # FSDP2: every rank computes its shards' part; one all-reduce per logging step.
        self._sharded = is_fsdp2(trainer.strategy)
        if not trainer.loggers:
            raise ValueError(
                "logger: MomentStatistics got a Trainer without a logger (logger=False); allowed: any "
                "Lightning logger, e.g. CSVLogger, TensorBoardLogger or WandbLogger"
            )
        self._draw = self.heatmaps and matplotlib_available()
        if self.heatmaps and not self._draw:
            rank_zero_warn(
                "MomentStatistics: heatmaps need matplotlib, which is not installed; logging "
                "scalars only (pip install 'optim-callbacks[plots]', or heatmaps=False)"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._map_layers(pl_module)
        self._specs.clear()
        self._pending.clear()
        if self.history.layers != self._layers:
            self.history.reset(self._layers)  # a new model; a resumed run keeps its history
        self._optimizer_names = [type(o).__name__ for o in trainer.optimizers]

    def on_optimizers_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Protocol hook: another callback replaced the optimizers; forget per-optimizer caches
        and mark the switch on the heatmaps.

        Keys do not depend on the optimizer (layers are modules; statistics are named by role or
        by state key), so a dashboard's panels continue across an Adam -> SGD switch.
        """
        self._specs.clear()
        names = [type(o).__name__ for o in trainer.optimizers]
        before = ", ".join(self._optimizer_names) or "?"
        self.history.add_event(trainer.global_step, "switch", f"{before} → {', '.join(names)}")
        self._optimizer_names = names

    def on_spike_skipped(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, description: str
    ) -> None:
        """Protocol hook (``SpikeSkip``): the optimizer step at ``step`` was skipped as a spike;
        mark it on the heatmaps, ``description`` (one line) as its label."""
        self.history.add_event(step, "spike", description)

    # --- the two hooks that do work on logging steps -----------------------------------------
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if not trainer.is_global_zero and not self._sharded:
            return
        # The count Lightning's log_every_n_steps uses, and the step it logs this batch at.
        step = batches_that_stepped(trainer)
        if (step + 1) % self.every_n_steps != 0:
            return
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if id(optimizer) in self._pending:
            return  # a second step of the same optimizer in this batch: keep the first "before"
        params, hyperparameters = [], []
        for group in optimizer.param_groups:
            settings = {
                "group": group,
                "lr": _as_float(group.get("lr")),
                "eps": _as_float(group.get("eps")),
                "betas": tuple(_as_float(b) for b in group["betas"]) if "betas" in group else None,
                "amsgrad": bool(group.get("amsgrad", False)),
            }
            for p in group["params"]:
                params.append(p)
                hyperparameters.append(settings)
        before = None
        if {"update_to_weight", "update_norm"} & set(self.statistics):
            before = snapshot_parameters(params)
        self._pending[id(optimizer)] = _Snapshot(optimizer, params, before, hyperparameters, step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if not self._pending:
            return
        snapshots = list(self._pending.values())
        self._pending.clear()
        step = snapshots[0].step  # Lightning counts this batch only after on_train_batch_end
        results, histograms = self.compute(snapshots, step)
        pre_clip = _pre_clip_norm(trainer)
        if pre_clip is not None and "grad_norm" in self.statistics:
            results[GLOBAL]["grad_norm_before_clipping"] = pre_clip
        if not trainer.is_global_zero:
            return
        self._log(trainer, results, histograms, step)
        if self.heatmaps:
            self.history.record(step, {k: v for k, v in results.items() if k != GLOBAL})
            self._mark_clipping_events(trainer, step)
            if self._draw and self._heatmaps_due(step):
                self.draw_heatmaps(trainer, HEADLINE_HEATMAPS, step)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._draw and len(self.history):
            step = self.history.steps[-1]
            drawn = HEADLINE_HEATMAPS if self._last_heatmap_step == step else ()
            rest = [stat for stat in heatmap_statistics(self.history) if stat not in drawn]
            self.draw_heatmaps(trainer, rest, step)  # every statistic, each drawn once per step
        if trainer.is_global_zero:
            _drop_from_wandb_summaries(trainer, self._summary_hidden)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending.clear()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._pending.clear()

    # --- checkpoints --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        """The heatmaps' history and the event counters; what logs when depends on the step."""
        return {
            "history": self.history.state_dict(),
            "clipping_counts": list(self._clipping_counts),
            "last_heatmap_step": self._last_heatmap_step,
        }

    def load_fit_state(self, state_dict: dict[str, Any]) -> None:
        """Only when a fit resumes: ``test(ckpt_path="best")`` keeps the whole run's history."""
        self.history.load_state_dict(state_dict["history"])
        self._clipping_counts = tuple(int(c) for c in state_dict["clipping_counts"])
        self._last_heatmap_step = state_dict["last_heatmap_step"]

    # --- computing ----------------------------------------------------------------------------
    def compute(
        self, snapshots: Sequence[_Snapshot], step: int
    ) -> tuple[dict[str, dict[str, float]], dict[str, GroupHistogram]]:
        """Statistics of the optimizers in ``snapshots``: ``{layer: {statistic: value}}`` (all
        parameters under ``"global"``) and the step-size histograms by layer."""
        moments: list[ParamMoments] = []
        layer_members: dict[str, list[int]] = {name: [] for name in self._layers}
        for snapshot in snapshots:
            spec = self._spec(snapshot.optimizer)
            applied_lr = getattr(snapshot.optimizer, "applied_lr", None)
            for k, p in enumerate(snapshot.params):
                before = snapshot.before[k] if snapshot.before is not None else None
                hyperparameters = snapshot.hyperparameters[k]
                if applied_lr is not None:  # the optimizer says which LR its step applied
                    hyperparameters = {
                        **hyperparameters,
                        "lr": _as_float(applied_lr(hyperparameters["group"])),
                    }
                read = _read_moments(snapshot.optimizer, spec, p, before, hyperparameters)
                moments.append(_local(read) if self._sharded else read)
                layer = self._layer_of.get(id(p))
                if layer in layer_members:
                    layer_members[layer].append(len(moments) - 1)
        names = [name for name, members in layer_members.items() if members]
        layers = [layer_members[name] for name in names]
        names.append(GLOBAL)
        results, histograms = moment_statistics(
            moments,
            layers,
            statistics=self.statistics,
            percentiles=self.percentiles,
            histogram_bins=self.histogram_bins if self.histograms else 0,
            group=shard_group(snapshots[0].params) if self._sharded else None,
        )
        return (
            dict(zip(names, results, strict=True)),
            {name: h for name, h in zip(names, histograms, strict=True) if h is not None},
        )

    def _spec(self, optimizer: Optimizer) -> OptimizerSpec | None:
        cached = self._specs.get(id(optimizer))
        if cached is None or cached[0] is not optimizer:
            cached = (optimizer, spec_for(optimizer))
            self._specs[id(optimizer)] = cached
        return cached[1]

    def _map_layers(self, pl_module: pl.LightningModule) -> None:
        """Layer of each parameter (its module's path) and the layers logged one by one."""
        self._layer_of.clear()
        order: list[str] = []
        for name, p in pl_module.named_parameters():
            layer = name.rpartition(".")[0] or name
            self._layer_of[id(p)] = layer
            if layer not in order:
                order.append(layer)
        chosen = [
            layer
            for layer in order
            if self._layer_pattern is None or self._layer_pattern.search(layer)
        ]
        if self.max_layers is not None and len(chosen) > self.max_layers:
            rank_zero_info(
                f"MomentStatistics: logging the first {self.max_layers} of {len(chosen)} layers "
                f"(max_layers={self.max_layers}); the global statistics still cover every parameter"
            )
            chosen = chosen[: self.max_layers]
        self._layers = chosen

    # --- logging ------------------------------------------------------------------------------
    def keys(self, results: dict[str, dict[str, float]]) -> dict[str, float]:
        """``results`` of :meth:`compute` as logged keys (see :func:`moment_key`)."""
        return {
            moment_key(stat, None if name == GLOBAL else name, self.prefix): value
            for name, result in results.items()
            if name == GLOBAL or self.per_layer_scalars
            for stat, value in result.items()
        }

    def _log(
        self,
        trainer: pl.Trainer,
        results: dict[str, dict[str, float]],
        histograms: dict[str, GroupHistogram],
        step: int,
    ) -> None:
        scalars = self.keys(results)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                hists = {
                    moment_key("log10_step_size", None if name == GLOBAL else name, self.prefix): h
                    for name, h in histograms.items()
                    if name == GLOBAL or self.per_layer_scalars
                }
                self._define_wandb_metrics(logger, [*scalars, *hists])
                if hists:
                    logger.log_metrics({**scalars, **_wandb_histograms(hists)}, step=step)
                    continue
            logger.log_metrics(scalars, step=step)

    def _define_wandb_metrics(self, logger: WandbLogger, keys: Sequence[str]) -> None:
        """Declare each key once per run: plotted against ``trainer/global_step`` like every
        Lightning metric. The run table's summary keeps the global statistics (last value,
        peaks too where they matter); per-layer keys, histograms and heatmaps stay out of it."""
        run = logger.experiment
        define = getattr(run, "define_metric", None)
        if define is None:
            return
        for key in keys:
            if (id(run), key) in self._defined_keys:
                continue
            section, _, name = key.partition("/")
            if section != self.prefix or name.endswith("log10_step_size"):
                summary = "none"
                self._summary_hidden.add(key)
            else:
                summary = _WANDB_SUMMARY.get(name, "last")
            define(key, step_metric="trainer/global_step", summary=summary)
            self._defined_keys.add((id(run), key))

    # --- heatmaps -----------------------------------------------------------------------------
    def _heatmaps_due(self, step: int) -> bool:
        """Whether a multiple of ``heatmap_every_n_steps`` was passed since the last drawing."""
        every = self.heatmap_every_n_steps
        if every is None:
            return False
        last = -1 if self._last_heatmap_step is None else self._last_heatmap_step
        return (step + 1) // every > (last + 1) // every

    def _mark_clipping_events(self, trainer: pl.Trainer, step: int) -> None:
        """Events from ``GradientClipping``'s counters since the previous logging step."""
        clipper = next(
            (c for c in trainer.callbacks if all(hasattr(c, a) for a in _CLIPPING_COUNTERS)), None
        )
        if clipper is None:
            return
        counts = tuple(int(getattr(clipper, a)) for a in _CLIPPING_COUNTERS)
        finite, clipped, nonfinite = (
            a - b for a, b in zip(counts, self._clipping_counts, strict=True)
        )
        self._clipping_counts = counts
        if min(finite, clipped, nonfinite) < 0:
            return  # the counters started again (another GradientClipping instance)
        if nonfinite:
            self.history.add_event(step, "nonfinite", f"{nonfinite} non-finite step(s) skipped")
        if clipped and clipped >= self.clipping_event_share * finite:
            self.history.add_event(step, "clipping", f"{clipped} of {finite} steps clipped")

    def heatmap_folder(self, trainer: pl.Trainer) -> Path:
        """Where the PNG files go: ``heatmap_dir``, or ``heatmaps/`` in the run folder."""
        if self.heatmap_dir is not None:
            return Path(self.heatmap_dir)
        return run_folder(trainer) / HEATMAP_PREFIX

    def draw_heatmaps(
        self, trainer: pl.Trainer, statistics: Sequence[str] | None, step: int
    ) -> dict[str, Path]:
        """Draw the heatmaps of ``statistics`` (``None``: all), write the history beside them
        as ``history.json``, and send them to W&B and TensorBoard as images at ``step``."""
        folder = self.heatmap_folder(trainer)
        chosen = None
        if statistics is not None:
            chosen = [stat for stat in statistics if stat in self.history.values]
        files = render_heatmaps(self.history, folder, chosen)
        self.heatmap_files.update(files)
        self._last_heatmap_step = step
        folder.mkdir(parents=True, exist_ok=True)
        history_file = folder / "history.json"
        temporary = history_file.with_name(".history.json.tmp")
        temporary.write_text(json.dumps(self.history.to_json()))
        temporary.replace(history_file)
        if files:
            _log_images(trainer, files, step, self._define_wandb_metrics)
        return files


def moment_key(statistic: str, layer: str | None = None, prefix: str = "moments") -> str:
    """The logged key of ``statistic``: ``<prefix>/<statistic>`` over all parameters,
    ``<prefix>.<statistic>/<layer>`` for one layer (so a dashboard's section holds one
    statistic's layers)."""
    return f"{prefix}/{statistic}" if layer is None else f"{prefix}.{statistic}/{layer}"


def _drop_from_wandb_summaries(trainer: pl.Trainer, keys: set[str]) -> None:
    """Remove ``keys`` from each W&B run's summary. ``define_metric(summary="none")`` declares
    them, but wandb (0.31, offline) still puts their last values in the summary."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and keys:
            summary = logger.experiment.summary
            present = set(summary.keys())
            for key in sorted(keys & present):
                del summary[key]


def _log_images(trainer: pl.Trainer, files: dict[str, Path], step: int, define: Any) -> None:
    """The heatmap PNGs as images: W&B (one row, summary off) and TensorBoard."""
    keys = {f"{HEATMAP_PREFIX}/{stat}": path for stat, path in files.items()}
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            define(logger, list(keys))
            images = {key: wandb.Image(str(path), caption=key) for key, path in keys.items()}
            logger.log_metrics(images, step=step)
        elif isinstance(logger, TensorBoardLogger):
            from matplotlib.image import imread

            for key, path in keys.items():
                picture = imread(path)[..., :3]  # RGBA floats in [0, 1] -> RGB
                logger.experiment.add_image(key, picture, global_step=step, dataformats="HWC")


def _compile_layer_filter(layer_filter: str | None) -> re.Pattern[str] | None:
    if layer_filter is None:
        return None
    if not isinstance(layer_filter, str):
        raise ValueError(
            f"layer_filter: got {layer_filter!r}; allowed: a regular expression string or None"
        )
    try:
        return re.compile(layer_filter)
    except re.error as error:
        raise ValueError(
            f"layer_filter: got {layer_filter!r}, not a valid regular expression ({error}); "
            r"allowed: a Python regular expression such as 'encoder\.layer\.\d+'"
        ) from None


def _as_float(value: Any) -> float | None:
    """A hyper-parameter as a number; ``None`` when it is none or not one number (torch's
    Adafactor, for one, keeps ``eps`` as a pair)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _read_moments(
    optimizer: Optimizer,
    spec: OptimizerSpec | None,
    param: Tensor,
    before: Tensor | None,
    hyperparameters: dict[str, Any],
) -> ParamMoments:
    """One parameter's state after the step, read through its registry entry."""
    state = optimizer.state.get(param, {})
    moments = ParamMoments(param=param, before=before, grad=param.grad)
    if spec is None:  # unregistered: every state tensor shaped like the parameter
        moments.states = {
            k: v
            for k, v in state.items()
            if isinstance(v, Tensor) and v.shape == param.shape and k != "step"
        }
        return moments
    moments.states = {k: state[k] for k in spec.state_keys if isinstance(state.get(k), Tensor)}
    if spec.first_moment is not None:
        moments.first_moment = moments.states.get(spec.first_moment)
    if isinstance(optimizer, torch.optim.Adafactor) and state.get("row_var") is not None:
        # torch's factored second moment of a matrix: read from its factors, never expanded
        moments.factors = (state["row_var"], state["col_var"])
    elif spec.second_moment is not None:
        second = spec.second_moment
        amsgrad_max = moments.states.get(f"max_{second}")
        use_max = hyperparameters["amsgrad"] and amsgrad_max is not None
        moments.second_moment = amsgrad_max if use_max else moments.states.get(second)
        moments.eps = hyperparameters["eps"] if spec.has_eps else None
        if (
            moments.second_moment is not None
            and spec.has_betas
            and spec.bias_corrected  # Adam's step lr / (sqrt(v_hat) + eps); not ADOPT's
            and hyperparameters["betas"] is not None
        ):
            moments.betas = hyperparameters["betas"][:2]
            moments.step = state.get("step")
            moments.lr = hyperparameters["lr"]
    return moments


def _pre_clip_norm(trainer: pl.Trainer) -> float | None:
    """The global L2 norm of this step's gradients before clipping, as ``GradientClipping``
    computed it (``None`` without one, or when it clips another norm)."""
    for callback in trainer.callbacks:
        norm = getattr(callback, "last_pre_clip_norm", None)
        if norm is not None and getattr(callback, "norm_type", None) == 2.0:
            return float(norm)
    return None


def _local(moments: ParamMoments) -> ParamMoments:
    """``moments`` with every tensor replaced by this rank's shard (FSDP2's ``DTensor``)."""
    sharded = is_sharded(moments.param)
    moments.global_numel = moments.param.numel()  # a DTensor's numel is the whole tensor's
    moments.states = {key: local_part(value) for key, value in moments.states.items()}
    for name in ("param", "before", "grad", "first_moment", "second_moment"):
        value = getattr(moments, name)
        if isinstance(value, Tensor):
            setattr(moments, name, local_part(value))
    if isinstance(moments.step, Tensor):
        moments.step = local_part(moments.step)
    if moments.factors is not None:
        moments.factors = (local_part(moments.factors[0]), local_part(moments.factors[1]))
    moments.sharded = sharded
    return moments


def _wandb_histograms(histograms: dict[str, GroupHistogram]) -> dict[str, Any]:
    import wandb  # only when a WandbLogger is attached: the library needs torch + lightning only

    return {
        key: wandb.Histogram(np_histogram=(hist.counts, hist.edges))
        for key, hist in histograms.items()
    }
