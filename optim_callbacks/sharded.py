r"""Reductions over gradients and parameters that may be sharded (FSDP2 ``DTensor``\ s).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) every
parameter, gradient and optimizer state is a ``DTensor`` sharded on dim 0 over the data-parallel
mesh: ``.to_local()`` is this rank's rows (possibly none), and writing into it writes the
``DTensor``. A global quantity is then a local partial result plus one collective:

- the p-norm ``||g||_p = (sum_ranks sum_local |g|^p)^(1/p)``: local powers, one ``all_reduce``
  (SUM), the root; ``p = inf``: local maxima, one ``all_reduce`` (MAX);
- a whole-tensor quantity of a 1-D parameter (a bias, a norm weight), which is spread over the
  ranks: local sums, one ``all_reduce`` for all of them;
- a decision (did any rank clip?): one ``all_reduce`` (MAX) of a flag;
- per-tensor reductions of an optimizer step (LAMB's trust ratio, Adafactor's column means and
  RMS terms): every tensor's local partial sums packed into one buffer, one ``all_reduce`` for
  all of them (:func:`all_reduce_packed_`), as OLMo's ``clip_grads_and_collect_metrics`` does
  for its per-parameter norms; the state a rank keeps for its rows is a ``DTensor`` placed like
  the parameter (:func:`sharded_like`), state every rank holds whole a replicated one
  (:func:`replicated_like`).

Replicated tensors (plain tensors, or ``DTensor``\ s placed ``Replicate``) hold the same values on
every rank, so they are counted once, outside the reduction. The sum order differs from a
single-process norm, so results agree with DDP to float32 rounding, not bit for bit. Only 1-D
device meshes (data parallelism) are supported; :func:`check_data_parallel` says so otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

__all__ = [
    "all_reduce_packed_",
    "any_across",
    "check_data_parallel",
    "common_shard_group",
    "global_norm",
    "is_sharded",
    "local_part",
    "replicated_like",
    "shard_group",
    "sharded_like",
    "sum_across",
]


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (the tensor itself unless it is a ``DTensor``); writing
    into it in place writes ``tensor``."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` split across ranks (a ``Shard`` placement)."""
    return isinstance(tensor, DTensor) and any(p.is_shard() for p in tensor.placements)


def check_data_parallel(tensors: Sequence[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless every sharded tensor is sharded on dim 0 of a 1-D mesh."""
    for tensor in tensors:
        if not is_sharded(tensor):
            continue
        if tensor.device_mesh.ndim != 1 or tensor.placements[0].dim != 0:
            raise ValueError(
                f"strategy: got a parameter placed {tensor.placements} on a "
                f"{tensor.device_mesh.ndim}-D device mesh; allowed: FSDP2 data parallelism "
                "(fully_shard over a 1-D mesh, tensor_parallel_size=1); tensor parallelism is "
                "not supported yet"
            )


def shard_group(tensors: Sequence[torch.Tensor]) -> dist.ProcessGroup | None:
    """The process group the sharded tensors among ``tensors`` are split over (``None``: none is)."""
    for tensor in tensors:
        if is_sharded(tensor):
            return tensor.device_mesh.get_group()
    return None


def common_shard_group(tensors: Sequence[torch.Tensor], owner: str) -> dist.ProcessGroup | None:
    """Like :func:`shard_group`, and ``ValueError`` unless every sharded tensor among ``tensors``
    is split over that one group (``owner`` names what needs it, e.g. ``"LAMB"``)."""
    check_data_parallel(tensors)
    groups = {id(t.device_mesh.get_group()): t for t in tensors if is_sharded(t)}
    if len(groups) > 1:
        raise ValueError(
            f"{owner}: got parameters sharded over {len(groups)} different device meshes; "
            "allowed: one data-parallel mesh for all parameters of one optimizer (build one "
            "optimizer per mesh)"
        )
    return shard_group(tensors)


def all_reduce_packed_(partials: Sequence[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    r"""Sum every tensor of ``partials`` over the ranks of ``group``, in place, with ONE
    ``all_reduce`` for all of them (none for ``group=None`` or no tensors).

    The tensors (any shapes, views included) are flattened into one buffer in the widest of
    their dtypes, reduced, and copied back: :math:`x_i \leftarrow \sum_{ranks} x_i`. A rank that
    holds no rows of a tensor passes zeros for it.
    """
    if group is None or not partials:
        return
    dtype = torch.promote_types(torch.float32, partials[0].dtype)
    for t in partials[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    buffer = torch.cat([t.reshape(-1).to(dtype) for t in partials])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    pieces = buffer.split([t.numel() for t in partials])
    torch._foreach_copy_(
        list(partials), [piece.view(t.shape) for piece, t in zip(pieces, partials, strict=True)]
    )


def sharded_like(param: DTensor, local: torch.Tensor, shape: Sequence[int]) -> DTensor:
    """``local`` (this rank's rows of a tensor of global ``shape``, split on dim 0 as ``param``
    is, possibly unevenly) as a ``DTensor`` placed like ``param``."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * max(int(shape[i + 1]), 1)
    return DTensor.from_local(
        local,
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=torch.Size(shape),
        stride=tuple(strides),
    )


def replicated_like(param: DTensor, local: torch.Tensor) -> DTensor:
    """``local``, the same whole tensor on every rank, as a ``DTensor`` replicated over
    ``param``'s mesh."""
    return DTensor.from_local(local, param.device_mesh, [Replicate()], run_check=False)


def sum_across(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (in place; unchanged for ``None``)."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def any_across(flag: torch.Tensor, group: dist.ProcessGroup | None) -> bool:
    """Whether ``flag`` (a bool scalar) is true on any rank of ``group``."""
    value = flag.to(torch.int32).reshape(1)
    if group is not None:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value)


def _local_norms(tensors: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack(torch._foreach_norm(list(tensors), norm_type, dtype=torch.float32))


def global_norm(tensors: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """``||concat(tensors)||_p`` as a float32 scalar tensor, equal on every rank (``p = inf``: the
    largest |element|). Sharded tensors cost one collective in all; none without them."""
    group = shard_group(tensors)
    if group is None:
        return torch.linalg.vector_norm(_local_norms(tensors, norm_type), norm_type)
    # A rank may hold no rows of a parameter: its empty part adds nothing (and has no max).
    sharded = [local_part(t) for t in tensors if is_sharded(t) and local_part(t).numel()]
    replicated = [local_part(t) for t in tensors if not is_sharded(t)]
    device = local_part(next(t for t in tensors if is_sharded(t))).device
    shard_norms = _local_norms(sharded, norm_type).to(device)
    replicated_norms = _local_norms(replicated, norm_type).to(device)
    if norm_type == math.inf:
        local = shard_norms.max() if shard_norms.numel() else torch.zeros((), device=device)
        # A MAX reduction may drop a NaN (max(nan, x) is x in some orders): send it as inf.
        local = local.reshape(1).nan_to_num(nan=math.inf)
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        if replicated_norms.numel():
            local = torch.maximum(local, replicated_norms.max())
        return local.reshape(())
    total = shard_norms.pow(norm_type).sum().reshape(1)
    sum_across(total, group)
    total = total + replicated_norms.pow(norm_type).sum()
    return total.reshape(()).pow(1.0 / norm_type)
