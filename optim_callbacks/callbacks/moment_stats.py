"""``MomentStatistics``: what an optimizer's state says, per layer, to any Lightning logger.

Every ``every_n_steps`` optimizer steps, rank zero reads each optimizer's state (the tensors its
registry entry names, :func:`optim_callbacks.optimizers.spec_for`; for an unregistered optimizer
every state tensor shaped like its parameter) and logs, per layer and for all parameters, the
statistics of :mod:`optim_callbacks.moment_math` under ``<prefix>/<layer>/<statistic>`` and
``<prefix>/global/<statistic>``. With a ``WandbLogger`` it also logs histograms of
``log10(step size)`` and declares each key with ``define_metric``.

Steps that don't log cost one integer test. On a logging step the parameters are copied in
``on_before_optimizer_step`` (for the update-to-weight ratio) and everything is computed in
``on_train_batch_end``, after the step, with batched reductions and one device-to-host copy.

Under DDP the state is replicated and rank zero alone computes. Under FSDP2 every rank reads its
shards and the ranks exchange one packed buffer per logging step (see
:func:`optim_callbacks.moment_math.moment_statistics`); rank zero logs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer

from optim_callbacks._compat import batches_that_stepped
from optim_callbacks.callbacks._strategy import check_supported_strategy, is_fsdp2
from optim_callbacks.moment_math import (
    STATISTICS,
    GroupHistogram,
    ParamMoments,
    moment_statistics,
    snapshot_parameters,
)
from optim_callbacks.optimizers import OptimizerSpec, spec_for
from optim_callbacks.sharded import is_sharded, local_part, shard_group
from optim_callbacks.validation import check_at_least, check_choice, check_in_range

__all__ = ["STATISTICS", "MomentStatistics"]

GLOBAL = "global"
# How W&B summarizes each statistic in the run table (the last value unless a peak matters).
_WANDB_SUMMARY = {"second_moment_underflow": "max,last", "update_to_weight": "max,last"}


@dataclass
class _Snapshot:
    """One optimizer just before a logging step: its parameters and hyperparameters then."""

    optimizer: Optimizer
    params: list[Tensor]
    before: list[Tensor] | None
    hyperparameters: list[dict[str, Any]]  # per parameter: lr, eps, betas, amsgrad of its group
    step: int  # the step Lightning's loggers get for this batch


class MomentStatistics(Callback):
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
        percentiles: percentiles (0-100) of ``sqrt(v_hat)`` and of the step size.
        max_samples: percentiles of a layer larger than this are computed on a uniform sample of
            this many elements (smaller layers are exact).
        histograms: with a ``WandbLogger``, also log histograms of ``log10(step size)``.
        histogram_bins: bins per histogram.
        prefix: first component of every key.
        seed: seeds the sampling (the step is added, so a resumed run samples identically).

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
        self.histograms = bool(histograms)
        self.histogram_bins = check_at_least("histogram_bins", histogram_bins, 1)
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"prefix: got {prefix!r}; allowed: a non-empty string without '/'")
        self.prefix = prefix
        self.seed = check_at_least("seed", seed, 0)
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._map_layers(pl_module)
        self._specs.clear()
        self._pending.clear()

    def on_optimizers_changed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Protocol hook: another callback replaced the optimizers; forget per-optimizer caches.

        Keys do not depend on the optimizer (layers are modules; statistics are named by role or
        by state key), so a dashboard's panels continue across an Adam -> SGD switch.
        """
        self._specs.clear()

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
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._pending:
            return
        snapshots = list(self._pending.values())
        self._pending.clear()
        step = snapshots[0].step  # Lightning counts this batch only after on_train_batch_end
        scalars, histograms = self.compute(snapshots, step)
        pre_clip = _pre_clip_norm(trainer)
        if pre_clip is not None and "grad_norm" in self.statistics:
            scalars[f"{self.prefix}/{GLOBAL}/grad_norm_before_clipping"] = pre_clip
        if trainer.is_global_zero:
            self._log(trainer, scalars, histograms, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending.clear()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._pending.clear()

    # --- computing ----------------------------------------------------------------------------
    def compute(
        self, snapshots: Sequence[_Snapshot], step: int
    ) -> tuple[dict[str, float], dict[str, GroupHistogram]]:
        """Statistics of the optimizers in ``snapshots`` as ``{key: value}`` and histograms."""
        moments: list[ParamMoments] = []
        layer_members: dict[str, list[int]] = {name: [] for name in self._layers}
        for snapshot in snapshots:
            spec = self._spec(snapshot.optimizer)
            for k, p in enumerate(snapshot.params):
                before = snapshot.before[k] if snapshot.before is not None else None
                read = _read_moments(
                    snapshot.optimizer, spec, p, before, snapshot.hyperparameters[k]
                )
                moments.append(_local(read) if self._sharded else read)
                layer = self._layer_of.get(id(p))
                if layer in layer_members:
                    layer_members[layer].append(len(moments) - 1)
        names = [name for name, members in layer_members.items() if members]
        layers = [layer_members[name] for name in names]
        names.append(GLOBAL)
        device = moments[0].param.device if moments else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(self.seed + step)
        results, histograms = moment_statistics(
            moments,
            layers,
            statistics=self.statistics,
            percentiles=self.percentiles,
            max_samples=self.max_samples,
            histogram_bins=self.histogram_bins if self.histograms else 0,
            generator=generator,
            group=shard_group(snapshots[0].params) if self._sharded else None,
        )
        scalars = {
            f"{self.prefix}/{name}/{stat}": value
            for name, result in zip(names, results, strict=True)
            for stat, value in result.items()
        }
        hists = {
            f"{self.prefix}/{name}/log10_step_size": hist
            for name, hist in zip(names, histograms, strict=True)
            if hist is not None
        }
        return scalars, hists

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
                f"(max_layers={self.max_layers}); '{GLOBAL}' still covers every parameter"
            )
            chosen = chosen[: self.max_layers]
        self._layers = chosen

    # --- logging ------------------------------------------------------------------------------
    def _log(
        self,
        trainer: pl.Trainer,
        scalars: dict[str, float],
        histograms: dict[str, GroupHistogram],
        step: int,
    ) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._define_wandb_metrics(logger, scalars)
                if histograms:
                    logger.log_metrics({**scalars, **_wandb_histograms(histograms)}, step=step)
                    continue
            logger.log_metrics(scalars, step=step)

    def _define_wandb_metrics(self, logger: WandbLogger, scalars: dict[str, float]) -> None:
        """Declare each key once per run: plotted against ``trainer/global_step`` like every
        Lightning metric, summarized by its last value (peaks too where they matter)."""
        run = logger.experiment
        define = getattr(run, "define_metric", None)
        if define is None:
            return
        for key in scalars:
            if (id(run), key) in self._defined_keys:
                continue
            statistic = key.rsplit("/", 1)[-1]
            define(
                key,
                step_metric="trainer/global_step",
                summary=_WANDB_SUMMARY.get(statistic, "last"),
            )
            self._defined_keys.add((id(run), key))


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
