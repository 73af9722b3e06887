"""Switch from an adaptive optimizer (Adam and kin) to SGD mid-training, resume-safe and DDP-consistent.

Practitioners train fast with Adam and finish with SGD, which often generalizes better
(Keskar & Socher 2017; Wilson et al. 2017). The switch happens

- on a schedule: ``at_step`` (the first ``at_step`` optimizer steps use the source optimizer),
  ``at_epoch`` (epochs ``at_epoch, at_epoch + 1, ...`` use SGD) or ``at_fraction`` of
  ``trainer.estimated_stepping_batches``; or
- automatically, by the SWATS criterion (:mod:`optim_callbacks.callbacks.swats`), when none is
  given.

The SGD learning rate is given (``lr``, a *base* LR like the one given to Adam) or estimated by
SWATS: ``Lambda_k = lambda_k / (1 - beta2 ** k)`` per parameter group (or per parameter tensor
with ``granularity="layer"``). In the SGD phase the momentum buffer is torch's ordinary
heavy-ball buffer ``b = mu * b + g`` with ``w -= lr * b``, whose steps on a constant gradient
``g`` grow to ``lr * g / (1 - mu)``. There is no ``(1 - beta1)`` rescaling of the buffer: public
SWATS code that multiplies the buffer itself by ``1 - beta1`` at every step never reaches that
steady state.

The learning-rate schedule continues. Our schedules are ``LambdaLR`` multipliers ``f(step)``
(:mod:`optim_callbacks.schedules`); Adam's group ``i`` ran at ``base_i * f(step)``, SGD runs at
``sgd_base_i * f(step)`` from the same step on, so a cosine at 40% keeps its shape from there
and warmup is not replayed. ``sgd_base_i`` is ``lr * base_i / adam_lr`` for a given ``lr`` (per
group ratios such as ``lr_scale`` are kept) and ``Lambda * base_i / lr_used`` for an estimate,
where ``lr_used`` is the LR Adam used in the step the estimate was measured on (the estimate
is proportional to it). The scheduler config keeps its ``name``, so ``LearningRateMonitor``
logs one series across the switch.

The switch goes through ``trainer.strategy.optimizers`` (whose setter re-wraps the
``LightningOptimizer``) and ``trainer.strategy.lr_scheduler_configs``, then calls
``on_optimizers_changed(trainer, pl_module)`` on every callback that has it. It happens after
an optimizer step (or at an epoch start), so never inside an accumulation window, and after
``GradScaler.update()``, whose per-optimizer state is rebuilt for the new optimizer at its
first step.

The code is split by concern: :mod:`~optim_callbacks.callbacks.switch_checks` (what is
refused, and when), :mod:`~optim_callbacks.callbacks.switch_target` (the SGD optimizer: groups,
base LRs from a given LR or the SWATS estimate, momentum buffer),
:mod:`~optim_callbacks.callbacks.optimizer_swap` (putting it in the Trainer's place) and
:mod:`~optim_callbacks.callbacks.swats` (the statistics); this module decides when.

Resume: the callback's state (switched or not, the step, the SGD base LRs, the SWATS
statistics) is checkpointed. Lightning restores callbacks, then calls
``configure_optimizers``, then ``on_fit_start``, then loads optimizer and scheduler state; the
callback rebuilds SGD in ``on_fit_start`` (as ``BaseFinetuning`` does) so the checkpointed
momentum buffers and scheduler land in the right structure.

From a schedule-free optimizer (``schedule_free_adamw``, ``schedule_free_sgd``), SGD starts from
the average ``x`` the schedule-free run evaluates, not from its training point ``y``: the switch
puts the source in eval mode first.

DDP: the SWATS dot products are all-reduced (mean) before the decision, so every rank switches
at the same step with the same learning rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from optim_callbacks.callbacks._amp import unscale_gradients
from optim_callbacks.callbacks.optimizer_swap import keep_lr_series_name, replace_optimizer
from optim_callbacks.callbacks.swats import StepTracker, SwatsStatistics
from optim_callbacks.callbacks.switch_checks import (
    check_adam_family,
    check_lr_scheduler,
    check_source_optimizer,
    check_switch_arguments,
    check_trainer,
    fraction_to_step,
)
from optim_callbacks.callbacks.switch_target import (
    SwitchUnit,
    beta2_of,
    build_sgd,
    estimated_lr_conversions,
    given_lr_bases,
    momentum_from_first_moment,
    source_base_lrs,
    switch_units,
)
from optim_callbacks.optimizers import OptimizerSpec, spec_for
from optim_callbacks.schedules import is_schedule_free

__all__ = ["AdamToSGD", "OptimizerSwitch"]

LOG_PREFIX = "optimizer_switch"


class OptimizerSwitch(Callback):
    r"""Replace the adaptive optimizer by SGD at a scheduled point or when SWATS says so.

    Args:
        to: the SGD flavour from the optimizer registry: ``"sgd"``, ``"momentum"`` (heavy ball,
            default) or ``"nesterov"``.
        at_step: switch after this many optimizer steps (>= 1).
        at_epoch: switch at the start of this epoch (>= 1).
        at_fraction: switch after this fraction of ``trainer.estimated_stepping_batches``.
            At most one of ``at_step``, ``at_epoch``, ``at_fraction``; none: the SWATS criterion.
        lr: the SGD base learning rate (what the schedule multiplies, like the LR given to
            Adam; per-group ratios are kept). ``None``: estimated by SWATS.
        momentum: SGD momentum; default 0.9 (0 for ``to="sgd"``).
        weight_decay: SGD weight decay for the groups that decay; ``None`` keeps each group's
            own value (no-decay groups stay at 0 either way).
        momentum_init: ``"zero"`` (default) or ``"adam"``: start the buffer from Adam's
            bias-corrected first moment divided by ``1 - momentum``, the buffer's steady state
            for the same gradient (a raw copy would shrink the first SGD steps by ``1 - momentum``).
        granularity: SWATS statistics per parameter ``"group"`` (default) or per ``"layer"``
            (parameter tensor; with estimated LRs each tensor becomes its own SGD group, named
            ``<group name>.<parameter name>``).
        epsilon: the absolute SWATS tolerance on ``|Lambda_k - gamma_k|``; the paper's 1e-9 is
            the default and may never fire at practical LRs.
        min_steps: measured steps before the SWATS criterion may fire.
        beta2: the average's decay; ``None`` takes each group's ``betas[1]`` (else ``alpha``,
            ``rho``, else 0.999).
        estimated_lr_scale: multiplies the SWATS estimate; ``1 - momentum`` reproduces the
            paper's effective SGD step (its update is ``(1 - beta1) * Lambda * v``).
    """

    def __init__(
        self,
        to: str = "momentum",
        *,
        at_step: int | None = None,
        at_epoch: int | None = None,
        at_fraction: float | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        weight_decay: float | None = None,
        momentum_init: str = "zero",
        granularity: str = "group",
        epsilon: float = 1e-9,
        min_steps: int = 100,
        beta2: float | None = None,
        estimated_lr_scale: float = 1.0,
    ) -> None:
        self.to, self.nesterov = to, to == "nesterov"
        self.at_step, self.at_epoch, self.at_fraction = at_step, at_epoch, at_fraction  # when
        self.lr, self.weight_decay, self.momentum_init = lr, weight_decay, momentum_init  # SGD
        self.granularity, self.epsilon, self.min_steps = granularity, epsilon, min_steps  # SWATS
        self.beta2, self.estimated_lr_scale = beta2, estimated_lr_scale
        self.momentum = check_switch_arguments(self, momentum)  # momentum None: to's default

        # checkpointed state
        self.switched = False
        self.switch_step: int | None = None
        self.sgd_base_lrs: list[float] | None = None
        self.estimated_lrs: list[float] | None = None
        self.statistics: SwatsStatistics | None = None

        self._target_step: int | None = at_step
        self._units: list[SwitchUnit] = []
        self._tracker: StepTracker | None = None
        self._lrs_in_step: list[float] = []
        self._steps_at_batch_start = 0
        self._loaded_statistics: dict[str, Any] | None = None

    @property
    def automatic(self) -> bool:
        """Whether the SWATS criterion decides when to switch."""
        return self.at_step is None and self.at_epoch is None and self.at_fraction is None

    @property
    def estimates_lr(self) -> bool:
        return self.lr is None

    # ----------------------------------------------------------------- checkpoint state

    def state_dict(self) -> dict[str, Any]:
        return {
            "switched": self.switched,
            "switch_step": self.switch_step,
            "sgd_base_lrs": self.sgd_base_lrs,
            "estimated_lrs": self.estimated_lrs,
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called before configure_optimizers: the statistics are rebuilt in on_fit_start.
        self.switched = state_dict["switched"]
        self.switch_step = state_dict["switch_step"]
        self.sgd_base_lrs = state_dict["sgd_base_lrs"]
        self.estimated_lrs = state_dict["estimated_lrs"]
        self._loaded_statistics = state_dict["statistics"]

    def restore_before_optimizer_state(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: dict[str, Any]
    ) -> None:
        """Sharded strategies load the optimizer state before they restore callbacks, and after
        ``on_fit_start``; :class:`optim_callbacks.FSDP2Strategy` calls this first, with this
        callback's saved state, so that a run that had switched finds SGD in place."""
        self.load_state_dict(state)
        self.on_fit_start(trainer, pl_module)

    # ----------------------------------------------------------------- trainer checks

    def _check_source(self, optimizer: Optimizer) -> OptimizerSpec:
        return check_source_optimizer(
            optimizer,
            momentum_init=self.momentum_init,
            estimates_lr=self.automatic or self.estimates_lr,
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = check_trainer(trainer, pl_module)
        spec = self._check_source(source)
        keep_lr_series_name(check_lr_scheduler(trainer, source))
        if self.at_fraction is not None:
            self._target_step = fraction_to_step(self.at_fraction, trainer)

        names = {id(p): name for name, p in pl_module.named_parameters()}
        self._units = switch_units(source, per_tensor=self.granularity == "layer", names=names)
        if self.automatic or self.estimates_lr:
            self.statistics = SwatsStatistics(
                [beta2_of(source.param_groups[u.group_index], self.beta2) for u in self._units],
                self.epsilon,
                self.min_steps,
            )
            if self._loaded_statistics is not None:
                self.statistics.load_state_dict(self._loaded_statistics)
                self._loaded_statistics = None
            if not self.switched:
                params = [p for u in self._units for p in u.params]
                unit_of = [i for i, u in enumerate(self._units) for _ in u.params]
                self._tracker = StepTracker(params, unit_of, len(self._units))

        if self.switched:
            # Resuming after the switch: rebuild SGD before Lightning loads its state.
            assert self.sgd_base_lrs is not None
            expected = len(self._sgd_layout(source))
            if len(self.sgd_base_lrs) != expected:
                raise ValueError(
                    f"checkpoint: holds SGD learning rates for {len(self.sgd_base_lrs)} groups, the optimizer "
                    f"now gives {expected}; allowed: the parameter groups of the checkpointed run"
                )
            self._install(trainer, pl_module, source, spec, self.sgd_base_lrs, carry_momentum=False)
            rank_zero_info(
                f"OptimizerSwitch: resumed in the SGD phase (switched at step {self.switch_step})"
            )

    # ----------------------------------------------------------------- when to switch

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._steps_at_batch_start = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self.switched or self._tracker is None:
            return
        # SWATS dots the step with the gradient, which must be the unscaled one. Lightning
        # leaves a fused optimizer's unscaling to its step (whose kernel happens to write the
        # unscaled gradients back); unscaling here does not depend on that detail.
        unscale_gradients(trainer, optimizer)
        groups = trainer.optimizers[0].param_groups
        self._lrs_in_step = [float(groups[u.group_index]["lr"]) for u in self._units]
        self._tracker.before_step()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.switched:
            return
        if self._tracker is not None and self._tracker.pending:
            assert self.statistics is not None
            sums = trainer.strategy.reduce(self._tracker.after_step(), reduce_op="mean")
            step_squared, step_dot_descent = zip(*sums.tolist(), strict=True)
            self.statistics.update(step_squared, step_dot_descent, self._lrs_in_step)
        if trainer.global_step == self._steps_at_batch_start:
            return  # inside an accumulation window: no optimizer step happened
        if self.automatic:
            assert self.statistics is not None
            due = self.statistics.should_switch()
        else:
            due = self._target_step is not None and trainer.global_step >= self._target_step
        if due:
            self._switch(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (
            not self.switched
            and self.at_epoch is not None
            and trainer.current_epoch >= self.at_epoch
        ):
            self._switch(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.automatic and not self.switched and self.statistics is not None:
            gaps = [self.statistics.gap(u) for u in range(len(self.statistics))]
            listing = ", ".join("n/a" if g is None else f"{g:.3g}" for g in gaps)
            rank_zero_warn(
                f"OptimizerSwitch: the SWATS criterion never fired (epsilon={self.epsilon:g}, last "
                f"|Lambda - gamma| per unit: {listing}); raise epsilon or schedule the switch"
            )

    # ----------------------------------------------------------------- the switch

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        source = trainer.optimizers[0]
        spec = self._check_source(source)
        layout = self._sgd_layout(source)
        if self.estimates_lr:
            assert self.statistics is not None
            estimates, conversions = estimated_lr_conversions(
                self.statistics, self.estimated_lr_scale
            )
            self.estimated_lrs = estimates
            bases = source_base_lrs(source, layout)
            base_lrs = [c * base for c, base in zip(conversions, bases, strict=True)]
        else:
            assert self.lr is not None
            self.estimated_lrs = None
            base_lrs = given_lr_bases(self.lr, source, layout)
        self.switched = True
        self.switch_step = trainer.global_step
        self.sgd_base_lrs = base_lrs
        sgd = self._install(
            trainer, pl_module, source, spec, base_lrs, carry_momentum=self.momentum_init == "adam"
        )
        if self._tracker is not None:
            self._tracker.release()
            self._tracker = None
        self._report(trainer, spec, sgd)

    def _sgd_layout(self, source: Optimizer) -> list[SwitchUnit]:
        """One SGD group per SWATS unit when LRs are estimated per unit, else per source group."""
        if self.estimates_lr:
            return self._units
        return switch_units(source, per_tensor=False, names={})

    def _install(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        source: Optimizer,
        spec: OptimizerSpec,
        base_lrs: Sequence[float],
        *,
        carry_momentum: bool,
    ) -> Optimizer:
        if is_schedule_free(source):
            # The parameters hold x, the schedule-free average (the result a schedule-free run
            # evaluates and saves), before SGD takes them over: continue from x, not from the
            # training point y. Once SGD is the trainer's optimizer, ScheduleFreeModes (which
            # switches the trainer's optimizers only) leaves the parameters alone.
            source.eval()
        layout = self._sgd_layout(source)
        sgd = build_sgd(
            source,
            layout,
            base_lrs,
            to=self.to,
            momentum=self.momentum,
            nesterov=self.nesterov,
            weight_decay=self.weight_decay,
        )
        if carry_momentum:
            momentum_from_first_moment(source, sgd, spec, self.momentum)
        replace_optimizer(trainer, pl_module, source, sgd, [u.group_index for u in layout])
        return sgd

    def _report(self, trainer: pl.Trainer, spec: OptimizerSpec, sgd: Optimizer) -> None:
        names = [g.get("name", f"pg{i + 1}") for i, g in enumerate(sgd.param_groups)]
        metrics: dict[str, float] = {f"{LOG_PREFIX}/step": float(self.switch_step or 0)}
        for i, (name, group) in enumerate(zip(names, sgd.param_groups, strict=True)):
            metrics[f"{LOG_PREFIX}/lr/{name}"] = float(group["lr"])
            if self.estimated_lrs is not None:
                metrics[f"{LOG_PREFIX}/estimated_lr/{name}"] = float(self.estimated_lrs[i])
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        how = "SWATS criterion" if self.automatic else "schedule"
        lrs = ", ".join(
            f"{name}={float(g['lr']):.4g}" for name, g in zip(names, sgd.param_groups, strict=True)
        )
        estimated = ""
        if self.estimated_lrs is not None:
            estimated = (
                " (estimated: "
                + ", ".join(f"{n}={e:.4g}" for n, e in zip(names, self.estimated_lrs, strict=True))
                + ")"
            )
        rank_zero_info(
            f"OptimizerSwitch: {spec.name} -> {self.to} (momentum={self.momentum:g}) at step {self.switch_step} "
            f"by {how}; SGD LR per group: {lrs}{estimated}"
        )


class AdamToSGD(OptimizerSwitch):
    """The common preset: Adam, AdamW or AdaBelief -> SGD with heavy-ball momentum 0.9.

    Automatic (SWATS) unless ``at_step``/``at_epoch``/``at_fraction`` is given; the SGD LR is
    estimated unless ``lr`` is given. ``nesterov=True`` switches to Nesterov momentum.
    """

    def __init__(
        self,
        *,
        at_step: int | None = None,
        at_epoch: int | None = None,
        at_fraction: float | None = None,
        lr: float | None = None,
        nesterov: bool = False,
        momentum: float = 0.9,
        weight_decay: float | None = None,
        momentum_init: str = "zero",
        epsilon: float = 1e-9,
        min_steps: int = 100,
    ) -> None:
        super().__init__(
            "nesterov" if nesterov else "momentum",
            at_step=at_step,
            at_epoch=at_epoch,
            at_fraction=at_fraction,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            momentum_init=momentum_init,
            epsilon=epsilon,
            min_steps=min_steps,
        )

    def _check_source(self, optimizer: Optimizer) -> OptimizerSpec:
        known = spec_for(optimizer)
        if known is not None:
            check_adam_family(known)  # SWATS's own message before the general ones
        return super()._check_source(optimizer)
