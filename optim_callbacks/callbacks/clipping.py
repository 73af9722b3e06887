r"""Gradient clipping that keeps the pre-clip norm, adapts its threshold and survives NaNs.

Modes (``g`` = all gradients of the optimizer's parameters, ``||.||_p`` the global p-norm over
every element of ``g``):

- ``norm``: ``g <- g * max_norm / ||g||_p`` when ``||g||_p > max_norm`` (any ``p``, ``inf``
  included: the largest absolute element). The transformer default, threshold 1.0.
- ``value``: every element clamped to ``[-max_value, max_value]``.
- ``agc``: adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image
  Recognition Without Normalization", https://arxiv.org/abs/2102.06171). For every *unit* ``i``
  of a parameter ``W`` (a row of a Linear weight, an output filter of a Conv; a whole tensor when
  it has one dimension) with gradient ``G``::

      ||W_i||* = max(||W_i||_F, agc_eps)
      G_i <- clip_factor * ||W_i||* / ||G_i||_F * G_i    if ||G_i||_F / ||W_i||* > clip_factor

  The paper leaves the final classifier unclipped: name it in ``exclude``.
- ``auto``: AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source
  Separation Networks", https://arxiv.org/abs/2007.14469): the norm of this step joins a history
  of the last ``history_size`` finite norms and the step is clipped as in ``norm`` mode with
  ``max_norm`` = the ``percentile``-th percentile of that history (linear interpolation between
  ranks, like ``numpy.percentile``). With the paper's ``percentile=10`` most steps are clipped
  (to a typical small norm): that is the method, not a bug.

Logged every step through ``pl_module.log`` (so ``Trainer(log_every_n_steps=...)`` applies):
``grad_clip/pre_clip_norm`` (global ``norm_type``-norm before clipping), ``grad_clip/coefficient``
(``||g_clipped|| / ||g||``, 1 when nothing was clipped), ``grad_clip/clipped_fraction`` (clipped
steps / finite steps since the start of training, resumes included), ``grad_clip/nonfinite_steps``
and, in ``auto`` mode, ``grad_clip/threshold``. Norms are computed in float32 whatever the
gradients' dtype (an fp16 sum of squares overflows at a norm of 256).

Cost: one host synchronisation per step (two in ``value`` and ``agc`` modes) to read the norm,
because skipping a step for non-finite gradients is a decision the host must take. Under FSDP2
the collectives per step are 1 (``norm``, ``auto``), 3 (``value``) and 4 (``agc``).
"""

from __future__ import annotations

import math
import os
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from optim_callbacks.callbacks._amp import active_grad_scaler, unscale_gradients
from optim_callbacks.callbacks._strategy import check_supported_strategy
from optim_callbacks.sharded import (
    any_across,
    check_data_parallel,
    global_norm,
    is_sharded,
    local_part,
    shard_group,
    sum_across,
)
from optim_callbacks.validation import (
    check_at_least,
    check_choice,
    check_in_range,
    check_non_negative,
    check_positive,
)

__all__ = [
    "GradientClipping",
    "drop_gradients",
    "percentile",
    "pre_clip_norm",
    "stop_training",
]

MODES = ("norm", "value", "agc", "auto")

