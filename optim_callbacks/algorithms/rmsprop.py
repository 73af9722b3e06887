r"""RMSprop (Hinton, Srivastava & Swersky, 2012, Coursera "Neural Networks for Machine
Learning", lecture 6e; centered form: Graves, 2013, https://arxiv.org/abs/1308.0850) with a
compiled single-pass update.

``torch.optim.RMSprop`` plus ``fused=True``; every other option and the state are torch's.
Per parameter, with gradient :math:`g` (negated with ``maximize``) and L2 decay ``wd``::

    g      <- g + wd * theta
    v      <- alpha * v + (1 - alpha) * g^2                   (state "square_avg")
    centered:   a <- alpha * a + (1 - alpha) * g              (state "grad_avg")
                d  = sqrt(v - a^2) + eps
    otherwise:  d  = sqrt(v) + eps
    momentum:   b <- momentum * b + g / d;  theta <- theta - lr * b   (state "momentum_buffer")
    otherwise:  theta <- theta - lr * g / d
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.rmsprop import rmsprop

from optim_callbacks.algorithms._torch_base import CompiledTorchStep, averaging_coefficients
from optim_callbacks.compiled_update import CompiledUpdate

__all__ = ["RMSprop"]

_WD, _ALPHA, _ONE_MINUS_ALPHA, _EPS, _NEG_LR, _SIGN, _MOMENTUM = range(7)


def _gradient_and_square_avg(
    param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = param.to(c.dtype)
    g = grad.to(c.dtype) * c[_SIGN] + c[_WD] * p
    v = square_avg.to(c.dtype) * c[_ALPHA] + g * g * c[_ONE_MINUS_ALPHA]
    square_avg.copy_(v)
    return p, g, v


def _centered_gradient_and_denominator(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    grad_avg: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centered RMSprop's ``p``, ``g`` and ``d = sqrt(v - a^2) + eps`` (``v`` and ``a`` written
    to ``square_avg`` and ``grad_avg``)."""
    p, g, v = _gradient_and_square_avg(param, grad, square_avg, c)
    a = grad_avg.to(c.dtype) * c[_ALPHA] + g * c[_ONE_MINUS_ALPHA]
    grad_avg.copy_(a)
    return p, g, torch.sqrt(v - a * a) + c[_EPS]


def _momentum_step(
    param: torch.Tensor,
    p: torch.Tensor,
    momentum_buffer: torch.Tensor,
    step: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """``b <- momentum * b + step``; ``theta <- p - lr * b``."""
    b = momentum_buffer.to(c.dtype) * c[_MOMENTUM] + step
    param.copy_(p + c[_NEG_LR] * b)
    momentum_buffer.copy_(b)


# Four functions rather than one with flags: each is its own compiled code object, so the
# variants do not share torch's per-function recompile limit.
def _rmsprop_update(
    param: torch.Tensor, grad: torch.Tensor, square_avg: torch.Tensor, c: torch.Tensor
) -> None:
    """Plain RMSprop for one tensor in ``c.dtype`` (columns ``_WD`` ... ``_MOMENTUM``)."""
    p, g, v = _gradient_and_square_avg(param, grad, square_avg, c)
    param.copy_(p + c[_NEG_LR] * g / (torch.sqrt(v) + c[_EPS]))


def _rmsprop_momentum_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """RMSprop with momentum for one tensor."""
    p, g, v = _gradient_and_square_avg(param, grad, square_avg, c)
    _momentum_step(param, p, momentum_buffer, g / (torch.sqrt(v) + c[_EPS]), c)


def _rmsprop_centered_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    grad_avg: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """Centered RMSprop for one tensor."""
    p, g, d = _centered_gradient_and_denominator(param, grad, square_avg, grad_avg, c)
    param.copy_(p + c[_NEG_LR] * g / d)


def _rmsprop_centered_momentum_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    square_avg: torch.Tensor,
    momentum_buffer: torch.Tensor,
    grad_avg: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """Centered RMSprop with momentum for one tensor."""
    p, g, d = _centered_gradient_and_denominator(param, grad, square_avg, grad_avg, c)
    _momentum_step(param, p, momentum_buffer, g / d, c)


# (momentum > 0, centered) -> update
_COMPILED = {
    (False, False): CompiledUpdate(_rmsprop_update),
    (True, False): CompiledUpdate(_rmsprop_momentum_update),
    (False, True): CompiledUpdate(_rmsprop_centered_update),
    (True, True): CompiledUpdate(_rmsprop_centered_momentum_update),
}


class RMSprop(CompiledTorchStep, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with ``fused=True``: the update compiled into one pass per
    tensor (:mod:`optim_callbacks.compiled_update`); ``fused=None``/``False`` is torch's.

    If compiling fails, this instance warns once and steps with torch's foreach kernels.
    """

    functional = staticmethod(rmsprop)
    functional_states = ("square_avg", "grad_avg", "momentum_buffer")
    functional_options = (
        "maximize",
        "differentiable",
        "capturable",
        "lr",
        "alpha",
        "eps",
        "weight_decay",
        "momentum",
        "centered",
    )

    def __init__(
        self,
        params: Any,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            fused=fused,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            capturable=capturable,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
        )

    @staticmethod
    def _variant(group: dict[str, Any]) -> tuple[bool, bool]:
        return group["momentum"] > 0, bool(group["centered"])

    def state_keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        has_momentum, centered = self._variant(group)
        return ("square_avg",) + ("momentum_buffer",) * has_momentum + ("grad_avg",) * centered

    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        return _COMPILED[self._variant(group)]

    def coefficients(self, group: dict[str, Any]) -> tuple[float, ...]:
        return (*averaging_coefficients(group, "alpha"), float(group["momentum"]))
