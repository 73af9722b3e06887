r"""Schedule-free AdamW and SGD (Defazio et al., 2024, "The Road Less Scheduled",
https://arxiv.org/abs/2405.15682).

No learning-rate schedule: the method keeps a base sequence ``z`` (plain SGD/Adam steps), an
average ``x`` of it (what is evaluated) and trains at the interpolation ``y`` between them.
The parameters hold ``y`` in train mode and ``x`` in eval mode; ``optimizer.train()`` and
``optimizer.eval()`` switch, and the optimizer starts in eval mode, as ``schedulefree`` 1.4.1
(the tests hold every implementation to its ``AdamWScheduleFree`` / ``SGDScheduleFree``,
train/eval switches included). In Lightning, :class:`~optim_callbacks.ScheduleFreeModes`
switches automatically.

Per group, at its ``k``-th step (from 0), with ``lr_t = lr * min(1, (k + 1) / warmup_steps)``::

    lr_max  <- max(lr_max, lr_t)
    w        = (k + 1)^r * lr_max^weight_lr_power;  weight_sum <- weight_sum + w
    c        = w / weight_sum

and per parameter, with gradient :math:`g` taken at ``y`` and beta the momentum (AdamW's
beta1, SGD's ``momentum``)::

    AdamW:  v <- beta2 v + (1 - beta2) g^2;  u = g / (sqrt(v / (1 - beta2^(k+1))) + eps) + wd y
    SGD:    u = g + wd y
    y <- (1 - c) y + c z + lr_t (beta (1 - c) - 1) u
    z <- z - lr_t u                                          (state "z"; AdamW also "exp_avg_sq")
    eval:   x = y + (1 - 1/beta) (z - y)     train:  y = x + (1 - beta) (z - x)
"""

from __future__ import annotations

from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import ElementwiseOptimizer, GroupTensors, Tensors
from optim_callbacks.compiled_update import CompiledUpdate
from optim_callbacks.sharded import local_part
from optim_callbacks.validation import check_betas, check_in_range, check_non_negative

__all__ = ["ScheduleFreeAdamW", "ScheduleFreeSGD"]

_B2, _OMB2, _INV_BC2, _EPS, _WD, _CKP1, _Y_STEP, _NEG_LR = range(8)


def _adamw_schedule_free_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    z: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """One schedule-free AdamW step for one tensor (``param`` holds y) in ``c.dtype``."""
    y = param.to(c.dtype)
    g = grad.to(c.dtype)
    zc = z.to(c.dtype)
    v = exp_avg_sq.to(c.dtype) * c[_B2] + g * g * c[_OMB2]
    u = g / (torch.sqrt(v * c[_INV_BC2]) + c[_EPS]) + c[_WD] * y
    param.copy_(y + c[_CKP1] * (zc - y) + c[_Y_STEP] * u)
    z.copy_(zc + c[_NEG_LR] * u)
    exp_avg_sq.copy_(v)


def _sgd_schedule_free_update(
    param: torch.Tensor, grad: torch.Tensor, z: torch.Tensor, c: torch.Tensor
) -> None:
    """One schedule-free SGD step for one tensor (``param`` holds y) in ``c.dtype``."""
    y = param.to(c.dtype)
    zc = z.to(c.dtype)
    u = grad.to(c.dtype) + c[_WD] * y
    param.copy_(y + c[_CKP1] * (zc - y) + c[_Y_STEP] * u)
    z.copy_(zc + c[_NEG_LR] * u)


