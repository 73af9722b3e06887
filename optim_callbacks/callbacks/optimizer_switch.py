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
heavy-ball buffer ``b = mu * b + g`` with ``w -= lr * b``: no ``(1 - beta1)`` rescaling of the
buffer (the bug of public SWATS implementations, see DESIGN.md).

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

Resume: the callback's state (switched or not, the step, the SGD base LRs, the SWATS
statistics) is checkpointed. Lightning restores callbacks, then calls
``configure_optimizers``, then ``on_fit_start``, then loads optimizer and scheduler state; the
callback rebuilds SGD in ``on_fit_start`` (as ``BaseFinetuning`` does) so the checkpointed
momentum buffers and scheduler land in the right structure.

DDP: the SWATS dot products are all-reduced (mean) before the decision, so every rank switches
at the same step with the same learning rates.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from optim_callbacks.callbacks._amp import unscale_gradients
from optim_callbacks.callbacks.swats import StepTracker, SwatsStatistics
from optim_callbacks.optimizers import OPTIMIZERS, OptimizerSpec, build_optimizer, spec_for
from optim_callbacks.validation import (
    check_at_least,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
)

__all__ = ["AdamToSGD", "OptimizerSwitch"]

TARGET_MOMENTUM = {"sgd": 0.0, "momentum": 0.9, "nesterov": 0.9}
GRANULARITIES = ("group", "layer")
MOMENTUM_INITS = ("zero", "adam")
DEFAULT_BETA2 = 0.999
LOG_PREFIX = "optimizer_switch"


class _Unit(NamedTuple):
    """Parameters measured together by SWATS and, when LRs are estimated, one SGD group."""

    group_index: int
    params: list[torch.Tensor]
    label: str | None  # parameter name in per-layer mode


