r"""AdaBelief: Adam whose second moment tracks the *belief* in the gradient.

Zhuang et al., 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
Gradients", NeurIPS 2020, https://arxiv.org/abs/2010.07468. This implementation follows the
paper's algorithm and reproduces ``adabelief_pytorch.AdaBelief`` 0.2.1 (the authors' package,
with ``fixed_decay=False``, ``degenerated_to_sgd=True``): in float64 the three implementations
below agree with it to 1e-9 relative over 100 steps; in float32 they differ by rounding only.

For a parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t` (starting at 1)::

    weight decay   decoupled (default):  theta <- theta * (1 - lr * wd)
                   L2 (decoupled_weight_decay=False):  g_t <- g_t + wd * theta
    first moment   m_t = beta1 * m_{t-1} + (1 - beta1) * g_t
    belief         s_t = beta2 * s_{t-1} + (1 - beta2) * (g_t - m_t)^2 + eps     (stored)
    amsgrad        s_max_t = max(s_max_{t-1}, s_t);  s_t below is replaced by s_max_t
    bias corr.     bc1 = 1 - beta1^t,  bc2 = 1 - beta2^t
    update         theta <- theta - lr / bc1 * m_t / (sqrt(s_t) / sqrt(bc2) + eps)

``eps`` enters twice, as in the paper: inside :math:`s_t` (kept in the state) and again in the
denominator.

With ``rectify=True`` the step follows RAdam (Liu et al., 2019): with
:math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
:math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`,

- if :math:`\rho_t \ge 5`:
  :math:`r_t = \sqrt{bc2 \cdot \frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}`
  and ``theta <- theta - lr * r_t / bc1 * m_t / (sqrt(s_t) + eps)``;
- otherwise (the first few steps, where the variance of the adaptive step is intractable) the
  un-adapted SGD-with-momentum step ``theta <- theta - lr / bc1 * m_t``.

The threshold (``>= 5``) and the placement of ``eps`` are those of adabelief-pytorch 0.2.1. So is
one quirk kept for compatibility: with ``rectify=True`` *and* ``amsgrad=True`` the rectified step
divides by :math:`s_t`, not by :math:`s^{max}_t` (the maximum is tracked and stored, but only the
un-rectified step uses it).

Implementations (same math, chosen by ``foreach`` / ``fused``):

- ``foreach=None, fused=None`` (default) or ``foreach=True``: ``torch._foreach_*`` kernels over
  the tensors of each parameter group, grouped by device and dtype; on CPU in cache-sized
  blocks (tensors cut into slices), so the dozen passes of a block read main memory about once.
- ``foreach=False``: a loop over single tensors, operation for operation as the authors' code.
- ``fused=True``: the update as one per-element function compiled by
  :class:`~optim_callbacks.compiled_update.CompiledUpdate`: one pass over each tensor (read
  parameter, gradient and state once, write them once), one graph per dtype whatever the
  shapes, hyperparameters and step counts as data (no recompile under a scheduler). The first
  step compiles (seconds; torch's on-disk cache makes later processes faster). If compiling
  fails, this instance warns once and uses the foreach path from then on. The registry's
  ``impl="auto"`` picks this path.

Low precision (fp16 / bf16 parameters): the state (``exp_avg``, ``exp_avg_var``,
``max_exp_avg_var``) is kept in the parameter's dtype, like ``torch.optim.Adam``; ``step`` is a
float32 CPU tensor. The foreach and single-tensor paths round after every operation; the fused
path computes in float32 and rounds once when it stores. bf16 has float32's exponent range, so
the default ``eps=1e-16`` works. In fp16 ``1e-16`` rounds to 0 and
:math:`(1-\beta_2)(g - m)^2` underflows for :math:`|g - m| \lesssim 8\cdot10^{-3}`, so an element
can get a zero denominator and an inf/NaN update: for pure fp16 training use ``eps >= 1e-7``
(stored as 1.19e-7) or keep fp32 master weights (``16-mixed``). The authors' package instead
casts fp16 parameters to fp32 for the step and keeps fp32 state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from optim_callbacks.algorithms._elementwise import ElementwiseOptimizer, Tensors, adam_defaults
from optim_callbacks.compiled_update import CompiledUpdate

__all__ = ["AdaBelief"]

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]

# Columns of the per-parameter coefficient table handed to the fused (compiled) update.
# The denominator is sqrt(s) * _ROOT_SCALE + _DENOM_ADD: 1 / sqrt(bc2) and eps for an adaptive
# step, 0 and 1 for the rectified SGD step (no branch in the compiled loop).
_L2, _DECAY, _B1, _OMB1, _B2, _OMB2, _EPS, _ROOT_SCALE, _DENOM_ADD, _NEG_STEP, _USE_MAX = range(11)


class _StepCoefficients:
    """Everything one step needs for one parameter that depends on hyperparameters and ``t``.

    ``adaptive`` is False for the rectified SGD step; ``sqrt_bc2`` is ``sqrt(1 - beta2^t)`` for
    the plain step and 1 for the rectified one (whose ``step_size`` already contains it).
    """

    __slots__ = ("adaptive", "decay", "l2", "sqrt_bc2", "step_size")

    def __init__(self, group: dict[str, Any], step: float) -> None:
        lr = float(group["lr"])
        weight_decay = float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = group["decoupled_weight_decay"]
        self.decay = 1.0 - lr * weight_decay if decoupled else 1.0
        self.l2 = 0.0 if decoupled else weight_decay
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        self.adaptive = True
        if not group["rectify"]:
            self.step_size = lr / bias_correction1
            self.sqrt_bc2 = math.sqrt(bias_correction2)
            return
        beta2_t = beta2**step
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * beta2_t / (1.0 - beta2_t)
        self.sqrt_bc2 = 1.0
        if rho_t >= 5.0:
            rect = math.sqrt(
                (1.0 - beta2_t)
                * (rho_t - 4.0)
                / (rho_inf - 4.0)
                * (rho_t - 2.0)
                / rho_t
                * rho_inf
                / (rho_inf - 2.0)
            )
            self.step_size = rect / bias_correction1 * lr
        else:
            self.adaptive = False
            self.step_size = 1.0 / bias_correction1 * lr


def _moments(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_var: torch.Tensor,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decayed parameter, ``m_t`` and ``s_t`` in ``c.dtype`` (both updates start here)."""
    p = param.to(c.dtype)
    g = grad.to(c.dtype) + c[_L2] * p
    m = exp_avg.to(c.dtype) * c[_B1] + g * c[_OMB1]
    r = g - m
    s = exp_avg_var.to(c.dtype) * c[_B2] + r * r * c[_OMB2] + c[_EPS]
    return p * c[_DECAY], m, s


