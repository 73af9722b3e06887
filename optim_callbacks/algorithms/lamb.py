r"""LAMB: layer-wise adaptive moments (You et al., 2019, "Large Batch Optimization for Deep
Learning: Training BERT in 76 minutes", https://arxiv.org/abs/1904.00962).

Adam's direction, rescaled per tensor by a trust ratio so every layer moves by a fixed
fraction of its norm, which keeps very large batches stable. Per parameter tensor, with
gradient :math:`g` (negated with ``maximize``), as ``pytorch-optimizer`` 4.1.0 ``Lamb`` (the
tests hold all three implementations to it, both weight-decay forms)::

    decoupled (default): theta <- theta (1 - lr wd)
    m  <- beta1 m + (1 - beta1) g                          (state "exp_avg")
    v  <- beta2 v + (1 - beta2) g^2                        (state "exp_avg_sq")
    u   = m / (sqrt(v) + eps)         L2 (decoupled_weight_decay=False): u <- u + wd theta
    phi = min(||theta||, 10)                               (the paper's clamp phi(z))
    r   = phi / (||u|| + eps)  if phi > 0 and ||u|| > 0,  else 1
    theta <- theta - lr / (1 - beta1^t) * r u

The variant: the first moment is bias-corrected through the step size, the second moment is
not (pytorch-optimizer's default); the trust ratio is taken on the uncorrected ``u`` and
clamped at 10 on the weight norm; no gradient pre-normalization. The norms are per tensor, so the compiled
update runs one call per tensor (no packing of small tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import ElementwiseOptimizer, Tensors
from optim_callbacks.compiled_update import CompiledUpdate
from optim_callbacks.validation import check_betas, check_positive

__all__ = ["LAMB"]

# The clamp phi(||theta||) = min(||theta||, 10) of pytorch-optimizer's Lamb.
TRUST_CLAMP = 10.0

_L2, _DECAY, _B1, _OMB1, _B2, _OMB2, _EPS, _NEG_LR, _SIGN = range(9)


def _lamb_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """One LAMB step for one whole tensor in ``c.dtype`` (columns ``_L2`` ... ``_SIGN``)."""
    g = grad.to(c.dtype) * c[_SIGN]
    p = param.to(c.dtype) * c[_DECAY]
    m = exp_avg.to(c.dtype) * c[_B1] + g * c[_OMB1]
    v = exp_avg_sq.to(c.dtype) * c[_B2] + g * g * c[_OMB2]
    u = m / (torch.sqrt(v) + c[_EPS]) + c[_L2] * p
    weight_norm = torch.clamp_max(torch.linalg.vector_norm(p), TRUST_CLAMP)
    update_norm = torch.linalg.vector_norm(u)
    trust = torch.where(
        (weight_norm > 0) & (update_norm > 0), weight_norm / (update_norm + c[_EPS]), 1.0
    )
    param.copy_(p + c[_NEG_LR] * trust * u)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


class LAMB(ElementwiseOptimizer):
    """LAMB (You et al., 2019) as pytorch-optimizer 4.1.0's ``Lamb``; formulas in the module
    docstring.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0).
        betas: ``(beta1, beta2)``, each in [0, 1).
        eps: added to ``sqrt(v)`` and to ``||u||`` (> 0).
        weight_decay: decoupled (default) or, with ``decoupled_weight_decay=False``, added to
            the update inside the trust ratio as in the paper (>= 0).
        decoupled_weight_decay: pytorch-optimizer's ``weight_decouple``.
        maximize: ascend instead of descend.
        foreach: ``False`` for the single-tensor loop; ``None``/``True`` for foreach kernels.
        fused: ``True`` for the compiled update, one call per tensor (the registry's default).

    State per parameter: ``step`` (float32 CPU tensor), ``exp_avg`` and ``exp_avg_sq``.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    compiled = CompiledUpdate(_lamb_update, per_tensor=True)

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = True,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        betas = check_betas("betas", betas)
        check_positive("eps", eps)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            maximize=maximize,
        )
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = group["decoupled_weight_decay"]
        return (
            0.0 if decoupled else wd,
            1.0 - lr * wd if decoupled else 1.0,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            float(group["eps"]),
            -lr / (1.0 - beta1**step),
            -1.0 if group["maximize"] else 1.0,
        )

    def _direction(
        self, group: dict[str, Any], params: Tensors, grads: Tensors, states: list[Tensors]
    ) -> Tensors:
        """Decay, the moments and the Adam direction ``u`` (foreach kernels)."""
        exp_avgs, exp_avg_sqs = states
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = group["betas"]
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0 and group["decoupled_weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        updates = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(updates, group["eps"])
        torch._foreach_reciprocal_(updates)
        torch._foreach_mul_(updates, exp_avgs)
        if wd != 0 and not group["decoupled_weight_decay"]:
            torch._foreach_add_(updates, params, alpha=wd)
        return updates

    def foreach_update(
        self,
        group: dict[str, Any],
        params: Tensors,
        grads: Tensors,
        states: list[Tensors],
        step: float,
    ) -> None:
        updates = self._direction(group, params, grads, states)
        weight_norms = torch.stack(torch._foreach_norm(params)).clamp_(max=TRUST_CLAMP)
        update_norms = torch.stack(torch._foreach_norm(updates))
        trust = torch.where(
            (weight_norms != 0) & (update_norms != 0),
            weight_norms / (update_norms + group["eps"]),
            1.0,
        )
        torch._foreach_mul_(updates, list(trust.unbind()))
        torch._foreach_add_(params, updates, alpha=-self._step_size(group, step))

    @staticmethod
    def _step_size(group: dict[str, Any], step: float) -> float:
        """``lr / (1 - beta1^t)``: the first moment's bias correction."""
        return float(group["lr"]) / (1.0 - float(group["betas"][0]) ** step)

    def single_update(
        self,
        group: dict[str, Any],
        param: torch.Tensor,
        grad: torch.Tensor,
        state: Tensors,
        step: float,
    ) -> None:
        (update,) = self._direction(group, [param], [grad], [[state[0]], [state[1]]])
        weight_norm = torch.linalg.vector_norm(param).clamp_(min=0, max=TRUST_CLAMP)
        update_norm = torch.linalg.vector_norm(update)
        trust = (
            1.0
            if weight_norm == 0 or update_norm == 0
            else weight_norm / (update_norm + group["eps"])
        )
        param.add_(update, alpha=-self._step_size(group, step) * float(trust))
