r"""Adafactor (Shazeer & Stern, 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", https://arxiv.org/abs/1804.04235) as ``torch.optim.Adafactor``, with a compiled update.

``fused=True`` computes torch's step in one compiled call per tensor (its row and column
reductions and the update-RMS clip need the whole tensor), instead of torch's loop with four
host synchronizations per tensor. State and options are torch's, so state dicts move between
``torch.optim.Adafactor`` and this class. Per tensor, at step ``t``, with ``eps1`` defaulting to
the dtype's machine epsilon (torch's formulation)::

    beta2_t' = t^beta2_decay;  rho = min(lr, 1 / sqrt(t));  alpha = max(eps2, RMS(theta)) * rho
    theta <- theta (1 - lr wd)
    matrices:  r <- lerp(r, mean_j g^2, beta2_t');  c <- lerp(c, mean_i g^2, beta2_t')
               v = r c / max(mean(r), eps1)                     (states "row_var", "col_var")
    vectors:   v <- lerp(v, g^2, beta2_t')                      (state "variance")
    u = g / sqrt(max(v, eps1^2));   theta <- theta - alpha / max(1, RMS(u) / d) * u
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from optim_callbacks.compiled_update import (
    CompiledUpdate,
    check_compiled_devices,
    coefficient_rows,
    step_compiled,
)
from optim_callbacks.sharded import local_part

__all__ = ["CompiledAdafactor", "adafactor"]

_SIGN, _OMB2, _RHO, _EPS1, _EPS2, _DECAY, _D = range(7)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x) / x.numel() ** 0.5


def _finish(
    param: torch.Tensor, p: torch.Tensor, g: torch.Tensor, v: torch.Tensor, c: torch.Tensor
) -> None:
    alpha = torch.clamp_min(_rms(p), c[_EPS2]) * c[_RHO]
    update = torch.rsqrt(torch.clamp_min(v, c[_EPS1] * c[_EPS1])) * g
    denom = torch.clamp_min(_rms(update) / c[_D], 1.0)
    param.copy_(p * c[_DECAY] - alpha / denom * update)


def _adafactor_matrix_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    row_var: torch.Tensor,
    col_var: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """torch's Adafactor step for one tensor of 2 or more dimensions, in ``c.dtype``."""
    p = param.to(c.dtype)
    g = grad.to(c.dtype) * c[_SIGN]
    square = g * g
    r = row_var.to(c.dtype)
    r = r + c[_OMB2] * (square.mean(dim=-1, keepdim=True) - r)
    k = col_var.to(c.dtype)
    k = k + c[_OMB2] * (square.mean(dim=-2, keepdim=True) - k)
    v = r * k / torch.clamp_min(r.mean(dim=-2, keepdim=True), c[_EPS1])
    _finish(param, p, g, v, c)
    row_var.copy_(r)
    col_var.copy_(k)


def _adafactor_vector_update(
    param: torch.Tensor, grad: torch.Tensor, variance: torch.Tensor, c: torch.Tensor
) -> None:
    """torch's Adafactor step for one 1-D tensor, in ``c.dtype``."""
    p = param.to(c.dtype)
    g = grad.to(c.dtype) * c[_SIGN]
    v = variance.to(c.dtype)
    v = v + c[_OMB2] * (g * g - v)
    _finish(param, p, g, v, c)
    variance.copy_(v)


_MATRIX = CompiledUpdate(_adafactor_matrix_update, per_tensor=True, flatten=False)
_VECTOR = CompiledUpdate(_adafactor_vector_update, per_tensor=True, flatten=False)


class CompiledAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` whose step is compiled (see the module docstring).

    If compiling fails, this instance warns once and steps with torch's own implementation.
    """

    #: Why compiling the fused update failed for this instance (then it steps with torch's).
    compile_failure: str | None = None

    def __init__(self, params: Any, **options: Any) -> None:
        options.pop("fused", None)
        if options.get("foreach"):
            raise ValueError("fused: cannot be True together with foreach=True; pick one")
        super().__init__(params, **options)
        self.defaults["fused"] = True
        for group in self.param_groups:
            group.setdefault("fused", True)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        if self.compile_failure is not None:
            return self._torch_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            matrices, vectors = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    if p.grad.dim() > 1:
                        row, col = list(p.grad.shape), list(p.grad.shape)
                        row[-1], col[-2] = 1, 1
                        state["row_var"] = p.grad.new_zeros(row)
                        state["col_var"] = p.grad.new_zeros(col)
                    else:
                        state["variance"] = torch.zeros_like(p.grad)
                state["step"] += 1
                keys = ("row_var", "col_var") if "row_var" in state else ("variance",)
                row = [local_part(p), local_part(p.grad), *(local_part(state[k]) for k in keys)]
                (matrices if len(keys) == 2 else vectors).append((row, state["step"]))
            params = [row[0] for row, _ in matrices + vectors]
            if params:
                check_compiled_devices(params, "Adafactor")
            for update, items in ((_MATRIX, matrices), (_VECTOR, vectors)):
                if items:
                    rows = [row for row, _ in items]
                    steps = [step for _, step in items]
                    coefficients = coefficient_rows(
                        rows,
                        lambda t, rows=rows, group=group: self._coefficients(group, t, rows),
                        steps,
                    )
                    step_compiled(self, update, rows, coefficients)
        return loss

    def _coefficients(
        self, group: dict[str, Any], step: float, rows: list[list[torch.Tensor]]
    ) -> tuple[float, ...]:
        lr = float(group["lr"])
        eps1, eps2 = group["eps"]
        if eps1 is None:
            eps1 = torch.finfo(rows[0][0].dtype).eps
        return (
            -1.0 if group["maximize"] else 1.0,
            step ** group["beta2_decay"],
            min(lr, step**-0.5),
            float(eps1),
            float(eps2),
            1.0 - lr * float(group["weight_decay"]),
            float(group["d"]),
        )

    def _torch_step(self, closure: Callable[[], float] | None) -> float | None:
        """torch's own step over this instance's groups and state (after a failed compile)."""
        fallback = getattr(self, "torch_fallback", None)
        if fallback is None:
            fallback = torch.optim.Adafactor([{"params": []}], lr=1e-2)
            self.torch_fallback = fallback
        fallback.param_groups, fallback.state = self.param_groups, self.state
        for group in self.param_groups:
            group["foreach"] = True if group.get("foreach") is None else group["foreach"]
        return fallback.step(closure)


def adafactor(
    params: Any,
    lr: float | torch.Tensor = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    foreach: bool | None = None,
    maximize: bool = False,
    fused: bool | None = None,
) -> torch.optim.Adafactor:
    """The registry's ``adafactor``: :class:`CompiledAdafactor` with ``fused=True``, else
    ``torch.optim.Adafactor`` itself."""
    options = dict(
        lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize
    )
    if fused:
        return CompiledAdafactor(params, foreach=foreach, **options)
    return torch.optim.Adafactor(params, foreach=foreach, **options)