def _adabelief_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_var: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """The whole AdaBelief step for one tensor, element-wise in ``c.dtype`` (compiled by
    :class:`~optim_callbacks.compiled_update.CompiledUpdate`). ``c`` holds the columns
    ``_L2`` ... ``_USE_MAX`` of :func:`_coefficient_row`."""
    p, m, s = _moments(param, grad, exp_avg, exp_avg_var, c)
    denom = torch.sqrt(s) * c[_ROOT_SCALE] + c[_DENOM_ADD]
    param.copy_(p + c[_NEG_STEP] * m / denom)
    exp_avg.copy_(m)
    exp_avg_var.copy_(s)


def _adabelief_amsgrad_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_var: torch.Tensor,
    max_exp_avg_var: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """:func:`_adabelief_update` that also keeps the running maximum of ``s`` (amsgrad) and,
    where ``c[_USE_MAX]`` is set (not rectified), divides by it."""
    p, m, s = _moments(param, grad, exp_avg, exp_avg_var, c)
    s_max = torch.maximum(max_exp_avg_var.to(c.dtype), s)
    v = torch.where(c[_USE_MAX] > 0, s_max, s)
    denom = torch.sqrt(v) * c[_ROOT_SCALE] + c[_DENOM_ADD]
    param.copy_(p + c[_NEG_STEP] * m / denom)
    exp_avg.copy_(m)
    exp_avg_var.copy_(s)
    max_exp_avg_var.copy_(s_max)


_COMPILED = CompiledUpdate(_adabelief_update)
_COMPILED_AMSGRAD = CompiledUpdate(_adabelief_amsgrad_update)


