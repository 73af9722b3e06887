r"""Lion: EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of Optimization
Algorithms", https://arxiv.org/abs/2302.06675).

Per parameter, with gradient :math:`g` (negated with ``maximize``), as in the paper's
Algorithm 2 and ``lion-pytorch`` 0.2.5 (the tests hold all three implementations to it)::

    theta <- theta * (1 - lr * wd)                      decoupled weight decay
    theta <- theta - lr * sign(beta1 * m + (1 - beta1) * g)
    m     <- beta2 * m + (1 - beta2) * g                 (state "exp_avg")

One state tensor, no second moment and no eps. The sign makes every element's step exactly
``lr``, so Lion's ``lr`` is typically 3-10x smaller than AdamW's and its ``weight_decay``
3-10x larger (the paper, section 5).
"""

from __future__ import annotations

from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import ElementwiseOptimizer
from optim_callbacks.compiled_update import CompiledUpdate
from optim_callbacks.validation import check_betas

__all__ = ["Lion"]

_DECAY, _B1, _OMB1, _B2, _OMB2, _NEG_LR, _SIGN = range(7)


def _lion_update(
    param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, c: torch.Tensor
) -> None:
    """One Lion step for one tensor in ``c.dtype`` (columns ``_DECAY`` ... ``_SIGN``)."""
    g = grad.to(c.dtype) * c[_SIGN]
    m = exp_avg.to(c.dtype)
    update = torch.sign(m * c[_B1] + g * c[_OMB1])
    param.copy_(param.to(c.dtype) * c[_DECAY] + c[_NEG_LR] * update)
    exp_avg.copy_(m * c[_B2] + g * c[_OMB2])


class Lion(ElementwiseOptimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum, decoupled weight decay.

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0); 1e-4 as lion-pytorch.
        betas: ``(beta1, beta2)``: the interpolation of the update and the momentum's decay.
        weight_decay: decoupled, ``theta *= 1 - lr * wd`` (>= 0).
        maximize: ascend instead of descend.
        foreach: ``False``: the rule run eagerly one tensor at a time; ``None``/``True``:
            eagerly, small tensors packed (the frame in :mod:`._elementwise`).
        fused: ``True`` for the compiled single pass per tensor (the registry's default).

    State per parameter: ``step`` (float32 CPU tensor) and ``exp_avg``.
    """

    state_keys = ("exp_avg",)
    compiled = CompiledUpdate(_lion_update)

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        betas = check_betas("betas", betas)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        lr = float(group["lr"])
        beta1, beta2 = (float(b) for b in group["betas"])
        return (
            1.0 - lr * float(group["weight_decay"]),
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            -lr,
            -1.0 if group["maximize"] else 1.0,
        )
