r"""ADOPT (Taniguchi et al., 2024, "ADOPT: Modified Adam Can Converge with Any beta2 with the
Optimal Rate", NeurIPS 2024, https://arxiv.org/abs/2411.02853).

Adam normalizes the gradient by a second moment that already contains it; ADOPT normalizes by
the *previous* second moment and applies momentum after the normalization, which removes the
correlation that makes Adam diverge for some beta2. Per parameter, with gradient :math:`g`
(negated with ``maximize``), step :math:`t` from 1, as ``pytorch-optimizer`` 4.1.0 ``ADOPT``
(the tests hold all three implementations to it)::

    weight decay   L2 (default): g <- g + wd * theta;  decoupled: theta <- theta (1 - lr wd)
    t = 1:         v <- g^2                              (no parameter update)
    t > 1:         n = clip(g / max(sqrt(v), eps), t^(1/4))     (clip(x, c) = min(max(x, -c), c))
                   m <- m + (1 - beta1) (n - m)                 (state "exp_avg")
                   theta <- theta - lr * m
                   v <- beta2 v + (1 - beta2) g^2               (state "exp_avg_sq")

No bias correction: ``m`` averages normalized gradients, ``v`` starts at ``g_1^2``. The clip
at ``t^(1/4)`` is the paper's stabilisation (section 4, "clipped ADOPT").
"""

from __future__ import annotations

from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import ElementwiseOptimizer, adam_init
from optim_callbacks.compiled_update import CompiledUpdate

__all__ = ["ADOPT"]

_L2, _DECAY, _OMB1, _B2, _OMB2, _EPS, _CLIP, _NEG_LR, _SIGN = range(9)


def _adopt_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """One ADOPT step for one tensor in ``c.dtype`` (columns ``_L2`` ... ``_SIGN``). The first
    step needs no branch: its coefficients (``1 - beta1 = 0``, ``-lr = 0``, ``beta2 = 1``,
    ``1 - beta2 = 1``) leave ``m`` and the parameter as they are and set ``v = v + g^2``."""
    p = param.to(c.dtype)
    g = grad.to(c.dtype) * c[_SIGN] + c[_L2] * p
    m = exp_avg.to(c.dtype)
    v = exp_avg_sq.to(c.dtype)
    normed = g / torch.clamp_min(torch.sqrt(v), c[_EPS])
    normed = torch.minimum(torch.maximum(normed, -c[_CLIP]), c[_CLIP])
    m = m + c[_OMB1] * (normed - m)
    param.copy_(p * c[_DECAY] + c[_NEG_LR] * m)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v * c[_B2] + g * g * c[_OMB2])


class ADOPT(ElementwiseOptimizer):
    """ADOPT (Taniguchi et al., 2024): Adam that normalizes by the previous second moment.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0).
        betas: ``(beta1, beta2)``, each in [0, 1); the paper's default beta2 is 0.9999.
        eps: lower bound of ``sqrt(v)`` (> 0).
        weight_decay: L2 (``g += wd * theta``) by default, decoupled (``theta *= 1 - lr * wd``)
            with ``decoupled_weight_decay=True`` (>= 0).
        decoupled_weight_decay: pytorch-optimizer's ``weight_decouple``.
        maximize: ascend instead of descend.
        foreach: ``False``: the rule run eagerly one tensor at a time; ``None``/``True``:
            eagerly, small tensors packed (the frame in :mod:`._elementwise`).
        fused: ``True`` for the compiled single pass per tensor (the registry's default).

    State per parameter: ``step`` (float32 CPU tensor), ``exp_avg`` and ``exp_avg_sq``.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    compiled = CompiledUpdate(_adopt_update)

    __init__ = adam_init(betas=(0.9, 0.9999), eps=1e-6, decoupled_weight_decay=False)

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = group["decoupled_weight_decay"]
        first = step == 1  # only v <- v + g^2 (see _adopt_update)
        return (
            0.0 if decoupled else wd,
            1.0 - lr * wd if decoupled else 1.0,
            0.0 if first else 1.0 - beta1,
            1.0 if first else beta2,
            1.0 if first else 1.0 - beta2,
            float(group["eps"]),
            step**0.25,
            0.0 if first else -lr,
            -1.0 if group["maximize"] else 1.0,
        )
