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

Under FSDP2 (parameters sharded on dim 0, possibly unevenly, a rank possibly holding no rows)
every reduction above is over the whole tensor: a rank keeps the row factors ``r`` of its own
rows (a row mean is over columns: local) and the whole column factor ``c`` (the same on every
rank; a replicated ``DTensor``), and its local sums go into packed all-reduces
(:func:`~optim_callbacks.sharded.all_reduce_packed_`), whatever the number of tensors: one
with the column sums ``sum_i g^2``, ``sum_i r`` and ``sum theta^2`` of every sharded tensor
(and ``sum u^2`` of vectors), and, when a sharded matrix exists, a second one with its
``sum u^2``, which needs the first (``u`` depends on ``c`` through ``max(v, eps1^2)``, so the
two cannot be merged exactly). Both the compiled step and the uncompiled one
(``fused=False``: what ``foreach``/``for-loop`` give on sharded parameters, where
``torch.optim.Adafactor`` cannot run) work this way: local sums, the all-reduces, then the
update recomputed from the state (not kept from the first pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from optim_callbacks.compiled_update import (
    CompiledUpdate,
    check_compiled_devices,
    coefficient_rows,
    step_compiled,
)
from optim_callbacks.sharded import (
    all_reduce_packed_,
    common_shard_group,
    is_sharded,
    local_part,
    replicated_like,
    sharded_like,
)

__all__ = ["CompiledAdafactor", "adafactor"]

_SIGN, _OMB2, _RHO, _EPS1, _EPS2, _DECAY, _D = range(7)


def _factors(
    g: torch.Tensor,
    row_var: torch.Tensor,
    col_var: torch.Tensor,
    column_sum: torch.Tensor,
    rows: Any,
    c: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``r <- lerp(r, mean_j g^2)`` (this tensor's rows) and ``c <- lerp(c, column_sum / rows)``
    (``column_sum = sum_i g^2`` over all ``rows`` rows)."""
    r = row_var.to(c.dtype)
    r = r + c[_OMB2] * ((g * g).mean(dim=-1, keepdim=True) - r)
    k = col_var.to(c.dtype)
    k = k + c[_OMB2] * (column_sum / rows - k)
    return r, k


def _factored_direction(
    g: torch.Tensor,
    r: torch.Tensor,
    k: torch.Tensor,
    row_sum: torch.Tensor,
    rows: Any,
    c: torch.Tensor,
) -> torch.Tensor:
    """``u = g / sqrt(max(r k / max(mean_i r, eps1), eps1^2))``, ``row_sum = sum_i r``."""
    v = r * k / torch.clamp_min(row_sum / rows, c[_EPS1])
    return torch.rsqrt(torch.clamp_min(v, c[_EPS1] * c[_EPS1])) * g


def _vector_direction(
    g: torch.Tensor, variance: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v <- lerp(v, g^2)`` and ``u = g / sqrt(max(v, eps1^2))``."""
    v = variance.to(c.dtype)
    v = v + c[_OMB2] * (g * g - v)
    return v, torch.rsqrt(torch.clamp_min(v, c[_EPS1] * c[_EPS1])) * g


def _write(
    param: torch.Tensor,
    p: torch.Tensor,
    u: torch.Tensor,
    p_squares: Any,
    u_squares: Any,
    numel: Any,
    c: torch.Tensor,
) -> None:
    """``theta <- theta (1 - lr wd) - max(eps2, RMS(theta)) rho / max(1, RMS(u) / d) u``, the
    RMS terms from the sums of squares over all ``numel`` elements."""
    alpha = torch.clamp_min(torch.sqrt(p_squares / numel), c[_EPS2]) * c[_RHO]
    denom = torch.clamp_min(torch.sqrt(u_squares / numel) / c[_D], 1.0)
    param.copy_(p * c[_DECAY] - alpha / denom * u)


def _inputs(
    param: torch.Tensor, grad: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return param.to(c.dtype), grad.to(c.dtype) * c[_SIGN]


def _adafactor_matrix_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    row_var: torch.Tensor,
    col_var: torch.Tensor,
    c: torch.Tensor,
) -> None:
    """torch's Adafactor step for one whole tensor of 2 or more dimensions, in ``c.dtype``."""
    p, g = _inputs(param, grad, c)
    rows = g.shape[-2]
    r, k = _factors(g, row_var, col_var, (g * g).sum(dim=-2, keepdim=True), rows, c)
    u = _factored_direction(g, r, k, r.sum(dim=-2, keepdim=True), rows, c)
    _write(param, p, u, (p * p).sum(), (u * u).sum(), p.numel(), c)
    row_var.copy_(r)
    col_var.copy_(k)


def _adafactor_vector_update(
    param: torch.Tensor, grad: torch.Tensor, variance: torch.Tensor, c: torch.Tensor
) -> None:
    """torch's Adafactor step for one whole 1-D tensor, in ``c.dtype``."""
    p, g = _inputs(param, grad, c)
    v, u = _vector_direction(g, variance, c)
    _write(param, p, u, (p * p).sum(), (u * u).sum(), p.numel(), c)
    variance.copy_(v)


# --- shards. Each function gets a shard ``param``, its ``grad``, and ``shard``: for a matrix
# (row_var is named) (col_var, column_sum, row_sum, p_squares, u_squares, sizes, c), for a vector
# (variance is named) (p_squares, u_squares, sizes, c). The sums column_sum = sum_i g^2,
# row_sum = sum_i r, p_squares = [sum theta^2] and u_squares = [sum u^2] are partial (this
# shard's) or summed over the ranks; sizes = [rows, numel] of the whole tensor.


def _matrix_partials(
    param: torch.Tensor, grad: torch.Tensor, row_var: torch.Tensor, *shard: torch.Tensor
) -> None:
    """A matrix shard's ``column_sum``, ``row_sum`` and ``p_squares`` (the first all-reduce's)."""
    col_var, column_sum, row_sum, p_squares, _, sizes, c = shard
    p, g = _inputs(param, grad, c)
    column = (g * g).sum(dim=-2, keepdim=True)
    r, _ = _factors(g, row_var, col_var, column, sizes[0], c)
    column_sum.copy_(column)
    row_sum.copy_(r.sum(dim=-2, keepdim=True))
    p_squares.copy_((p * p).sum())


def _shard_direction(
    param: torch.Tensor, grad: torch.Tensor, row_var: torch.Tensor, shard: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """A matrix shard's ``theta``, ``r``, ``c`` and ``u`` from the summed column and row sums."""
    col_var, column_sum, row_sum, _, _, sizes, c = shard
    p, g = _inputs(param, grad, c)
    r, k = _factors(g, row_var, col_var, column_sum, sizes[0], c)
    return p, r, k, _factored_direction(g, r, k, row_sum, sizes[0], c)


def _matrix_update_squares(
    param: torch.Tensor, grad: torch.Tensor, row_var: torch.Tensor, *shard: torch.Tensor
) -> None:
    """A matrix shard's ``u_squares`` (the second all-reduce's)."""
    u = _shard_direction(param, grad, row_var, shard)[-1]
    shard[4].copy_((u * u).sum())


def _matrix_sharded_update(
    param: torch.Tensor, grad: torch.Tensor, row_var: torch.Tensor, *shard: torch.Tensor
) -> None:
    """A matrix shard's step, every sum over the whole tensor."""
    col_var, _, _, p_squares, u_squares, sizes, c = shard
    p, r, k, u = _shard_direction(param, grad, row_var, shard)
    _write(param, p, u, p_squares, u_squares, sizes[1], c)
    row_var.copy_(r)
    col_var.copy_(k)


def _vector_partials(
    param: torch.Tensor, grad: torch.Tensor, variance: torch.Tensor, *shard: torch.Tensor
) -> None:
    """A 1-D shard's ``p_squares`` and ``u_squares`` (the first all-reduce's)."""
    p_squares, u_squares, _, c = shard
    p, g = _inputs(param, grad, c)
    u = _vector_direction(g, variance, c)[1]
    p_squares.copy_((p * p).sum())
    u_squares.copy_((u * u).sum())


def _vector_sharded_update(
    param: torch.Tensor, grad: torch.Tensor, variance: torch.Tensor, *shard: torch.Tensor
) -> None:
    """A 1-D shard's step, the sums over the whole tensor."""
    p_squares, u_squares, sizes, c = shard
    p, g = _inputs(param, grad, c)
    v, u = _vector_direction(g, variance, c)
    _write(param, p, u, p_squares, u_squares, sizes[1], c)
    variance.copy_(v)


def _compiled(update: Callable[..., None]) -> CompiledUpdate:
    return CompiledUpdate(update, per_tensor=True, flatten=False)


_MATRIX = _compiled(_adafactor_matrix_update)
_VECTOR = _compiled(_adafactor_vector_update)
_MATRIX_PARTIALS = _compiled(_matrix_partials)
_MATRIX_SQUARES = _compiled(_matrix_update_squares)
_MATRIX_SHARDED = _compiled(_matrix_sharded_update)
_VECTOR_PARTIALS = _compiled(_vector_partials)
_VECTOR_SHARDED = _compiled(_vector_sharded_update)

# A row: [param, grad, *state, (extras of a shard)], with its coefficients and whether compiled.
_Item = tuple[list[torch.Tensor], torch.Tensor, bool]


class CompiledAdafactor(torch.optim.Adafactor):
    """``torch.optim.Adafactor`` whose step is compiled (see the module docstring), and which
    also steps FSDP2's sharded parameters (compiled, or uncompiled with ``fused=False``).

    If compiling fails, this instance warns once and steps with torch's own implementation
    (on sharded parameters: with the uncompiled step of this class).
    """

    #: Why compiling the fused update failed for this instance (then it steps uncompiled).
    compile_failure: str | None = None

    def __init__(self, params: Any, *, fused: bool | None = True, **options: Any) -> None:
        if fused and options.get("foreach"):
            raise ValueError("fused: cannot be True together with foreach=True; pick one")
        super().__init__(params, **options)
        self.defaults["fused"] = bool(fused)
        for group in self.param_groups:
            group.setdefault("fused", bool(fused))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step; ``closure`` re-evaluates the loss (optional)."""
        params = [p for group in self.param_groups for p in group["params"]]
        shards = common_shard_group(params, "Adafactor")
        uncompiled = self.compile_failure is not None or not any(
            group.get("fused") for group in self.param_groups
        )
        if shards is None and uncompiled:
            return self._torch_step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sharded: tuple[list[_Item], list[_Item]] = ([], [])
        for group in self.param_groups:
            compiled = bool(group.get("fused")) and self.compile_failure is None
            whole: tuple[list[_Item], list[_Item]] = ([], [])
            rows: list[list[torch.Tensor]] = []
            steps: list[torch.Tensor] = []
            targets: list[list[_Item]] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                if not state:
                    _initial_state(state, p)
                state["step"] += 1
                keys = ("row_var", "col_var") if "row_var" in state else ("variance",)
                rows.append([local_part(t) for t in (p, p.grad, *(state[k] for k in keys))])
                if is_sharded(p):
                    rows[-1].extend(_sums(p, rows[-1]))
                steps.append(state["step"])
                kind = 0 if len(keys) == 2 else 1
                targets.append((sharded if is_sharded(p) else whole)[kind])
            if not rows:
                continue
            if compiled:
                check_compiled_devices([row[0] for row in rows], "Adafactor")
            coefficients = coefficient_rows(
                rows, lambda t, rows=rows, group=group: self._coefficients(group, t, rows), steps
            )
            for row, c, target in zip(rows, coefficients, targets, strict=True):
                target.append((row, c, compiled))
            self._run(_MATRIX, whole[0])
            self._run(_VECTOR, whole[1])
        matrices, vectors = sharded
        if matrices or vectors:
            self._run(_MATRIX_PARTIALS, matrices)
            self._run(_VECTOR_PARTIALS, vectors)
            first = [t for row, _, _ in vectors for t in row[3:5]]
            for row, _, _ in matrices:
                column_sum, row_sum, p_squares = row[4:7]
                first += [column_sum, row_sum, p_squares] if row[0].dim() == 2 else [p_squares]
            all_reduce_packed_(first, shards)
            if matrices:
                self._run(_MATRIX_SQUARES, matrices)
                all_reduce_packed_([row[7] for row, _, _ in matrices], shards)
            self._run(_MATRIX_SHARDED, matrices)
            self._run(_VECTOR_SHARDED, vectors)
            for row, c, _ in matrices:
                if row[0].dim() == 2 and not row[0].numel():
                    _columns_without_rows(row, c)
        return loss

    def _run(self, update: CompiledUpdate, items: Sequence[_Item]) -> None:
        """``update`` on every row: compiled where the item says so, else uncompiled (a rank
        without rows of a tensor skips it, as the compiled path does)."""
        compiled = [(row, c) for row, c, flag in items if flag]
        if compiled:
            rows, coefficients = zip(*compiled, strict=True)
            step_compiled(self, update, rows, coefficients)
        for row, c, flag in items:
            if not flag and row[0].numel():
                update.update(*row, c)

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
    """The registry's ``adafactor``: :class:`CompiledAdafactor` with ``fused=True`` or on FSDP2's
    sharded parameters (uncompiled there unless ``fused``), else ``torch.optim.Adafactor``."""
    options = dict(
        lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay, maximize=maximize
    )
    params = _materialized(params)
    if fused or any(is_sharded(p) for p in _tensors(params)):
        return CompiledAdafactor(params, foreach=foreach, fused=bool(fused), **options)
    return torch.optim.Adafactor(params, foreach=foreach, **options)


def _materialized(params: Any) -> list[Any]:
    """``params`` as a list, each group's ``params`` as a list (they are read twice)."""
    if isinstance(params, torch.Tensor):
        return [params]
    out = []
    for item in params:
        if isinstance(item, dict):
            inner = item["params"]
            item = {**item, "params": [inner] if isinstance(inner, torch.Tensor) else list(inner)}
        out.append(item)
    return out


def _tensors(params: list[Any]) -> list[torch.Tensor]:
    return [t for item in params for t in (item["params"] if isinstance(item, dict) else [item])]


def _initial_state(state: dict[str, Any], param: torch.Tensor) -> None:
    """torch's state for ``param``: ``step``, and ``row_var``/``col_var`` (shapes ``[..., R, 1]``
    and ``[..., 1, C]``) or ``variance``. For a shard: the rows it holds, as ``DTensor``s
    placed like the parameter; a matrix's ``col_var`` whole and replicated."""
    state["step"] = torch.tensor(0.0, dtype=torch.float32)
    grad = local_part(param.grad)
    if param.grad.dim() <= 1:
        variance = torch.zeros_like(grad)
        state["variance"] = (
            sharded_like(param, variance, param.shape) if is_sharded(param) else variance
        )
        return
    if not is_sharded(param):
        shape = param.grad.shape
        state["row_var"] = param.grad.new_zeros((*shape[:-1], 1))
        state["col_var"] = param.grad.new_zeros((*shape[:-2], 1, shape[-1]))
        return
    shape, local = param.shape, grad.shape
    state["row_var"] = sharded_like(param, grad.new_zeros((*local[:-1], 1)), (*shape[:-1], 1))
    if param.dim() == 2:  # sharded on its rows: every rank needs every column
        state["col_var"] = replicated_like(param, grad.new_zeros((1, shape[-1])))
    else:  # sharded on a leading dimension: columns are local
        col = grad.new_zeros((*local[:-2], 1, local[-1]))
        state["col_var"] = sharded_like(param, col, (*shape[:-2], 1, shape[-1]))


def _sums(param: torch.Tensor, row: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros for a shard's sums (see :func:`_matrix_partials`) and the whole tensor's sizes
    ``[rows, numel]``, in the compute dtype."""
    dtype = torch.float64 if row[0].dtype == torch.float64 else torch.float32
    new = {"dtype": dtype, "device": row[0].device}
    rows = param.shape[-2] if param.dim() > 1 else 1
    sizes = torch.tensor([float(rows), float(param.numel())], **new)
    squares = [torch.zeros(1, **new), torch.zeros(1, **new)]
    if param.dim() <= 1:
        return [*squares, sizes]
    col = row[3]
    column_sum = torch.zeros(col.shape, **new)
    row_sum = torch.zeros((*col.shape[:-1], 1), **new)
    return [column_sum, row_sum, *squares, sizes]


def _columns_without_rows(row: list[torch.Tensor], c: torch.Tensor) -> None:
    """``c <- lerp(c, column_sum / rows)`` on a rank without rows of the matrix, so that the
    replicated ``col_var`` stays the same on every rank."""
    col_var, column_sum, sizes = row[3], row[4], row[8]
    k = col_var.to(c.dtype)
    col_var.copy_(k + c[_OMB2] * (column_sum / sizes[0] - k))