def notify_optimizers_changed(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """The project's interplay protocol: tell every callback that caches per-optimizer
    information that the optimizer(s) were replaced."""
    for callback in trainer.callbacks:
        hook = getattr(callback, "on_optimizers_changed", None)
        if callable(hook):
            hook(trainer, pl_module)


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
        self.to = check_choice("to", to, TARGET_MOMENTUM)
        given = {
            k: v
            for k, v in (("at_step", at_step), ("at_epoch", at_epoch), ("at_fraction", at_fraction))
            if v is not None
        }
        if len(given) > 1:
            listing = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(
                f"at_step/at_epoch/at_fraction: got {listing}; allowed: at most one of them "
                "(none: switch automatically by the SWATS criterion)"
            )
        if at_step is not None:
            check_at_least("at_step", at_step, 1)
        if at_epoch is not None:
            check_at_least("at_epoch", at_epoch, 1)
        if at_fraction is not None:
            check_in_range("at_fraction", at_fraction, 0.0, 1.0, low_inclusive=False)
        if lr is not None:
            check_positive("lr", lr)
        momentum = TARGET_MOMENTUM[to] if momentum is None else momentum
        check_in_range("momentum", momentum, 0.0, 1.0)
        if to == "nesterov" and momentum == 0:
            raise ValueError(
                "momentum: got 0 with to='nesterov'; allowed: a number in (0, 1) for Nesterov momentum"
            )
        if weight_decay is not None:
            check_non_negative("weight_decay", weight_decay)
        check_choice("momentum_init", momentum_init, MOMENTUM_INITS)
        if momentum_init == "adam" and momentum == 0:
            raise ValueError(
                "momentum_init: got 'adam' with momentum=0; allowed: 'zero' (plain SGD keeps no buffer)"
            )
        check_choice("granularity", granularity, GRANULARITIES)
        check_positive("epsilon", epsilon)
        check_at_least("min_steps", min_steps, 1)
        if beta2 is not None:
            check_in_range("beta2", beta2, 0.0, 1.0)
        check_positive("estimated_lr_scale", estimated_lr_scale)

        self.at_step = at_step
        self.at_epoch = at_epoch
        self.at_fraction = at_fraction
        self.lr = lr
        self.momentum = float(momentum)
        self.nesterov = to == "nesterov"
        self.weight_decay = weight_decay
        self.momentum_init = momentum_init
        self.granularity = granularity
        self.epsilon = epsilon
        self.min_steps = min_steps
        self.beta2 = beta2
        self.estimated_lr_scale = estimated_lr_scale

        # checkpointed state
        self.switched = False
        self.switch_step: int | None = None
        self.sgd_base_lrs: list[float] | None = None
        self.estimated_lrs: list[float] | None = None
        self.statistics: SwatsStatistics | None = None

        self._target_step: int | None = at_step
        self._units: list[_Unit] = []
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

    # ----------------------------------------------------------------- trainer checks

    def _check_source(self, optimizer: Optimizer) -> OptimizerSpec:
        spec = spec_for(optimizer)
        adaptive = sorted(name for name, s in OPTIMIZERS.items() if s.adaptive)
        if spec is None:
            raise ValueError(
                f"optimizer: got {type(optimizer).__name__}, which the optimizer registry does not know; "
                f"allowed: an adaptive registry optimizer ({', '.join(adaptive)}) or one registered "
                "with register_optimizer(..., second_moment=...)"
            )
        if not spec.adaptive:
            raise ValueError(
                f"optimizer: got {spec.name!r} ({type(optimizer).__name__}), which keeps no adaptive second "
                f"moment: there is nothing to switch from; allowed: {', '.join(adaptive)}"
            )
        if self.momentum_init == "adam" and spec.first_moment is None:
            raise ValueError(
                f"momentum_init: got 'adam' but optimizer {spec.name!r} keeps no first moment; allowed: 'zero'"
            )
        return spec

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ValueError(
                "automatic_optimization: got False; allowed: True (OptimizerSwitch steers Lightning's optimizer loop)"
            )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"optimizers: got {len(trainer.optimizers)}; allowed: exactly one optimizer to switch"
            )
        source = trainer.optimizers[0]
        spec = self._check_source(source)
        config = self._scheduler_config(trainer, source)
        if config is not None and config.name is None:
            # LearningRateMonitor names an unnamed scheduler after the optimizer class
            # ("lr-Adam" -> "lr-SGD"); a fixed name keeps one series across the switch.
            config.name = "lr"
            rank_zero_info(
                "OptimizerSwitch: named the LR scheduler 'lr' so its logged series survives the switch"
            )

        if self.at_fraction is not None:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    f"at_fraction: got {self.at_fraction!r} but the training length is unbounded; "
                    "allowed: set max_steps or max_epochs, or use at_step/at_epoch"
                )
            self._target_step = max(1, round(self.at_fraction * int(total)))

        names = {id(p): name for name, p in pl_module.named_parameters()}
        self._units = _units(source, per_tensor=self.granularity == "layer", names=names)
        if self.automatic or self.estimates_lr:
            self.statistics = SwatsStatistics(
                [self._beta2(source.param_groups[u.group_index]) for u in self._units],
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

    @staticmethod
    def _scheduler_config(trainer: pl.Trainer, optimizer: Optimizer) -> Any:
        configs = [c for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
        if len(configs) > 1:
            raise ValueError(
                f"lr_scheduler: got {len(configs)} schedulers on the optimizer; allowed: at most one"
            )
        if not configs:
            return None
        if type(configs[0].scheduler) is not LambdaLR:
            raise ValueError(
                f"lr_scheduler: got {type(configs[0].scheduler).__name__}; allowed: LambdaLR (build_scheduler), "
                "whose multiplier OptimizerSwitch continues on SGD, or no scheduler"
            )
        return configs[0]

    def _beta2(self, group: dict[str, Any]) -> float:
        if self.beta2 is not None:
            return self.beta2
        if "betas" in group:
            return float(group["betas"][1])
        for key in ("alpha", "rho"):
            if key in group:
                return float(group[key])
        return DEFAULT_BETA2

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
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
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
        adam_bases = [
            float(
                source.param_groups[u.group_index].get(
                    "initial_lr", source.param_groups[u.group_index]["lr"]
                )
            )
            for u in layout
        ]
        if self.estimates_lr:
            estimates, conversions = self._estimates()
            self.estimated_lrs = estimates
            base_lrs = [c * base for c, base in zip(conversions, adam_bases, strict=True)]
        else:
            reference = float(source.defaults["lr"])
            self.estimated_lrs = None
            base_lrs = [self.lr * base / reference for base in adam_bases]
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

    def _estimates(self) -> tuple[list[float], list[float]]:
        """Per SGD group: the SWATS learning rate and its ratio to the LR Adam used (the
        conversion factor applied to Adam's base LR)."""
        assert self.statistics is not None
        stats = self.statistics
        estimates: list[float | None] = []
        conversions: list[float | None] = []
        for unit in range(len(stats)):
            if stats.latched[unit]:
                estimate, lr_used = stats.latched_estimate[unit], stats.latched_lr[unit]
            else:
                estimate, lr_used = stats.estimate(unit), stats.last_lr[unit]
            if estimate is None or estimate <= 0 or not lr_used:
                estimates.append(None)
                conversions.append(None)
                continue
            estimate *= self.estimated_lr_scale
            estimates.append(estimate)
            conversions.append(estimate / lr_used)
        known = [c for c in conversions if c is not None]
        if len(known) < len(conversions):
            fallback = sum(known) / len(known) if known else 1.0
            rank_zero_warn(
                "OptimizerSwitch: no usable SWATS estimate for some parameters (no measured step); they "
                + (
                    "get the mean conversion of the others"
                    if known
                    else "keep Adam's learning rate"
                )
            )
            conversions = [fallback if c is None else c for c in conversions]
        return [math.nan if e is None else e for e in estimates], [float(c) for c in conversions]

    def _sgd_layout(self, source: Optimizer) -> list[_Unit]:
        """One SGD group per SWATS unit when LRs are estimated per unit, else per source group."""
        if self.estimates_lr:
            return self._units
        return _units(source, per_tensor=False, names={})

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
        layout = self._sgd_layout(source)
        sgd = self._build_sgd(source, layout, base_lrs)
        if carry_momentum:
            _momentum_from_first_moment(source, sgd, spec, self.momentum)
        configs = []
        for config in trainer.lr_scheduler_configs:
            if config.scheduler.optimizer is source:
                old = config.scheduler
                lambdas = [old.lr_lambdas[u.group_index] for u in layout]
                # The constructor takes one step: start one behind the old scheduler so both
                # stand at the same step and SGD's LR is sgd_base * f(that step). (On resume the
                # old one is fresh, at 0, and Lightning loads the checkpointed state next.)
                scheduler = LambdaLR(sgd, lambdas, last_epoch=old.last_epoch - 1)
                config = dataclasses.replace(config, scheduler=scheduler)
            configs.append(config)
        trainer.strategy.optimizers = [sgd]
        trainer.strategy.lr_scheduler_configs = configs
        notify_optimizers_changed(trainer, pl_module)
        return sgd

    def _build_sgd(
        self, source: Optimizer, layout: list[_Unit], base_lrs: Sequence[float]
    ) -> Optimizer:
        decaying = [float(g.get("weight_decay", 0.0)) > 0 for g in source.param_groups]
        if self.weight_decay is not None and self.weight_decay > 0 and not any(decaying):
            rank_zero_warn(
                f"OptimizerSwitch: weight_decay={self.weight_decay:g} has no group to apply to: the source "
                "optimizer decays none (build it with weight_decay > 0 to get decay/no-decay groups)"
            )
        own_keys = set(source.defaults) | {"params", "initial_lr", "lr", "weight_decay"}
        groups = []
        for unit, base in zip(layout, base_lrs, strict=True):
            original = source.param_groups[unit.group_index]
            group = {k: v for k, v in original.items() if k not in own_keys}  # name, lr_scale, ...
            weight_decay = float(original.get("weight_decay", 0.0))
            if self.weight_decay is not None:
                weight_decay = self.weight_decay if decaying[unit.group_index] else 0.0
            group.update(params=unit.params, lr=base, weight_decay=weight_decay)
            if unit.label is not None:
                group["name"] = f"{original.get('name', f'pg{unit.group_index + 1}')}.{unit.label}"
            groups.append(group)
        sgd = build_optimizer(
            self.to, groups, lr=max(base_lrs), momentum=self.momentum, nesterov=self.nesterov
        )
        for group, base in zip(sgd.param_groups, base_lrs, strict=True):
            group["initial_lr"] = base
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
        spec = super()._check_source(optimizer)
        if not spec.has_betas:
            adam_family = sorted(
                name for name, s in OPTIMIZERS.items() if s.adaptive and s.has_betas
            )
            raise ValueError(
                f"optimizer: got {spec.name!r}; allowed for AdamToSGD: {', '.join(adam_family)} "
                "(use OptimizerSwitch for other adaptive optimizers)"
            )
        return spec


def _units(source: Optimizer, *, per_tensor: bool, names: dict[int, str]) -> list[_Unit]:
    units = []
    for index, group in enumerate(source.param_groups):
        params = [p for p in group["params"]]
        if not per_tensor:
            units.append(_Unit(index, params, None))
            continue
        for position, param in enumerate(params):
            units.append(_Unit(index, [param], names.get(id(param), f"param{position}")))
    return units


@torch.no_grad()
def _momentum_from_first_moment(
    source: Optimizer, sgd: Optimizer, spec: OptimizerSpec, momentum: float
) -> None:
    """``b = m / (1 - beta1 ** t) / (1 - momentum)``: Adam's bias-corrected first moment (an
    average of gradients) scaled to the heavy-ball buffer's steady state ``g / (1 - momentum)``."""
    assert spec.first_moment is not None
    beta1_of = {id(p): float(g["betas"][0]) for g in source.param_groups for p in g["params"]}
    for group in sgd.param_groups:
        for param in group["params"]:
            state = source.state.get(param, {})
            if spec.first_moment not in state:
                continue
            steps = float(state.get("step", 1))
            correction = 1.0 - beta1_of[id(param)] ** steps
            buffer = state[spec.first_moment].detach().clone().div_(correction * (1.0 - momentum))
            sgd.state[param]["momentum_buffer"] = buffer