class AdaBelief(ElementwiseOptimizer):
    r"""AdaBelief (Zhuang et al., 2020), paper-exact, with single-tensor, foreach and fused paths.

    Per parameter, with :math:`g` the gradient (formulas in the module docstring)::

        m = beta1 * m + (1 - beta1) * g
        s = beta2 * s + (1 - beta2) * (g - m)^2 + eps
        theta -= lr / (1 - beta1^t) * m / (sqrt(s / (1 - beta2^t)) + eps)

    Args:
        params: parameters or parameter-group dicts.
        lr: learning rate (> 0).
        betas: decay rates of the first moment and of the belief :math:`s`, each in [0, 1).
        eps: added to :math:`s` (stored) and to the denominator (> 0).
        weight_decay: decoupled (``theta *= 1 - lr * wd``) by default, L2 (``g += wd * theta``)
            with ``decoupled_weight_decay=False`` (>= 0).
        decoupled_weight_decay: AdamW-style decay (the authors' ``weight_decouple=True``).
        rectify: RAdam rectification; the first steps are SGD with momentum.
        amsgrad: divide by the running maximum of :math:`s` (state ``max_exp_avg_var``).
        foreach: ``False`` for the single-tensor loop; ``None``/``True`` for foreach kernels.
        fused: ``True`` for the compiled single pass per tensor (compiles on the first step;
            this instance falls back to foreach with a warning if compiling fails).

    State per parameter: ``step`` (float32 CPU tensor), ``exp_avg``, ``exp_avg_var`` and, with
    amsgrad, ``max_exp_avg_var`` (in the parameter's dtype). Argument checks, state creation,
    step counting and the fused path are :class:`._elementwise.ElementwiseOptimizer`'s; the
    foreach and single-tensor paths are this module's own (:meth:`reference_update`).
    """

    state_keys = ("exp_avg", "exp_avg_var")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = True,
        rectify: bool = False,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        defaults = adam_defaults(
            lr,
            betas,
            eps,
            weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            rectify=rectify,
            amsgrad=amsgrad,
        )
        if len(defaults["betas"]) != 2:
            raise ValueError(f"betas: got {betas!r}; allowed: a pair of numbers in [0, 1)")
        super().__init__(params, defaults, foreach=foreach, fused=fused)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", True)
            group.setdefault("rectify", False)
            group.setdefault("amsgrad", False)

    def keys_for(self, group: dict[str, Any]) -> tuple[str, ...]:
        """``exp_avg``, ``exp_avg_var`` and, with amsgrad, ``max_exp_avg_var``."""
        return (*self.state_keys, "max_exp_avg_var") if group["amsgrad"] else self.state_keys

    def compiled_for(self, group: dict[str, Any]) -> CompiledUpdate:
        """:func:`_adabelief_amsgrad_update` with amsgrad, else :func:`_adabelief_update`."""
        return _COMPILED_AMSGRAD if group["amsgrad"] else _COMPILED

    def coefficients(self, group: dict[str, Any], step: float) -> tuple[float, ...]:
        """The columns ``_L2`` ... ``_USE_MAX`` of the compiled rule, from
        :class:`_StepCoefficients` (the one definition of the step's scalars). The denominator
        ``sqrt(s) * _ROOT_SCALE + _DENOM_ADD`` is ``sqrt(s) / sqrt(bc2) + eps`` for an adaptive
        step and ``1`` for the rectified SGD step."""
        c = _StepCoefficients(group, step)
        beta1, beta2 = (float(b) for b in group["betas"])
        use_max = group["amsgrad"] and not group["rectify"]
        return (
            c.l2,
            c.decay,
            beta1,
            1.0 - beta1,
            beta2,
            1.0 - beta2,
            float(group["eps"]),
            1.0 / c.sqrt_bc2 if c.adaptive else 0.0,
            float(group["eps"]) if c.adaptive else 1.0,
            -c.step_size,
            1.0 if use_max else 0.0,
        )

    def reference_update(self, group: dict[str, Any], rows: list[Tensors], steps: Tensors) -> bool:
        """``foreach`` (also after a failed compile) and ``for-loop``:
        :func:`_foreach_adabelief` and :func:`_single_tensor_adabelief`, in the reference's
        order of operations (the for-loop is bit-identical to adabelief-pytorch 0.2.1; the
        frame's eager rule rounds differently). The compiled path is the frame's rule."""
        eager = _single_tensor_adabelief if group["foreach"] is False else _foreach_adabelief
        eager(group, rows, steps)
        return True


