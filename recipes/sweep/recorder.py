"""``RunRecorder``: what one comparison run did, measured in the run itself.

The comparison sweep (:mod:`recipes.compare`) adds this callback to each recipe run. It records

- every scalar the run logs, at the step it is logged: the callback appends a
  :class:`MetricsHistory` logger beside the run's own (through the public ``trainer.loggers``
  setter), so it sees exactly what W&B, CSV or TensorBoard see (``train_loss``, ``val_acc``,
  ``lr/*``, ``grad_clip/*``, ``moments/*``, ...). Per-layer moment statistics stay in
  the run's own logger;
- the learning rate each optimizer step really used (the largest of the parameter groups, read
  in ``on_before_optimizer_step``, before the scheduler steps);
- the wall time of each training step: the time between consecutive ``on_train_batch_start``
  calls, leaving out the intervals that contain a validation loop or an epoch boundary;
- the bytes of optimizer state (every tensor in ``optimizer.state``), the largest seen;
- the fit's wall time and, on CUDA, the peak memory allocated during it.

Everything is kept in ``state_dict``, so a run resumed from a checkpoint keeps its history.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from optim_callbacks import FitStateCallback

__all__ = ["MetricsHistory", "RunRecorder", "optimizer_state_bytes"]


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (moments, step counters, ...)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


class MetricsHistory(Logger):
    """A logger that keeps every scalar it is given as ``{key: [[step, value], ...]}``.

    ``keep`` decides which keys are kept (default: all). Its ``name`` and ``version`` are empty
    and its ``save_dir`` is the Trainer's ``default_root_dir``, so when it is a run's only logger
    checkpoints still go to ``<default_root_dir>/checkpoints``, as they would with no logger.
    """

    def __init__(self, save_dir: str | None = None, keep: Any = None) -> None:
        super().__init__()
        self._save_dir = save_dir
        self._keep = keep
        self.history: dict[str, list[list[float]]] = {}

    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @save_dir.setter
    def save_dir(self, folder: str | None) -> None:
        self._save_dir = folder

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyperparameters are in the run's config; nothing to keep."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    continue
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if self._keep is not None and not self._keep(key):
                continue
            self.history.setdefault(key, []).append([step, float(value)])


def _global_statistics_only(key: str) -> bool:
    """Keep run-level metrics and global moment statistics (``moments/<statistic>``), not
    per-layer ones (``moments.<statistic>/<layer>``)."""
    return not key.partition("/")[0].startswith("moments.")


class RunRecorder(FitStateCallback):
    """Records a run's metrics, learning rates, step times, optimizer-state size and fit time.

    Args:
        keep_layer_moments: keep per-layer moment statistics too (default: only
            ``moments/*``; per-layer ones stay in the run's own logger).

    After ``fit``, :meth:`summary` returns everything as plain JSON-ready values.
    """

    def __init__(self, keep_layer_moments: bool = False) -> None:
        self.keep_layer_moments = bool(keep_layer_moments)
        self.history = MetricsHistory(keep=None if keep_layer_moments else _global_statistics_only)
        self.lr_schedule: list[list[float]] = []  # [step, lr] per optimizer step
        self.step_seconds: list[float] = []
        self.optimizer_state_bytes = 0
        self.optimizer_classes: list[str] = []
        self.fit_seconds = 0.0
        self.peak_device_memory_bytes: int | None = None
        self._last_batch_start: float | None = None
        self._fit_started: float | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep_layer_moments=self.keep_layer_moments)

    # --- wiring -------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.history in trainer.loggers:
            return
        self.history.save_dir = trainer.default_root_dir
        trainer.loggers = [*trainer.loggers, self.history]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_started = time.perf_counter()
        self._last_batch_start = None
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    # --- per step -----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last_batch_start is not None:
            self.step_seconds.append(now - self._last_batch_start)
        self._last_batch_start = now

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
        if optimizer is not trainer.optimizers[0]:
            return  # one learning-rate curve: the first optimizer's
        lr = max(float(group["lr"]) for group in optimizer.param_groups)
        self.lr_schedule.append([trainer.global_step, lr])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if trainer.global_step == 1 or trainer.global_step % trainer.log_every_n_steps == 0:
            self._measure_optimizer_state(trainer)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_start = None  # the next interval would contain the validation loop

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_batch_start = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_optimizer_state(trainer)
        if self._fit_started is not None:
            self.fit_seconds += time.perf_counter() - self._fit_started
            self._fit_started = None
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device)
            self.peak_device_memory_bytes = max(self.peak_device_memory_bytes or 0, peak)

    def _measure_optimizer_state(self, trainer: pl.Trainer) -> None:
        self.optimizer_classes = [type(o).__name__ for o in trainer.optimizers]
        size = sum(optimizer_state_bytes(o) for o in trainer.optimizers)
        self.optimizer_state_bytes = max(self.optimizer_state_bytes, size)

    # --- results and checkpoints ----------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """What was recorded, as JSON-ready values."""
        return {
            "history": self.history.history,
            "lr_schedule": self.lr_schedule,
            "step_seconds": self.step_seconds,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "optimizer_classes": self.optimizer_classes,
            "fit_seconds": self.fit_seconds,
            "peak_device_memory_bytes": self.peak_device_memory_bytes,
        }

    def state_dict(self) -> dict[str, Any]:
        fit_seconds = self.fit_seconds
        if self._fit_started is not None:  # a checkpoint mid-fit carries the time so far
            fit_seconds += time.perf_counter() - self._fit_started
        return {**self.summary(), "fit_seconds": fit_seconds}

    def load_fit_state(self, state_dict: dict[str, Any]) -> None:
        """Only when a fit resumes: test(ckpt_path="best") keeps the history to the last step."""
        self.history.history = {k: [list(p) for p in v] for k, v in state_dict["history"].items()}
        self.lr_schedule = [list(p) for p in state_dict["lr_schedule"]]
        self.step_seconds = list(state_dict["step_seconds"])
        self.optimizer_state_bytes = int(state_dict["optimizer_state_bytes"])
        self.optimizer_classes = list(state_dict["optimizer_classes"])
        self.fit_seconds = float(state_dict["fit_seconds"])
        self.peak_device_memory_bytes = state_dict["peak_device_memory_bytes"]
