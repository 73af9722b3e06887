r"""Adadelta (Zeiler, 2012, "ADADELTA: An Adaptive Learning Rate Method",
https://arxiv.org/abs/1212.5701) with a compiled single-pass update.

``torch.optim.Adadelta`` plus ``fused=True``; every other option and the state are torch's.
Per parameter, with gradient :math:`g` (negated with ``maximize``) and L2 decay ``wd``::

    g      <- g + wd * theta
    v      <- rho * v + (1 - rho) * g^2                       (state "square_avg")
    delta   = sqrt(u + eps) / sqrt(v + eps) * g
    u      <- rho * u + (1 - rho) * delta^2                   (state "acc_delta")
    theta  <- theta - lr * delta
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.adadelta import adadelta

from optim_callbacks.algorithms._torch_base import CompiledTorchStep, averaging_coefficients
from optim_callbacks.compiled_update import CompiledUpdate

__all__ = ["Adadelta"]

_WD, _RHO, _ONE_MINUS_RHO, _EPS, _NEG_LR, _SIGN = range(6)


def _adadelta_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    acc_delta: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """One Adadelta step for one tensor in ``c.dtype`` (columns ``_WD`` ... ``_SIGN``)."""
    p = param.to(c.dtype)
    g = grad.to(c.dtype) * c[_SIGN] + c[_WD] * p
    v = square_avg.to(c.dtype) * c[_RHO] + g * g * c[_ONE_MINUS_RHO]
    u = acc_delta.to(c.dtype)
    delta = torch.sqrt((u + c[_EPS]) / (v + c[_EPS])) * g
    param.copy_(p + c[_NEG_LR] * delta)
    square_avg.copy_(v)
    acc_delta.copy_(u * c[_RHO] + delta * delta * c[_ONE_MINUS_RHO])


_COMPILED = CompiledUpdate(_adadelta_update)


class Adadelta(CompiledTorchStep, torch.optim.Adadelta):
    """``torch.optim.Adadelta`` with ``fused=True``: the update compiled into one pass per
    tensor (:mod:`optim_callbacks.compiled_update`); ``fused=None``/``False`` is torch's.

    If compiling fails, this instance warns once and steps with torch's foreach kernels.
    """

    functional = staticmethod(adadelta)
    functional_states = ("square_avg", "acc_delta")
    functional_options = (
        "capturable",
        "differentiable",
        "lr",
        "rho",
        "eps",
        "weight_decay",
        "maximize",
    )

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        *,
        fused: bool | None = None,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
    ) -> None:
        super().__init__(
            params,
            fused=fused,
            lr=lr,
            rho=rho,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            capturable=capturable,
            maximize=maximize,
            differentiable=differentiable,
        )

    def state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        return self.functional_states

    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        return _COMPILED

    def coefficients(self, group: dict[str, Any]) -> tuple[float, ...]:
        return averaging_coefficients(group, "rho")