def _coefficients_by_step(
    group: dict[str, Any], steps: list[torch.Tensor]
) -> list[_StepCoefficients]:
    """Coefficients per parameter (computed once per distinct step count in the group)."""
    cache: dict[float, _StepCoefficients] = {}
    out = []
    for step_t in steps:
        step = step_t.item()
        if step not in cache:
            cache[step] = _StepCoefficients(group, step)
        out.append(cache[step])
    return out


def _single_tensor_adabelief(group: dict[str, Any], rows: list[Tensors], steps: Tensors) -> None:
    """One tensor at a time, operation for operation as adabelief-pytorch 0.2.1 (the module
    docstring's formulas). A row is ``[param, grad, exp_avg, exp_avg_var]`` (and
    ``max_exp_avg_var`` with amsgrad); ``steps`` are already counted."""
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    rectify = group["rectify"]
    for (param, grad, exp_avg, exp_avg_var, *max_exp_avg_var), step in zip(
        rows, steps, strict=True
    ):
        c = _StepCoefficients(group, step.item())
        if c.decay != 1.0:
            param.mul_(c.decay)
        if c.l2 != 0.0:
            grad = grad.add(param, alpha=c.l2)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        residual = grad - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(eps)
        var = exp_avg_var
        if max_exp_avg_var:  # amsgrad
            torch.maximum(max_exp_avg_var[0], exp_avg_var, out=max_exp_avg_var[0])
            if not rectify:
                var = max_exp_avg_var[0]
        if c.adaptive:
            denom = (var.sqrt() / c.sqrt_bc2).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-c.step_size)
        else:
            param.add_(exp_avg, alpha=-c.step_size)


def _group_by_device_and_dtype(
    tensors: list[torch.Tensor],
) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


# Elements per block of the CPU foreach path: a block of parameter, gradient, two or three
# state tensors and the denominator (128k float32 elements each, ~3 MiB in all) stays in cache,
# so the dozen foreach passes over a block read main memory about once.
_CPU_BLOCK = 1 << 17


def _blocks(
    lists: list[list[torch.Tensor]], extra: list[Any], block: int
) -> Iterator[tuple[list[list[torch.Tensor]], list[Any]]]:
    """Split aligned tensor lists into blocks of about ``block`` elements.

    Contiguous tensors are cut into aligned flat slices (views, so in-place updates land in
    the tensors); any other tensor travels whole. ``extra`` (one item per tensor) is repeated
    for every slice of its tensor.
    """
    current: list[list[torch.Tensor]] = [[] for _ in lists]
    current_extra: list[Any] = []
    filled = 0
    for i in range(len(lists[0])):
        tensors = [lst[i] for lst in lists]
        numel = tensors[0].numel()
        if not all(t.is_contiguous() for t in tensors):
            for cur, t in zip(current, tensors, strict=True):
                cur.append(t)
            current_extra.append(extra[i])
            filled += numel
        else:
            flat = [t.view(-1) for t in tensors]
            start = 0
            while start < numel:
                take = min(numel - start, block - filled)
                for cur, t in zip(current, flat, strict=True):
                    cur.append(t[start : start + take])
                current_extra.append(extra[i])
                start += take
                filled += take
                if filled >= block:
                    yield current, current_extra
                    current, current_extra, filled = [[] for _ in lists], [], 0
        if filled >= block:
            yield current, current_extra
            current, current_extra, filled = [[] for _ in lists], [], 0
    if current_extra:
        yield current, current_extra


