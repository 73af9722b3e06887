r"""Skip an optimizer step when the loss or the gradient norm spikes, as if its batch was never seen.

A *spike* is a step whose value ``x`` (the training loss, or the global L2 norm of the gradients
before clipping) lies far above the recent ones. With the last accepted values ``x_1..x_n`` of
a rolling window (at most ``window`` of them; skipped steps never enter it)::

    n >= warmup:        spike  <=>  x - mean > max(sigmas * std, min_relative_excess * |mean|)
    4 <= n < warmup:    spike  <=>  x > early_factor * max(x_1..x_n)        (when that max > 0)
    n < 4:              never

``std`` is the sample standard deviation (Bessel-corrected, ``torch.std_mean``), as OLMo-core
computes it. The relative floor keeps a flat window (``std`` near 0) from calling noise a spike.

Defaults, and where they come from:

- ``window=128``, ``sigmas=6``, ``warmup=64``: OLMo-core's ``SkipStepOptimizer``
  (``src/olmo_core/optim/skip_step_optimizer.py``: ``rolling_interval_length=128``,
  ``sigma_factor=6``, no decision before ``max(2, rolling_interval_length // 2)`` values, which
  was ``max(20, ...)`` before its January 2025 revision; 64 either way at 128).
- ``early_factor=10``: before the window is warm, Megatron-LM's spiky-loss check
  (``check_for_spiky_loss``, ``SPIKY_LOSS_FACTOR = 10`` with
  ``RerunStateMachine.is_unexpectedly_large``) flags a value 10x the largest seen; OLMo-core
  does not act at all there, so a bad batch in the first 64 steps went through.
- ``max_skip_fraction=0.1``: more than 10% of the last ``window`` steps skipped is not a stray
  bad batch but a diverging run (or a broken data shard): training stops with a checkpoint
  and one line, as ``GradientClipping`` does after non-finite steps. At 6 sigma a healthy run
  skips essentially never.

What a skip leaves untouched, so that a run with a skipped spike equals a run whose data lacked
that batch (``tests/lib/test_spike_skip.py`` checks the weights, the optimizer state and the
learning rates against exactly that run):

- the weights and the optimizer state, step counts included: the gradients are dropped
  (:func:`~optim_callbacks.callbacks.clipping.drop_gradients`, the mechanism
  ``GradientClipping`` skips non-finite steps with), so every registry optimizer skips every
  parameter; group-level state (schedule-free's averages, any ``group["step"]``) is put back;
- the step-interval LR schedulers: Lightning steps them after the optimizer step; their state
  and the groups' hyperparameters (``lr``, momentum, ...) are put back in
  ``on_train_batch_end``, so the next step runs at the LR the skipped one had;
- a ``16-mixed`` ``GradScaler``: its scale and growth tracker are put back (the scaler saw
  finite gradients and would otherwise count the step towards growing its scale).

``trainer.global_step`` does count the skipped batch (Lightning counts calls of
``optimizer.step``): ``max_steps``, ``every_n_train_steps`` and ``AdamToSGD(at_step=...)`` count
batches, skipped ones included.

The decision and the host: the window, the thresholds and the comparison are device tensors,
and one packed transfer per step (values, thresholds, verdict) brings the verdict to the host.
The host must know it before ``optimizer.step()``: no generic way exists to make every registry
optimizer (torch's, ours, schedule-free's group-level sums), the LR scheduler and the
``GradScaler`` step by a 0/1 factor. OLMo-core avoids that read by rewriting AdamW and Lion
around a step factor, and its LR scheduler advances over skipped steps; an exact
"never seen" for every optimizer and schedule is what this callback chose instead. Deferring the
read (to the next step's start, or to where Lightning reads values anyway, after the step) would
let the step run first; undoing it would take a copy of every weight and optimizer state before
each step, far costlier than reading 6 numbers. The read
comes after the backward pass, when the gradient norm is already computed: with
``GradientClipping`` (which reads the same norm on the host for its own decision; the norm is
computed once per step, :func:`~optim_callbacks.callbacks.clipping.pre_clip_norm`) it adds no
stall. Put ``SpikeSkip`` before ``GradientClipping`` in the callbacks so clipping counts only
the steps that are taken (either order skips correctly).

Gradient accumulation: the loss of a step is the sum of its micro-batches' losses as Lightning
hands them to ``backward`` (each divided by ``accumulate_grad_batches``: their mean), unscaled
when a ``GradScaler`` scaled them; the norm is that of the accumulated gradient. A skip drops
the whole accumulated step; its event names every micro-batch index.

Distributed: the loss differs per rank; the ``[loss, norm]`` pair of every rank is gathered in
one collective, and every rank decides from the same gathered values (mean loss over ranks, the
norm of the already all-reduced (DDP) or globally reduced (FSDP2) gradient), so all ranks skip
together. The gathered per-rank losses name the rank whose loss was highest.

Where a spike came from: each skip is recorded in :attr:`SpikeSkip.events` (and the run's log)
with the step, the epoch, the batch indices, which value spiked and by how much, the parameter
holding the largest share of the squared gradient norm, and the rank with the highest loss.
Every callback with an ``on_spike_skipped(trainer, pl_module, step, description)`` method is
told of each skip (:func:`notify_spike_skipped`): ``MomentStatistics`` marks it on its heatmaps.

Resume: the window, the recent verdicts, the counters and the events are in the callback's
checkpoint state, so a resumed run takes the same decisions as an uninterrupted one.

Logged through ``pl_module.log`` on the steps Lightning writes to its loggers (every
``log_every_n_steps``; ``self.log`` is most of this callback's per-step cost, so it is not called
on the others): ``spike_skip/skipped_steps`` and, once a threshold is active,
``spike_skip/loss_threshold`` and ``spike_skip/grad_norm_threshold``.
Non-finite values are left to ``GradientClipping`` (and the ``GradScaler``): such a step is
neither judged nor added to the window.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from optim_callbacks._compat import batches_that_stepped
from optim_callbacks.callbacks._amp import active_grad_scaler, unscale_gradients
from optim_callbacks.callbacks._strategy import check_supported_strategy
from optim_callbacks.callbacks.clipping import drop_gradients, pre_clip_norm, stop_training
from optim_callbacks.sharded import is_sharded, local_part, shard_group, sum_across
from optim_callbacks.validation import check_at_least, check_in_range, check_non_negative

__all__ = ["MONITORS", "SpikeSkip", "describe_event", "notify_spike_skipped"]

MONITORS = ("loss", "grad_norm")
EARLY_MIN_VALUES = 4  # the early (max-based) rule needs at least this many accepted values
MAX_EVENTS = 1000  # events kept (the counters keep counting past it)
_REPORTED_SKIPS = 10  # skips reported one line each; later ones only counted


class SpikeSkip(Callback):
    """Skip optimizer steps whose loss or gradient norm is a spike (see the module docstring).

    Args:
        window: how many recent accepted steps the mean and standard deviation cover
            (default 128, OLMo-core's).
        sigmas: a value more than ``sigmas`` standard deviations above the window's mean is a
            spike (default 6, OLMo-core's).
        warmup: the sigma rule acts once the window holds this many values (default 64,
            OLMo-core's ``window // 2``); ``<= window``.
        early_factor: before that, a value above ``early_factor`` times the largest value so
            far is a spike (default 10, Megatron-LM's spiky-loss factor); ``None``: no early
            rule.
        monitor: which values are judged: ``"loss"``, ``"grad_norm"`` or both (default).
        min_relative_excess: a value within this fraction of the window's mean is never a
            spike, whatever the standard deviation (default 0.05).
        max_skip_fraction: stop training when more than this share of the last ``window``
            steps were skipped (default 0.1); ``None``: never stop.
        save_checkpoint_on_stop: save a checkpoint before stopping (default ``True``).
    """

    def __init__(
        self,
        window: int = 128,
        sigmas: float = 6.0,
        warmup: int = 64,
        early_factor: float | None = 10.0,
        monitor: Sequence[str] = MONITORS,
        min_relative_excess: float = 0.05,
        max_skip_fraction: float | None = 0.1,
        save_checkpoint_on_stop: bool = True,
    ) -> None:
        self.window = check_at_least("window", window, 2)
        self.sigmas = float(check_in_range("sigmas", sigmas, 0.0, math.inf, low_inclusive=False))
        self.warmup = check_at_least("warmup", warmup, 2)
        if self.warmup > self.window:
            raise ValueError(
                f"warmup: got {warmup!r} with window={window!r}; allowed: an integer in "
                f"[2, window] (the window holds at most {window} values)"
            )
        if early_factor is not None:
            early_factor = check_in_range(
                "early_factor", early_factor, 1.0, math.inf, low_inclusive=False
            )
        self.early_factor = None if early_factor is None else float(early_factor)
        self.monitor = _check_monitor(monitor)
        self.min_relative_excess = float(
            check_non_negative("min_relative_excess", min_relative_excess)
        )
        if max_skip_fraction is not None:
            max_skip_fraction = check_in_range(
                "max_skip_fraction",
                max_skip_fraction,
                0.0,
                1.0,
                low_inclusive=False,
                high_inclusive=True,
            )
        self.max_skip_fraction = None if max_skip_fraction is None else float(max_skip_fraction)
        self.save_checkpoint_on_stop = bool(save_checkpoint_on_stop)

        # The window: accepted [loss, grad_norm] pairs, a ring of `window` columns (float64).
        self._values = torch.full((2, self.window), math.nan, dtype=torch.float64)
        self.accepted = 0  # accepted values so far (the ring's write position is this % window)
        self.recent: deque[int] = deque(maxlen=self.window)  # 1 per skipped, 0 per taken step
        self.skipped_steps = 0
        self.judged_steps = 0
        self.events: list[dict[str, Any]] = []
        self.stop_checkpoint_path: str | None = None
        # Within one optimizer step:
        self._losses: list[torch.Tensor] = []  # micro-batch losses as handed to backward
        self._batches: list[int] = []  # their batch indices
        self._restore: dict[str, Any] | None = None  # what a skip puts back after the step
        self._stop_requested = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def active_monitors(self) -> tuple[bool, bool]:
        return ("loss" in self.monitor, "grad_norm" in self.monitor)

    # ----------------------------------------------------------------------------- trainer checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "automatic_optimization: got False; SpikeSkip needs automatic optimization "
                "(it drops the gradients before Lightning's optimizer step)"
            )
        check_supported_strategy("SpikeSkip", trainer.strategy)

    # ------------------------------------------------------------------------- collecting values
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batches.append(int(batch_idx))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        self._losses.append(loss.detach().float().reshape(()))

    # ------------------------------------------------------------------------------ the decision
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        losses, batches = self._losses, self._batches
        self._losses, self._batches = [], []
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not params:  # nothing to step (training_step returned None, or a skip came first)
            return
        scaler = active_grad_scaler(trainer)
        unscale_gradients(trainer, optimizer)
        grads = [p.grad for p in params]
        norm = pre_clip_norm(trainer, optimizer, grads, 2.0)
        device = norm.device
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        loss = (
            torch.stack(losses).sum().to(device) / scale
            if losses
            else torch.full((), math.nan, device=device)
        )
        pair = torch.stack([loss.float(), norm.float()]).double()
        gathered = pair
        if trainer.world_size > 1:
            gathered = trainer.strategy.all_gather(pair)
        gathered = gathered.reshape(-1, 2)
        current = gathered.mean(dim=0)  # [loss over ranks, norm]
        thresholds = self._thresholds(device)
        judged = torch.tensor(self.active_monitors, device=device)
        spikes = (current > thresholds) & judged & torch.isfinite(current).all()
        # The one read per step: values, thresholds and verdicts together.
        packed = torch.cat([current, thresholds, spikes.double()]).tolist()
        values, limits, verdict = packed[0:2], packed[2:4], packed[4:6]
        if _logging_step(trainer):  # self.log costs ~0.3 ms a call: only where it is written
            pl_module.log(
                "spike_skip/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False
            )
            for name, limit, on in zip(MONITORS, limits, self.active_monitors, strict=True):
                if on and math.isfinite(limit):
                    pl_module.log(
                        f"spike_skip/{name}_threshold", limit, on_step=True, on_epoch=False
                    )
        if not all(math.isfinite(v) for v in values):
            return  # GradientClipping's (or the GradScaler's) business: neither judged nor kept
        self.judged_steps += 1
        if not any(verdict):
            self._accept(current)
            return
        event = self._describe(
            trainer, pl_module, params, gathered, losses, batches, values, limits, verdict, scale
        )
        self._restore = _snapshot(trainer, optimizer, scaler)
        drop_gradients(params)
        self._record_skip(trainer, event)
        notify_spike_skipped(trainer, pl_module, event["step"], describe_event(event))

    def _thresholds(self, device: torch.device) -> torch.Tensor:
        """``[2]`` thresholds (loss, norm) from the accepted values; ``inf`` where none applies."""
        n = min(self.accepted, self.window)
        if self._values.device != device:
            self._values = self._values.to(device)
        inf = torch.full((2,), math.inf, dtype=torch.float64, device=device)
        if n >= self.warmup:
            std, mean = torch.std_mean(self._values[:, :n], dim=1)
            excess = torch.maximum(self.sigmas * std, self.min_relative_excess * mean.abs())
            return mean + excess
        if n >= EARLY_MIN_VALUES and self.early_factor is not None:
            largest = self._values[:, :n].amax(dim=1)
            return torch.where(largest > 0, self.early_factor * largest, inf)
        return inf

    def _accept(self, current: torch.Tensor) -> None:
        self._values[:, self.accepted % self.window] = current
        self.accepted += 1
        self.recent.append(0)

    # ---------------------------------------------------------------------------------- a skip
    def _describe(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        params: list[torch.Tensor],
        gathered: torch.Tensor,
        losses: list[torch.Tensor],
        batches: list[int],
        values: list[float],
        limits: list[float],
        verdict: list[float],
        scale: float,
    ) -> dict[str, Any]:
        """The event of a skip: what spiked, by how much, and where it came from."""
        names = {id(p): name for name, p in pl_module.named_parameters()}
        squares = _squared_norms(params)
        share = squares / squares.sum().clamp_min(torch.finfo(squares.dtype).tiny)
        top = int(share.argmax())
        rank_losses = gathered[:, 0].tolist()
        micro = [float(x) / scale for x in losses]
        worst = max(range(len(micro)), key=micro.__getitem__) if micro else None
        return {
            "step": int(trainer.global_step),
            "epoch": int(trainer.current_epoch),
            "batches": batches,
            "worst_batch": batches[worst] if worst is not None and worst < len(batches) else None,
            "spiked": [m for m, v in zip(MONITORS, verdict, strict=True) if v],
            "loss": values[0],
            "loss_threshold": limits[0] if math.isfinite(limits[0]) else None,
            "grad_norm": values[1],
            "grad_norm_threshold": limits[1] if math.isfinite(limits[1]) else None,
            "layer": names.get(id(params[top]), f"parameter {top}"),
            "layer_share": float(share[top]),
            "rank": max(range(len(rank_losses)), key=rank_losses.__getitem__),
            "rank_losses": rank_losses,
        }

    def _record_skip(self, trainer: pl.Trainer, event: dict[str, Any]) -> None:
        self.skipped_steps += 1
        self.recent.append(1)
        self.events.append(event)
        del self.events[:-MAX_EVENTS]
        if self.skipped_steps <= _REPORTED_SKIPS:
            line = f"SpikeSkip: {describe_event(event)}"
            if self.skipped_steps == _REPORTED_SKIPS:
                line += " (later skips are counted in spike_skip/skipped_steps, not reported)"
            (rank_zero_warn if self.skipped_steps == 1 else rank_zero_info)(line)
        limit = self.max_skip_fraction
        if limit is not None and sum(self.recent) > limit * self.window:
            self._stop_requested = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self._restore is not None:
            _put_back(trainer, self._restore)
            self._restore = None
        if not self._stop_requested:
            return
        self._stop_requested = False
        why = (
            f"SpikeSkip: {sum(self.recent)} of the last {len(self.recent)} steps were skipped as "
            f"spikes (more than max_skip_fraction={self.max_skip_fraction} of window="
            f"{self.window}; last at global step {trainer.global_step}): a diverging run or "
            "broken data, not a stray batch"
        )
        advice = "Lower the learning rate or check the data at the batches named above"
        stop_training(self, trainer, pl_module, "spike-stop", why, advice)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "values": self._values.detach().cpu().clone(),
            "accepted": self.accepted,
            "recent": list(self.recent),
            "skipped_steps": self.skipped_steps,
            "judged_steps": self.judged_steps,
            "events": copy.deepcopy(self.events),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        values = state_dict["values"].to(torch.float64)
        accepted = int(state_dict["accepted"])
        if int(state_dict["window"]) != self.window:  # keep the newest values, in order
            n = min(accepted, int(state_dict["window"]))
            start = accepted - n
            order = [(start + i) % int(state_dict["window"]) for i in range(n)][-self.window :]
            kept = values[:, order]
            values = torch.full((2, self.window), math.nan, dtype=torch.float64)
            values[:, : kept.shape[1]] = kept
            accepted = kept.shape[1]
        self._values = values
        self.accepted = accepted
        self.recent = deque(state_dict["recent"], maxlen=self.window)
        self.skipped_steps = int(state_dict["skipped_steps"])
        self.judged_steps = int(state_dict["judged_steps"])
        self.events = list(state_dict["events"])


def notify_spike_skipped(
    trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, description: str
) -> None:
    """The project's interplay protocol for skips: every callback with
    ``on_spike_skipped(trainer, pl_module, step, description)`` hears of each skipped step (e.g.
    ``MomentStatistics`` draws it on its heatmaps), whatever its class."""
    for callback in trainer.callbacks:
        hook = getattr(callback, "on_spike_skipped", None)
        if callable(hook):
            hook(trainer, pl_module, step, description)


def describe_event(event: dict[str, Any]) -> str:
    """One line for a skip event of :attr:`SpikeSkip.events`."""
    parts = []
    for name, label in (("loss", "loss"), ("grad_norm", "gradient norm")):
        limit = event.get(f"{name}_threshold")
        if name in event["spiked"]:
            parts.append(f"{label} {event[name]:.4g} > {limit:.4g}")
    batches = event["batches"]
    where = f"batch {batches[0]}" if len(batches) == 1 else f"batches {batches[0]}-{batches[-1]}"
    if len(batches) > 1 and event.get("worst_batch") is not None:
        where += f" (highest loss in batch {event['worst_batch']})"
    source = (
        f"largest share of the squared gradient norm: {event['layer']} "
        f"({100 * event['layer_share']:.0f}%)"
    )
    ranks = event.get("rank_losses") or []
    rank = f"; rank {event['rank']} had the highest loss" if len(ranks) > 1 else ""
    return (
        f"skipped global step {event['step']} (epoch {event['epoch']}, {where}): "
        f"{' and '.join(parts)}; {source}{rank}"
    )


def _logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes this batch's ``on_step`` values to the loggers (its logger
    connector's rule: every ``log_every_n_steps`` batches that stepped, and when stopping); a
    value logged on another step would be overwritten before it is written."""
    every = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
    return (batches_that_stepped(trainer) + 1) % every == 0 or bool(trainer.should_stop)


def _check_monitor(monitor: Any) -> tuple[str, ...]:
    items = (monitor,) if isinstance(monitor, str) else tuple(monitor or ())
    if not items or any(m not in MONITORS for m in items):
        raise ValueError(
            f"monitor: got {monitor!r}; allowed: a non-empty list of {', '.join(MONITORS)}"
        )
    return tuple(m for m in MONITORS if m in items)


def _squared_norms(params: list[torch.Tensor]) -> torch.Tensor:
    """Each parameter's squared gradient L2 norm (float64; summed over the shards under FSDP2)."""
    local = [local_part(p.grad) for p in params]
    norms = torch.stack([n.double() for n in torch._foreach_norm(local)]).square()
    group = shard_group([p.grad for p in params])
    if group is not None:
        sharded = torch.tensor([is_sharded(p.grad) for p in params], device=norms.device)
        totals = sum_across(norms * sharded, group)
        norms = torch.where(sharded, totals, norms)
    return norms.cpu()


def _snapshot(
    trainer: pl.Trainer, optimizer: Optimizer, scaler: torch.amp.GradScaler | None
) -> dict[str, Any]:
    """What the step about to be skipped would change besides the parameters' state: the
    groups' hyperparameters and group-level state, the step-interval schedulers, the scaler."""
    groups = [
        {
            k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v))
            for k, v in group.items()
            if k != "params"
        }
        for group in optimizer.param_groups
    ]
    schedulers = [
        (config.scheduler, copy.deepcopy(config.scheduler.state_dict()))
        for config in trainer.lr_scheduler_configs
        if config.interval == "step" and not config.reduce_on_plateau
    ]
    epoch_schedulers = [
        (config.scheduler, config.scheduler.last_epoch)
        for config in trainer.lr_scheduler_configs
        if config.interval == "epoch" and not config.reduce_on_plateau
    ]
    return {
        "optimizer": optimizer,
        "groups": groups,
        "schedulers": schedulers,
        "epoch_schedulers": epoch_schedulers,
        "scaler": (scaler, scaler.state_dict()) if scaler is not None else None,
    }


def _put_back(trainer: pl.Trainer, saved: dict[str, Any]) -> None:
    """Undo what Lightning's step did after a skip (see :func:`_snapshot`). Nothing is put back
    into an optimizer or scheduler that was replaced meanwhile (an optimizer switch)."""
    current = [config.scheduler for config in trainer.lr_scheduler_configs]
    for scheduler, state in saved["schedulers"]:
        if any(scheduler is s for s in current):
            scheduler.load_state_dict(state)
    optimizer = saved["optimizer"]
    if any(optimizer is _unwrapped(o) for o in trainer.optimizers):
        for group, before in zip(optimizer.param_groups, saved["groups"], strict=True):
            for key, value in before.items():
                if isinstance(group.get(key), torch.Tensor) and isinstance(value, torch.Tensor):
                    group[key].copy_(value)
                else:
                    group[key] = value
        # An epoch-interval scheduler that stepped at this epoch's last batch keeps its change.
        for scheduler, last_epoch in saved["epoch_schedulers"]:
            if scheduler.last_epoch != last_epoch and scheduler.optimizer is optimizer:
                for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
                    group["lr"] = lr
    if saved["scaler"] is not None:
        scaler, state = saved["scaler"]
        scaler.load_state_dict(state)


def _unwrapped(optimizer: Any) -> Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)