class _ScheduleFree(ElementwiseOptimizer):
    """What both share: the group's averaging weights, train/eval, the eval-mode guard."""

    _momentum_key: str  # the group option that is beta in the interpolation

    def _beta(self, group: dict[str, Any]) -> float:
        value = group[self._momentum_key]
        return float(value[0] if isinstance(value, tuple | list) else value)

    def initial_state(self, key: str, param: torch.Tensor) -> torch.Tensor:
        if key == "z":
            return param.detach().clone(memory_format=torch.preserve_format)
        return super().initial_state(key, param)

    @property
    def training(self) -> bool:
        """Whether the parameters hold ``y`` (train mode) rather than ``x`` (eval mode)."""
        return bool(self.param_groups[0]["train_mode"])

    @torch.no_grad()
    def eval(self) -> None:
        """Put ``x``, the average to evaluate, into the parameters (no-op in eval mode)."""
        self._switch(to_train=False)

    @torch.no_grad()
    def train(self) -> None:
        """Put ``y``, the point the gradients are taken at, into the parameters."""
        self._switch(to_train=True)

    def _switch(self, *, to_train: bool) -> None:
        """Interpolate every parameter toward ``z``; back in train mode, a ``y`` that
        :meth:`keep_train_point` kept replaces the interpolated one (``x`` and ``y`` are
        rounded in different places, so ``y -> x -> y`` is not exact in floating point)."""
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta = self._beta(group)
            weight = 1.0 - beta if to_train else 1.0 - 1.0 / beta
            for p in group["params"]:
                state = self.state.get(p, {})
                z = state.get("z")
                if z is not None:
                    local_part(p).lerp_(local_part(z).to(p.device), weight)
                kept = state.get("y") if to_train else None
                if kept is not None:
                    local_part(p).copy_(local_part(kept))
                    # a new dict: a state_dict() taken before (a checkpoint being written)
                    # shares the old one and must keep its "y"
                    self.state[p] = {key: v for key, v in state.items() if key != "y"}
            group["train_mode"] = to_train

    @torch.no_grad()
    def keep_train_point(self) -> None:
        """Keep a copy of ``y`` (state ``"y"``) so the next :meth:`train` restores it exactly.

        A checkpoint written in train mode holds the eval weights ``x`` and, with this, ``y``
        in the optimizer state: the uninterrupted run and a run resumed from the checkpoint
        both continue from the same bits of ``y``."""
        if not self.training:
            return
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state and "z" in self.state[p]:
                    self.state[p]["y"] = p.detach().clone()

    def step(self, closure: Any = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step (train mode only).

        The closure runs first: Lightning's precision plugins call ``step(closure=...)`` with
        forward and backward inside it, so which groups hold gradients is known only after it.
        A group steps (``k``, ``lr_max``, ``weight_sum`` and ``c`` advance, then every
        parameter with a gradient) when one of its parameters has a gradient; a group without
        any (every gradient dropped, as ``GradientClipping`` does for a non-finite step) is left
        exactly as it was, as if the batch had never been seen. (``schedulefree`` advances
        every group at every step; the two agree whenever each group has a gradient.)
        """
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(
                f"{type(self).__name__}.step: the optimizer is in eval mode; call "
                "optimizer.train() before training steps and optimizer.eval() before evaluating "
                "or saving (in Lightning, the ScheduleFreeModes callback does both)"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = [g for g in self.param_groups if any(p.grad is not None for p in g["params"])]
        for group in stepping:
            self._advance_weights(group)
        super().step()
        for group in stepping:
            group["k"] += 1
        return loss

    def _update(self, group: dict[str, Any], tensors: GroupTensors) -> None:
        """Compiled: the frame's rule. ``foreach`` and ``for-loop``: ``schedulefree``'s own
        operations in its order (bit-identical to schedulefree 1.4.1, as the Lightning tests
        require; the frame's eager rule rounds differently), on local shards: the subclass's
        direction ``u`` (:meth:`single_direction`, :meth:`foreach_direction`), then
        :meth:`_single_step` or :meth:`_foreach_step`."""
        if group["fused"] and self.compile_failure is None:
            super()._update(group, tensors)
            return
        params = [local_part(p) for p in tensors.params]
        grads = [local_part(g) for g in tensors.grads]
        states = [[local_part(t) for t in state] for state in tensors.states]
        if group["foreach"] is False:
            for p, g, state in zip(params, grads, states, strict=True):
                self._single_step(group, p, state[0], self.single_direction(group, g, state))
            return
        buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(params):
            buckets.setdefault((p.device, p.dtype), []).append(i)
        for indices in buckets.values():
            columns = [[states[i][k] for i in indices] for k in range(len(states[indices[0]]))]
            bucket = [params[i] for i in indices]
            u = self.foreach_direction(group, [grads[i] for i in indices], columns)
            self._foreach_step(group, bucket, columns[0], u)

    def _single_step(
        self, group: dict[str, Any], y: torch.Tensor, z: torch.Tensor, u: torch.Tensor
    ) -> None:
        """``u += wd y``; ``y <- lerp(y, z, c) + y_step u``; ``z <- z - lr_t u``, one tensor."""
        lr, ckp1, y_step = self._terms(group)
        if group["weight_decay"] != 0:
            u = u.add(y, alpha=group["weight_decay"])
        y.lerp_(z, ckp1)
        y.add_(u, alpha=y_step)
        z.sub_(u, alpha=lr)

    def _foreach_step(self, group: dict[str, Any], ys: Tensors, zs: Tensors, u: Tensors) -> None:
        """:meth:`_single_step` on a list of tensors with foreach kernels."""
        lr, ckp1, y_step = self._terms(group)
        if group["weight_decay"] != 0:
            u = torch._foreach_add(u, ys, alpha=group["weight_decay"])
        torch._foreach_lerp_(ys, zs, ckp1)
        torch._foreach_add_(ys, u, alpha=y_step)
        torch._foreach_sub_(zs, u, alpha=lr)

    def single_direction(
        self, group: dict[str, Any], grad: torch.Tensor, state: Tensors
    ) -> torch.Tensor:
        """The direction ``u`` before weight decay, updating the state besides ``z``: SGD's
        is the gradient."""
        return grad

    def foreach_direction(
        self, group: dict[str, Any], grads: Tensors, states: list[Tensors]
    ) -> Tensors:
        """:meth:`single_direction` on a list of tensors (``states`` by key)."""
        return grads

    def _terms(self, group: dict[str, Any]) -> tuple[float, float, float]:
        """``lr_t``, ``c`` and the ``y`` step coefficient ``lr_t (beta (1 - c) - 1)``."""
        lr, ckp1 = group["scheduled_lr"], group["_ckp1"]
        return lr, ckp1, lr * (self._beta(group) * (1.0 - ckp1) - 1.0)

    def applied_lr(self, group: dict[str, Any]) -> float:
        """The learning rate the group's last step applied, ``lr_t = lr * min(1, k /
        warmup_steps)`` after its ``k``-th step (``MomentStatistics`` reads its step sizes
        ``lr_t / (sqrt(v_hat) + eps)`` with it; ``0.0`` before the first step)."""
        return float(group["scheduled_lr"])

    def _advance_weights(self, group: dict[str, Any]) -> None:
        """The group's ``lr_t``, ``lr_max``, averaging weight and ``c`` for its step ``k``."""
        k = group["k"]
        warmup = group["warmup_steps"]
        lr = float(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
        group["scheduled_lr"] = lr
        group["lr_max"] = max(lr, group["lr_max"])
        weight = (k + 1) ** group["r"] * group["lr_max"] ** group["weight_lr_power"]
        group["weight_sum"] = group["weight_sum"] + weight
        group["_ckp1"] = weight / group["weight_sum"] if group["weight_sum"] else 0.0

    def _shared_defaults(
        self, lr: Any, weight_decay: float, warmup_steps: int, r: float, weight_lr_power: float
    ) -> dict[str, Any]:
        check_non_negative("warmup_steps", warmup_steps)
        check_non_negative("r", r)
        check_non_negative("weight_lr_power", weight_lr_power)
        return dict(
            lr=lr,
            weight_decay=weight_decay,
            warmup_steps=warmup_steps,
            r=r,
            weight_lr_power=weight_lr_power,
            k=0,
            train_mode=False,
            weight_sum=0.0,
            lr_max=-1.0,
            scheduled_lr=0.0,
            _ckp1=0.0,
        )


class ScheduleFreeAdamW(_ScheduleFree):
    """Schedule-free AdamW (Defazio et al., 2024); formulas in the module docstring.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0); 0.0025 as schedulefree.
        betas: ``(beta1, beta2)``: beta1 is the interpolation ``y`` between ``x`` and ``z``.
        eps: added to the root of the bias-corrected second moment (> 0).
        weight_decay: evaluated at ``y``, added to the normalized gradient (>= 0).
        warmup_steps: linear warmup of the learning rate, built in.
        r: polynomial weighting of the average (0: uniform after warmup).
        weight_lr_power: the average weights steps by ``lr_max ** weight_lr_power``.
        foreach: ``False`` for schedulefree's operations one tensor at a time; ``None``/``True``
            for them as foreach kernels (both bit-identical to schedulefree 1.4.1).
        fused: ``True`` for the compiled single pass per tensor (the registry's default).

    State per parameter: ``step``, ``z`` and ``exp_avg_sq``; per group: ``k``, ``train_mode``,
    ``lr_max``, ``weight_sum``, ``scheduled_lr``.
    """

    state_keys = ("z", "exp_avg_sq")
    compiled = CompiledUpdate(_adamw_schedule_free_update)
    _momentum_key = "betas"

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        betas = check_betas("betas", betas)
        check_in_range("betas[0]", betas[0], 0.0, 1.0, low_inclusive=False)
        defaults = self._shared_defaults(lr, weight_decay, warmup_steps, r, weight_lr_power)
        defaults.update(betas=betas, eps=eps)
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    @staticmethod
    def _bias_correction(group: dict[str, Any]) -> float:
        """``1 - beta2^(k+1)``."""
        return 1.0 - float(group["betas"][1]) ** (group["k"] + 1)

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        lr, ckp1, y_step = self._terms(group)
        beta2 = float(group["betas"][1])
        return (
            beta2,
            1.0 - beta2,
            1.0 / self._bias_correction(group),
            float(group["eps"]),
            float(group["weight_decay"]),
            ckp1,
            y_step,
            -lr,
        )

    def foreach_direction(
        self, group: dict[str, Any], grads: Tensors, states: list[Tensors]
    ) -> Tensors:
        _, exp_avg_sqs = states
        beta2 = group["betas"][1]
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_div(exp_avg_sqs, self._bias_correction(group))
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, group["eps"])
        return torch._foreach_div(grads, denom)

    def single_direction(
        self, group: dict[str, Any], grad: torch.Tensor, state: Tensors
    ) -> torch.Tensor:
        _, exp_avg_sq = state
        beta2 = group["betas"][1]
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        return grad / exp_avg_sq.div(self._bias_correction(group)).sqrt_().add_(group["eps"])


class ScheduleFreeSGD(_ScheduleFree):
    """Schedule-free SGD (Defazio et al., 2024); formulas in the module docstring.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0); 1.0 as schedulefree.
        momentum: the interpolation ``y`` between ``x`` and ``z``, in (0, 1).
        weight_decay: evaluated at ``y`` (>= 0).
        warmup_steps, r, weight_lr_power, foreach, fused: as :class:`ScheduleFreeAdamW`.

    State per parameter: ``step`` and ``z``; per group as :class:`ScheduleFreeAdamW`.
    """

    state_keys = ("z",)
    compiled = CompiledUpdate(_sgd_schedule_free_update)
    _momentum_key = "momentum"

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        *,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        check_in_range("momentum", momentum, 0.0, 1.0, low_inclusive=False)
        defaults = self._shared_defaults(lr, weight_decay, warmup_steps, r, weight_lr_power)
        defaults.update(momentum=momentum)
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        lr, ckp1, y_step = self._terms(group)
        return (0.0, 0.0, 0.0, 0.0, float(group["weight_decay"]), ckp1, y_step, -lr)