def _foreach_adabelief(group: dict[str, Any], rows: list[Tensors], steps: Tensors) -> None:
    """``torch._foreach_*`` kernels per device and dtype (on CPU, per cache-sized block).

    Rearranged to save passes over memory and temporaries (same math; float32 rounding differs
    from the single-tensor path by ~1e-7 relative per step): the residual comes from the old
    first moment, ``g - m_t = beta1 (g - m_{t-1})``, so both moments update in place without a
    temporary; the bias correction of the denominator moves into the step size,
    ``lr / bc1 * m / (sqrt(s) / sqrt(bc2) + eps) = lr * sqrt(bc2) / bc1 * m / (sqrt(s) +
    eps * sqrt(bc2))``. The only temporaries are the denominator (and ``g + wd * p`` with L2),
    one block at a time on CPU. Rows and ``steps`` as :func:`_single_tensor_adabelief`'s.
    """
    coefs = _coefficients_by_step(group, steps)
    for (device, _), indices in _group_by_device_and_dtype([row[0] for row in rows]).items():
        columns = [list(column) for column in zip(*(rows[i] for i in indices), strict=True)]
        c_ = [coefs[i] for i in indices]
        if device.type == "cpu":
            for block, block_coefs in _blocks(columns, c_, _CPU_BLOCK):
                _foreach_update(group, block, block_coefs)
        else:
            _foreach_update(group, columns, c_)


def _foreach_update(
    group: dict[str, Any], columns: list[Tensors], c_: list[_StepCoefficients]
) -> None:
    """One block: ``columns`` are the parameters, gradients, ``exp_avg``, ``exp_avg_var`` and
    (amsgrad) ``max_exp_avg_var``; ``c_`` each tensor's coefficients."""
    p_, g_, m_, s_ = columns[:4]
    v_max = columns[4] if len(columns) > 4 else []
    beta1, beta2 = group["betas"]
    eps = group["eps"]
    decay = c_[0].decay  # lr and weight decay are per group
    if decay != 1.0:
        torch._foreach_mul_(p_, decay)
    l2 = c_[0].l2
    if l2 != 0.0:
        g_ = torch._foreach_add(g_, p_, alpha=l2)

    # With d = m_{t-1} - g (kept in m): s_t = beta2 s + (1 - beta2) beta1^2 d^2 + eps and
    # m_t = g + beta1 d.
    torch._foreach_sub_(m_, g_)
    torch._foreach_mul_(s_, beta2)
    torch._foreach_addcmul_(s_, m_, m_, value=(1 - beta2) * beta1 * beta1)
    torch._foreach_add_(s_, eps)
    torch._foreach_mul_(m_, beta1)
    torch._foreach_add_(m_, g_)
    var_ = s_
    if v_max:
        torch._foreach_maximum_(v_max, s_)
        if not group["rectify"]:
            var_ = v_max

    adaptive = [j for j, c in enumerate(c_) if c.adaptive]
    if len(adaptive) == len(c_):
        _foreach_adaptive_step(p_, m_, var_, c_, eps)
    elif not adaptive:
        _foreach_sgd_step(p_, m_, c_)
    else:  # parameters at different step counts straddle the rectification threshold
        sgd = [j for j, c in enumerate(c_) if not c.adaptive]
        _foreach_adaptive_step(
            [p_[j] for j in adaptive],
            [m_[j] for j in adaptive],
            [var_[j] for j in adaptive],
            [c_[j] for j in adaptive],
            eps,
        )
        _foreach_sgd_step([p_[j] for j in sgd], [m_[j] for j in sgd], [c_[j] for j in sgd])


def _foreach_adaptive_step(
    params: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    var: list[torch.Tensor],
    coefs: list[_StepCoefficients],
    eps: float,
) -> None:
    denom = torch._foreach_sqrt(var)
    if all(c is coefs[0] for c in coefs):
        torch._foreach_add_(denom, eps * coefs[0].sqrt_bc2)
        torch._foreach_addcdiv_(params, exp_avgs, denom, -coefs[0].step_size * coefs[0].sqrt_bc2)
    else:
        torch._foreach_add_(denom, [eps * c.sqrt_bc2 for c in coefs])
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-c.step_size * c.sqrt_bc2 for c in coefs])


def _foreach_sgd_step(
    params: list[torch.Tensor], exp_avgs: list[torch.Tensor], coefs: list[_StepCoefficients]
) -> None:
    if all(c is coefs[0] for c in coefs):
        torch._foreach_add_(params, exp_avgs, alpha=-coefs[0].step_size)
    else:
        torch._foreach_add_(params, torch._foreach_mul(exp_avgs, [-c.step_size for c in coefs]))