# Options that only one mode reads; giving one to another mode is an error, not a silent no-op.
_MODE_OF_OPTION = {
    "max_norm": "norm",
    "max_value": "value",
    "clip_factor": "agc",
    "agc_eps": "agc",
    "exclude": "agc",
    "percentile": "auto",
    "history_size": "auto",
}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 < q <= 100``) of ``values`` with linear interpolation between
    the two nearest ranks (``numpy.percentile``'s default): rank ``r = q / 100 * (n - 1)``."""
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# This step's pre-clip global norm per optimizer: (trainer id, global step, norm type, norm).
_STEP_NORMS: weakref.WeakKeyDictionary[Optimizer, tuple[int, int, float, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def pre_clip_norm(
    trainer: pl.Trainer, optimizer: Optimizer, grads: Sequence[torch.Tensor], norm_type: float
) -> torch.Tensor:
    """This step's global ``norm_type``-norm of ``grads`` (a float32 device scalar, equal on
    every rank), computed once per optimizer step and shared by the callbacks that read it
    (``GradientClipping``, ``SpikeSkip``): whichever asks first computes it from the gradients
    as they are then, before any of them clipped or dropped them; the others get the same
    tensor, in any callback order. Call after :func:`~optim_callbacks.callbacks._amp.
    unscale_gradients`."""
    key = (id(trainer), trainer.global_step, norm_type)
    cached = _STEP_NORMS.get(optimizer)
    if cached is not None and cached[:3] == key:
        return cached[3]
    norm = global_norm(grads, norm_type)
    _STEP_NORMS[optimizer] = (*key, norm)
    return norm


def drop_gradients(params: Sequence[torch.Tensor]) -> None:
    """Skip this step's update of ``params``: their gradients become ``None``, so torch
    optimizers (and every registry entry) leave those parameters and all of their state
    untouched, step counts included. Zero gradients would not do: momentum, weight decay and
    Adam's bias-correction count would still move. Under a ``GradScaler`` the scaler still
    steps (it saw the gradients when it unscaled them) and updates its scale."""
    for p in params:
        p.grad = None


def stop_training(
    callback: Any,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    name: str,
    why: str,
    advice: str,
) -> None:
    """Stop training at the end of this batch and warn ``"<why>; stopping training. <where>
    <advice>, then resume with Trainer.fit(..., ckpt_path=...)."``.

    With ``callback.save_checkpoint_on_stop``, a checkpoint ``<name>-step=<global step>.ckpt``
    is saved first in the ``ModelCheckpoint`` directory (else ``<default_root_dir>/checkpoints``)
    and ``<where>`` names it (saying so when its weights are already non-finite); its path
    (``None`` without one) goes to ``callback.stop_checkpoint_path``. Every rank calls it
    (saving is a collective)."""
    path, where = None, ""
    if callback.save_checkpoint_on_stop:
        checkpoint_callback = trainer.checkpoint_callback
        directory = getattr(checkpoint_callback, "dirpath", None) or os.path.join(
            trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(directory, f"{name}-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        finite = all(bool(torch.isfinite(p).all()) for p in pl_module.parameters())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            where = f" Checkpoint of the last finite state: {path}."
        else:  # e.g. lr=inf: finite gradients, then a step that made the weights inf/NaN
            where = (
                f" Checkpoint saved ({path}), but its weights are already non-finite (a step "
                "with finite gradients made them so): resume from an earlier checkpoint instead."
            )
    trainer.should_stop = True
    callback.stop_checkpoint_path = path
    rank_zero_warn(
        f"{why}; stopping training.{where} {advice}, then resume with "
        "Trainer.fit(..., ckpt_path=...)."
    )


def _check_norm_type(value: Any) -> float:
    """A p-norm's ``p``: a finite number > 0, or ``math.inf`` (the largest absolute element)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    try:
        return float(check_positive("norm_type", value))
    except ValueError:
        raise ValueError(
            f"norm_type: got {value!r}; allowed: a finite number > 0 or math.inf"
        ) from None


def _unitwise_squares(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of squares per output unit (dim 0) of a local tensor, shaped to broadcast against it;
    one sum over the whole tensor when it has one dimension."""
    if tensor.ndim <= 1:
        return tensor.float().square().sum()
    dims = tuple(range(1, tensor.ndim))
    return tensor.float().square().sum(dim=dims, keepdim=True)


class GradientClipping(Callback):
    """Clip gradients in ``on_before_optimizer_step``, log what happened, skip non-finite steps.

    Args:
        mode: ``norm`` (default), ``value``, ``agc`` or ``auto`` (see the module docstring).
        max_norm: ``norm`` mode's threshold on the global ``norm_type``-norm (default 1.0).
        norm_type: the ``p`` of the global norm that is clipped (``norm``, ``auto``) and logged
            (all modes); ``math.inf`` for the largest absolute element. Default 2.
        max_value: ``value`` mode's bound on every element's absolute value (default 1.0).
        clip_factor: ``agc`` mode's lambda, the largest allowed ``||G_i|| / ||W_i||`` (default
            0.01, the paper's value for large batches; it used up to 0.16 for small ones).
        agc_eps: ``agc`` mode's floor on parameter norms, so zero-initialised units can move
            (default 1e-3, the paper's).
        exclude: ``agc`` mode: parameters whose qualified name starts with one of these prefixes
            are left unclipped (the paper excludes the final linear layer, e.g. ``"classifier"``).
        percentile: ``auto`` mode's percentile of the norm history, in (0, 100] (default 10).
        history_size: ``auto`` mode's number of recent finite norms kept (default 1000).
        max_consecutive_nonfinite: stop training after this many steps in a row with non-finite
            gradients (default 10).
        save_checkpoint_on_stop: when stopping for non-finite gradients, first save a checkpoint
            to the ``ModelCheckpoint`` directory, else ``<default_root_dir>/checkpoints``. It
            holds the last finite state (skipped steps never touch the parameters), unless the
            weights themselves became non-finite earlier, which the stop warning then says.

    Non-finite gradients (inf or NaN anywhere, seen as a non-finite global norm):

    - Without a gradient scaler (``32-true``, ``bf16-mixed``, ``16-true``, ...): every gradient
      of the optimizer is set to ``None``, so torch optimizers leave those parameters and their
      state untouched (Adam's step count and moments included; zero gradients would not do:
      momentum would still move the parameters). Lightning still calls ``optimizer.step()``,
      counts the step in ``trainer.global_step`` and steps a step-interval LR scheduler, so the
      schedule stays aligned with ``global_step``; the batch's update is simply lost. The first
      such step gives one warning.
    - With ``16-mixed``'s ``GradScaler``: the scaler itself skips the step and lowers its scale
      (normal while the scale calibrates, so this is reported once as information); the
      callback leaves the gradients to it and only counts and logs the step.

    Either way the steps are counted (``grad_clip/nonfinite_steps``), and after
    ``max_consecutive_nonfinite`` in a row training stops at the end of that batch, after
    saving a checkpoint, with a message naming it.

    AMP: Lightning unscales ``16-mixed`` gradients before this hook, except for optimizers
    that unscale inside their own step (torch's ``fused=True`` kernels, which the registry picks
    on CPU); for those the callback calls ``scaler.unscale_(optimizer)`` itself, which the
    scaler supports (the fused step then receives ``found_inf`` and no scale). Either way the
    clipped gradients are the unscaled ones.

    Distributed: under DDP every rank holds the same all-reduced gradients, so every rank
    computes the same norm and takes the same decision without any extra communication.
    Under FSDP2 (``FSDP2Strategy`` / ``ModelParallelStrategy`` with data parallelism) each rank
    holds a shard of every gradient: norms are global (local partial sums, one all-reduce;
    :mod:`optim_callbacks.sharded`), every rank clips its shard by the same coefficient and
    skips the same non-finite steps. FSDP1 and DeepSpeed are refused with a message.

    Manual optimization is refused, as Lightning refuses ``gradient_clip_val`` there.
    """

    def __init__(
        self,
        mode: str = "norm",
        *,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        max_value: float | None = None,
        clip_factor: float | None = None,
        agc_eps: float | None = None,
        exclude: Sequence[str] | None = None,
        percentile: float | None = None,
        history_size: int | None = None,
        max_consecutive_nonfinite: int = 10,
        save_checkpoint_on_stop: bool = True,
    ) -> None:
        self.mode = check_choice("mode", mode, MODES)
        given = {
            "max_norm": max_norm,
            "max_value": max_value,
            "clip_factor": clip_factor,
            "agc_eps": agc_eps,
            "exclude": exclude,
            "percentile": percentile,
            "history_size": history_size,
        }
        for option, value in given.items():
            if value is not None and _MODE_OF_OPTION[option] != mode:
                owner = _MODE_OF_OPTION[option]
                raise ValueError(
                    f"{option}: got {value!r}, but it is only used by mode={owner!r}; "
                    f"allowed with mode={mode!r}: {', '.join(self._options_of(mode)) or 'none'}"
                )
        self.max_norm = check_positive("max_norm", 1.0 if max_norm is None else max_norm)
        self.norm_type = _check_norm_type(norm_type)
        self.max_value = check_positive("max_value", 1.0 if max_value is None else max_value)
        self.clip_factor = check_positive(
            "clip_factor", 0.01 if clip_factor is None else clip_factor
        )
        self.agc_eps = check_non_negative("agc_eps", 1e-3 if agc_eps is None else agc_eps)
        if isinstance(exclude, str):
            raise ValueError(
                f"exclude: got {exclude!r}; allowed: a list of parameter-name prefixes"
            )
        self.exclude = tuple(exclude or ())
        self.percentile = check_in_range(
            "percentile",
            10.0 if percentile is None else percentile,
            0.0,
            100.0,
            low_inclusive=False,
            high_inclusive=True,
        )
        self.history_size = check_at_least(
            "history_size", 1000 if history_size is None else history_size, 1
        )
        self.max_consecutive_nonfinite = check_at_least(
            "max_consecutive_nonfinite", max_consecutive_nonfinite, 1
        )
        self.save_checkpoint_on_stop = bool(save_checkpoint_on_stop)

        self.history: deque[float] = deque(maxlen=self.history_size)
        self.finite_steps = 0
        self.clipped_steps = 0
        self.nonfinite_steps = 0
        self.consecutive_nonfinite = 0
        self.stop_checkpoint_path: str | None = None
        self._stop_requested = False
        self._reported_nonfinite = False
        self._excluded_params: set[int] | None = None
        self._check_sharding = True
        self.last_pre_clip_norm: float | None = None  # this step's global norm before clipping

    @staticmethod
    def _options_of(mode: str) -> list[str]:
        return [option for option, owner in _MODE_OF_OPTION.items() if owner == mode]

    @property
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode)

    @property
    def clipped_fraction(self) -> float:
        """Clipped steps / finite steps so far (0 before the first finite step)."""
        return self.clipped_steps / self.finite_steps if self.finite_steps else 0.0

    # ----------------------------------------------------------------------------- trainer checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.gradient_clip_val:  # None and 0 both mean "Lightning does not clip"
            raise ValueError(
                f"gradient_clip_val: got Trainer(gradient_clip_val={trainer.gradient_clip_val!r}) "
                f"together with GradientClipping(mode={self.mode!r}); both would clip the same "
                "gradients. Keep one: drop gradient_clip_val from the Trainer (GradientClipping("
                "mode='norm', max_norm=...) does the same and logs the pre-clip norm), or drop "
                "the callback."
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "automatic_optimization: got False; GradientClipping needs automatic "
                "optimization (as Trainer(gradient_clip_val=...) does); with manual optimization "
                "call self.clip_gradients(...) in training_step"
            )
        check_supported_strategy("GradientClipping", trainer.strategy)
        self._check_sharding = True
        self._excluded_params = None  # parameters are final after configure_model: first step
        if self.mode == "agc" and self.exclude:
            names = [name for name, _ in pl_module.named_parameters()]
            if not any(name.startswith(self.exclude) for name in names):
                raise ValueError(
                    f"exclude: got {list(self.exclude)!r}, which matches no parameter; "
                    f"parameter names start with e.g. {names[:5]!r}"
                )

    # ------------------------------------------------------------------------------ the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        params = [
            p for group in optimizer.param_groups for p in group["params"] if p.grad is not None
        ]
        if not params:  # training_step returned None: nothing was computed, nothing to clip
            return
        scaler = active_grad_scaler(trainer)
        # Lightning leaves the unscaling of fused optimizers to their step; clip unscaled
        # gradients anyway. The scaler then hands the fused step found_inf and no scale.
        unscale_gradients(trainer, optimizer)
        grads = [p.grad for p in params]
        if self._check_sharding:
            check_data_parallel(grads)
            self._check_sharding = False
        norm = float(pre_clip_norm(trainer, optimizer, grads, self.norm_type))
        self.last_pre_clip_norm = norm  # read by MomentStatistics (no second computation)
        if not math.isfinite(norm):
            self._skip_nonfinite(trainer, params, norm, scaler is not None)
            return
        self.consecutive_nonfinite = 0
        self.finite_steps += 1

        threshold = None
        if self.mode == "norm":
            clipped = self._clip_to_norm(grads, norm, self.max_norm)
        elif self.mode == "auto":
            self.history.append(norm)
            threshold = percentile(self.history, self.percentile)
            clipped = self._clip_to_norm(grads, norm, threshold)
        elif self.mode == "value":
            clipped = self._clip_by_value(grads, norm)
        else:
            clipped = self._clip_adaptively(pl_module, params)
        coefficient = 1.0
        if clipped:
            self.clipped_steps += 1
            coefficient = self._coefficient_after(grads, norm, threshold)

        log = pl_module.log
        log("grad_clip/pre_clip_norm", norm, on_step=True, on_epoch=False)
        log("grad_clip/coefficient", coefficient, on_step=True, on_epoch=False)
        log("grad_clip/clipped_fraction", self.clipped_fraction, on_step=True, on_epoch=False)
        log("grad_clip/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if threshold is not None:
            log("grad_clip/threshold", threshold, on_step=True, on_epoch=False)

    # Each clipper changes the gradients in place (through their local parts, so sharded
    # gradients too) and says whether it changed any, on any rank.
    @staticmethod
    def _clip_to_norm(grads: list[torch.Tensor], norm: float, max_norm: float) -> bool:
        if norm <= max_norm:
            return False
        torch._foreach_mul_([local_part(g) for g in grads], max_norm / norm)
        return True

    def _clip_by_value(self, grads: list[torch.Tensor], norm: float) -> bool:
        largest = norm if self.norm_type == math.inf else float(global_norm(grads, math.inf))
        if largest <= self.max_value:
            return False
        local = [local_part(g) for g in grads]
        torch._foreach_clamp_min_(local, -self.max_value)
        torch._foreach_clamp_max_(local, self.max_value)
        return True

    def _clip_adaptively(self, pl_module: pl.LightningModule, params: list[torch.Tensor]) -> bool:
        """AGC on local parts. FSDP2 shards on dim 0, so a unit (a row, an output filter) lies
        whole on one rank; a 1-D parameter is one unit spread over the ranks: its squares are
        summed across them (one collective for all of them)."""
        if self._excluded_params is None:  # fully_shard replaced the parameters after setup
            self._excluded_params = (
                {id(p) for name, p in pl_module.named_parameters() if name.startswith(self.exclude)}
                if self.exclude
                else set()
            )
        params = [p for p in params if id(p) not in self._excluded_params]
        if not params:
            return False
        group = shard_group([p.grad for p in params])
        weights = [_unitwise_squares(local_part(p.detach())) for p in params]
        grads = [_unitwise_squares(local_part(p.grad)) for p in params]
        spread = [i for i, p in enumerate(params) if p.ndim <= 1 and is_sharded(p.grad)]
        if spread:
            totals = torch.stack([weights[i] for i in spread] + [grads[i] for i in spread])
            sum_across(totals, group)
            for k, i in enumerate(spread):
                weights[i], grads[i] = totals[k], totals[len(spread) + k]
        clipped_any = torch.zeros((), dtype=torch.bool, device=local_part(params[0]).device)
        for p, weight_squares, grad_squares in zip(params, weights, grads, strict=True):
            weight_norm = weight_squares.sqrt().clamp_min(self.agc_eps)
            grad_norm = grad_squares.sqrt()
            allowed = self.clip_factor * weight_norm
            too_large = grad_norm > allowed
            scale = torch.where(too_large, allowed / grad_norm.clamp_min(1e-6), 1.0)
            local_grad = local_part(p.grad)
            local_grad.mul_(scale.to(local_grad.dtype))
            clipped_any |= too_large.any().to(clipped_any.device)
        return any_across(clipped_any, group)

    def _coefficient_after(
        self, grads: list[torch.Tensor], norm_before: float, threshold: float | None
    ) -> float:
        """``||g_clipped|| / ||g||``: known in closed form for norm clipping, measured otherwise."""
        if self.mode == "norm":
            return self.max_norm / norm_before
        if self.mode == "auto":
            return threshold / norm_before
        return float(global_norm(grads, self.norm_type)) / norm_before

    # ----------------------------------------------------------------------- non-finite steps
    def _skip_nonfinite(
        self, trainer: pl.Trainer, params: list[torch.Tensor], norm: float, scaled: bool
    ) -> None:
        self.nonfinite_steps += 1
        self.consecutive_nonfinite += 1
        step = trainer.global_step
        if scaled:
            if not self._reported_nonfinite:
                rank_zero_info(
                    f"GradientClipping: non-finite gradients (norm {norm}) at global step {step}; "
                    "the GradScaler skips this step and lowers its scale (normal while the scale "
                    "calibrates). Such steps are counted in grad_clip/nonfinite_steps; training "
                    f"stops after {self.max_consecutive_nonfinite} in a row."
                )
        else:
            for p in params:
                p.grad = None
            if not self._reported_nonfinite:
                rank_zero_warn(
                    f"GradientClipping: non-finite gradients (norm {norm}) at global step {step}; "
                    "the step is skipped (gradients dropped, optimizer state untouched). Later "
                    "ones are counted in grad_clip/nonfinite_steps without a warning; training "
                    f"stops after {self.max_consecutive_nonfinite} in a row."
                )
        self._reported_nonfinite = True
        trainer.lightning_module.log(
            "grad_clip/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False
        )
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            self._stop_requested = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if not self._stop_requested:
            return
        self._stop_requested = False
        why = (
            f"GradientClipping: {self.consecutive_nonfinite} steps in a row had non-finite "
            f"gradients (last at global step {trainer.global_step})"
        )
        advice = (
            "Lower the learning rate, check the data and the loss for inf/NaN, or raise "
            "max_consecutive_nonfinite"
        )
        stop_training(self, trainer, pl_module, "nonfinite-stop", why, advice)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "finite_steps": self.finite_steps,
            "clipped_steps": self.clipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "consecutive_nonfinite": self.consecutive_nonfinite,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = deque(state_dict["history"], maxlen=self.history_size)
        self.finite_steps = state_dict["finite_steps"]
        self.clipped_steps = state_dict["clipped_steps"]
        self.nonfinite_steps = state_dict["nonfinite_steps"]
        self.consecutive_nonfinite = state_dict["consecutive_nonfinite"]
