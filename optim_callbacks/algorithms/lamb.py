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

Under FSDP2 (parameters sharded on dim 0, possibly unevenly, a rank possibly holding no rows)
both norms are of the whole tensor: each rank computes its local sums of squares
``sum theta_local^2`` and ``sum u_local^2`` for every sharded tensor, all of them go into ONE
``all_reduce`` per step (:func:`~optim_callbacks.sharded.all_reduce_packed_`), and the update
runs after it. Every implementation does this with the same two functions (compiled, or eager
for foreach and the loop): the sums in one pass, the update in a second (recomputing ``m``,
``v`` and ``u`` instead of keeping ``u``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import (
    ElementwiseOptimizer,
    GroupTensors,
    Tensors,
    adam_init,
)
from optim_callbacks.compiled_update import (
    CompiledUpdate,
    coefficient_rows,
    local_rows,
    step_rows,
)
from optim_callbacks.sharded import all_reduce_packed_, common_shard_group, is_sharded

__all__ = ["LAMB"]

# The clamp phi(||theta||) = min(||theta||, 10) of pytorch-optimizer's Lamb.
TRUST_CLAMP = 10.0

_L2, _DECAY, _B1, _OMB1, _B2, _OMB2, _EPS, _NEG_LR, _SIGN = range(9)


def _moments(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decayed parameter, both moments and the direction ``u``, in ``c.dtype``."""
    g = grad.to(c.dtype) * c[_SIGN]
    p = param.to(c.dtype) * c[_DECAY]
    m = exp_avg.to(c.dtype) * c[_B1] + g * c[_OMB1]
    v = exp_avg_sq.to(c.dtype) * c[_B2] + g * g * c[_OMB2]
    u = m / (torch.sqrt(v) + c[_EPS]) + c[_L2] * p
    return p, m, v, u


def _trust(weight_norm: torch.Tensor, update_norm: torch.Tensor, eps: Any) -> torch.Tensor:
    """``r = min(||theta||, 10) / (||u|| + eps)``, or 1 where either norm is 0."""
    weight_norm = torch.clamp_max(weight_norm, TRUST_CLAMP)
    return torch.where(
        (weight_norm > 0) & (update_norm > 0), weight_norm / (update_norm + eps), 1.0
    )


def _write(
    param: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    moments: tuple[torch.Tensor, ...],
    trust: torch.Tensor,
    c: torch.Tensor,
) -> None:
    p, m, v, u = moments
    param.copy_(p + c[_NEG_LR] * trust * u)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def _lamb_update(param: torch.Tensor, grad: torch.Tensor, *rest: torch.Tensor) -> None:
    """One LAMB step for one whole tensor in ``c.dtype`` (``rest`` is ``exp_avg, exp_avg_sq,
    c``, as for the sharded pair below; columns ``_L2`` ... ``_SIGN``)."""
    exp_avg, exp_avg_sq, c = rest
    moments = _moments(param, grad, exp_avg, exp_avg_sq, c)
    p, _, _, u = moments
    trust = _trust(torch.linalg.vector_norm(p), torch.linalg.vector_norm(u), c[_EPS])
    _write(param, exp_avg, exp_avg_sq, moments, trust, c)


def _lamb_partial_squares(param: torch.Tensor, grad: torch.Tensor, *rest: torch.Tensor) -> None:
    """A shard's (or a slice's) ``[sum theta^2, sum u^2]`` added to ``squares`` (``rest`` is
    ``exp_avg, exp_avg_sq, squares, c``; nothing else is written)."""
    exp_avg, exp_avg_sq, squares, c = rest
    p, _, _, u = _moments(param, grad, exp_avg, exp_avg_sq, c)
    squares.add_(torch.stack([(p * p).sum(), (u * u).sum()]))


def _lamb_sharded_update(param: torch.Tensor, grad: torch.Tensor, *rest: torch.Tensor) -> None:
    """The step of one shard from the whole tensor's ``squares`` (summed over the ranks)."""
    exp_avg, exp_avg_sq, squares, c = rest
    moments = _moments(param, grad, exp_avg, exp_avg_sq, c)
    trust = _trust(torch.sqrt(squares[0]), torch.sqrt(squares[1]), c[_EPS])
    _write(param, exp_avg, exp_avg_sq, moments, trust, c)


# Per tensor (never packed), but sliceable: uncompiled, both passes run on cache-sized slices.
_PARTIAL_SQUARES = CompiledUpdate(_lamb_partial_squares, per_tensor=True, sliceable=True)
_SHARDED_UPDATE = CompiledUpdate(_lamb_sharded_update, per_tensor=True, sliceable=True)


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
        foreach: ``False``: the rule run eagerly one tensor at a time; ``None``/``True``:
            eagerly, small tensors packed (the frame in :mod:`._elementwise`).
        fused: ``True`` for the compiled update, one call per tensor (the registry's default).

    State per parameter: ``step`` (float32 CPU tensor), ``exp_avg`` and ``exp_avg_sq``.
    """

    state_keys = ("exp_avg", "exp_avg_sq")
    compiled = CompiledUpdate(_lamb_update, per_tensor=True)

    __init__ = adam_init(betas=(0.9, 0.999), eps=1e-6, decoupled_weight_decay=True)

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

    # --- FSDP2: the norms of sharded tensors, one all_reduce per step -------------------------
    #: During :meth:`step`: ``(squares, finish)`` of sharded tensors waiting for their sums.
    _deferred: list[tuple[Tensors, Callable[[], None]]] | None = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional).

        While the frame walks the groups, each sharded tensor leaves its local sums of squares
        ``[sum theta^2, sum u^2]`` and what remains of its update; one packed ``all_reduce``
        then completes every sum, and the updates run."""
        shards = common_shard_group([p for g in self.param_groups for p in g["params"]], "LAMB")
        self._deferred = []
        try:
            loss = super().step(closure)
            deferred = self._deferred
        finally:
            self._deferred = None
        all_reduce_packed_([t for squares, _ in deferred for t in squares], shards)
        for _, finish in deferred:
            finish()
        return loss

    def _update(self, group: dict[str, Any], tensors: GroupTensors) -> None:
        """Compiled, whole tensors: the one-pass rule. Otherwise two passes (each on slices
        when uncompiled): the sums of squares, then the update; a shard's update waits for the
        sums of every rank."""
        compiled = bool(group.get("fused")) and self.compile_failure is None
        whole, shards = _by_sharding(tensors)
        if compiled and whole.params:
            super()._update(group, whole)
        elif whole.params:
            self._two_passes(group, whole)()
        if shards.params:
            if self._deferred is None:
                raise RuntimeError("LAMB: sharded tensors are updated only through step()")
            finish = self._two_passes(group, shards)
            self._deferred.append((self._squares, finish))

    def _two_passes(self, group: dict[str, Any], tensors: GroupTensors) -> Callable[[], None]:
        """The first pass now (sums of squares into ``self._squares``); the second returned."""
        params, grads, states, steps = tensors
        rows = local_rows(params, grads, *zip(*states, strict=True))
        coefficients = coefficient_rows(rows, lambda step: self.coefficients(group, step), steps)
        # A rank without rows of a tensor skips it (CompiledUpdate skips empty rows): zeros.
        rows = [[*row, c.new_zeros(2)] for row, c in zip(rows, coefficients, strict=True)]
        step_rows(self, group, _PARTIAL_SQUARES, rows, coefficients)
        self._squares = [row[-1] for row in rows]
        return lambda: step_rows(self, group, _SHARDED_UPDATE, rows, coefficients)


def _by_sharding(tensors: GroupTensors) -> tuple[GroupTensors, GroupTensors]:
    """The group's whole tensors, then its sharded ones (each with its gradients, state and
    step counts)."""
    flags = [is_sharded(p) for p in tensors.params]

    def part(sharded: bool) -> GroupTensors:
        return GroupTensors(
            *(
                [x for x, flag in zip(column, flags, strict=True) if flag is sharded]
                for column in tensors
            )
        )

    return part(False), part(True)
