r"""Muon's matrix step on whole, sharded (FSDP2) or replicated (DDP) matrices.

For each 2-D parameter ``W`` with gradient ``G`` (Jordan et al., 2024, "Muon: An optimizer for
hidden layers in neural networks", https://kellerjordan.github.io/posts/muon/; the same
operations, in the same order, as ``torch.optim.Muon`` 2.13):

.. math::

    B \leftarrow \mu B + (1 - \mu) G \quad(\text{lerp}),\qquad
    U = \begin{cases} (1-\mu) G + \mu B & \text{nesterov} \\ B & \text{else} \end{cases},\qquad
    O = \mathrm{NS}_k(U),\qquad
    W \leftarrow (1 - \eta\lambda) W - \eta\, s(A, B)\, O

with :func:`newton_schulz` for :math:`\mathrm{NS}_k` and :func:`adjusted_lr` for the shape
factor :math:`s`. The momentum and the update are element-wise, so they run on whatever part of
``W`` a rank holds; the Newton-Schulz iteration needs the whole matrix. So:

- **sharded parameters** (FSDP2's ``DTensor``, one ``Shard(d)`` placement, the other mesh
  dimensions ``Replicate``; shards may be uneven or empty, as ``torch.chunk`` cuts them): every
  matrix has one owner rank (matrix ``i`` of the step: rank ``i % world``). One
  ``all_to_all_single`` sends each rank's shards of ``U`` to their owners, the owners run
  Newton-Schulz on the whole matrices, a second ``all_to_all_single`` sends every rank its
  shards of ``O`` back; each rank then updates its own shard. Two collectives per step and
  process group, whatever the number of matrices (the approach of Dion, microsoft/dion, and of
  torchtitan's distributed Muon);
- **replicated parameters** (plain tensors with ``torch.distributed`` initialised over more than
  one rank, as under DDP, where every rank holds the same matrices and gradients): rank ``r``
  orthogonalizes the matrices ``i % world == r`` and one ``all_gather`` hands every rank all
  results, instead of every rank repeating every product;
- otherwise each matrix is orthogonalized where it is.

The owner's Newton-Schulz input is bit for bit the single-process one (shards are cut and pasted
back, never summed), so the step equals single-process ``torch.optim.Muon``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

__all__ = [
    "NS_COEFFICIENTS",
    "NS_EPS",
    "NS_STEPS",
    "adjusted_lr",
    "muon_step",
    "newton_schulz",
    "shard_sizes",
]

# Keller Jordan's quintic coefficients, eps and step count (torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_STEPS = 5


def newton_schulz(
    matrix: Tensor,
    coefficients: Sequence[float] = NS_COEFFICIENTS,
    steps: int = NS_STEPS,
    eps: float = NS_EPS,
) -> Tensor:
    r"""The quintic Newton-Schulz iteration towards the orthogonal factor of ``matrix``, in
    bfloat16 (Jordan et al., 2024):

    .. math::

        X_0 = \frac{G}{\max(\|G\|_F, \epsilon)},\qquad
        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,\quad A_k = X_k X_k^\top

    on the wide orientation (``G`` transposed when it has more rows than columns). For
    :math:`G = U S V^\top` the result is about :math:`U S' V^\top` with :math:`S'_{ii}` in about
    ``[0.5, 1.5]``. Returns a new bfloat16 tensor; ``matrix`` is left alone.
    """
    if steps >= 100:
        raise ValueError(f"ns_steps: got {steps}; allowed: fewer than 100")
    if matrix.ndim != 2:
        raise ValueError(f"matrix: got {matrix.ndim} dimensions; allowed: a 2-D matrix")
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.bfloat16()
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    r"""Muon's learning rate for an ``A x B`` matrix: ``original`` (Jordan et al.; the default)
    :math:`\eta \sqrt{\max(1, A/B)}`; ``match_rms_adamw`` (Liu et al., 2025, "Muon is Scalable
    for LLM Training") :math:`0.2\,\eta \sqrt{\max(A, B)}`, the update RMS of AdamW."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def shard_sizes(length: int, world: int) -> list[int]:
    """The lengths ``torch.chunk`` (so DTensor's ``Shard`` and FSDP2) gives each of ``world``
    ranks for a dimension of ``length``: ``ceil(length / world)`` each, the last ranks fewer or
    none (5 over 2: 3, 2; 1 over 2: 1, 0; 5 over 4: 2, 2, 1, 0)."""
    chunk = -(-length // world) if length else 0
    return [max(0, min(chunk, length - k * chunk)) for k in range(world)]


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass
class _Layout:
    """Where a sharded matrix lies: its process group, the dimension cut, each rank's length."""

    group: Any
    rank: int
    world: int
    dim: int
    sizes: list[int]

    def local_shape(self, shape: Sequence[int], rank: int) -> list[int]:
        local = list(shape)
        local[self.dim] = self.sizes[rank]
        return local

    def offsets(self) -> list[int]:
        return [sum(self.sizes[:k]) for k in range(self.world)]


def _layout(param: DTensor, name: str) -> _Layout:
    """The layout of a sharded parameter, or a ``ValueError`` for placements Muon cannot use."""
    placements = list(param.placements)
    cut = [(d, p) for d, p in enumerate(placements) if not p.is_replicate()]
    if len(cut) != 1 or type(cut[0][1]) is not Shard:
        raise ValueError(
            f"{name}: got a DTensor parameter of shape {tuple(param.shape)} with placements "
            f"{placements}; allowed for Muon: one Shard(dim) placement, the others Replicate "
            "(FSDP2's fully_shard, HSDP); train it with the AdamW part (use_muon=False) instead"
        )
    mesh_dim, placement = cut[0]
    mesh = param.device_mesh
    world = mesh.size(mesh_dim)
    rank = mesh.get_local_rank(mesh_dim)
    dim = placement.dim % 2
    sizes = shard_sizes(param.shape[dim], world)
    if _local(param).shape[dim] != sizes[rank]:
        raise ValueError(
            f"{name}: rank {rank} holds {_local(param).shape[dim]} of {param.shape[dim]} "
            f"along dimension {dim}, not the torch.chunk length {sizes[rank]}; allowed for "
            "Muon: shards cut as torch.chunk cuts (FSDP2's default)"
        )
    return _Layout(mesh.get_group(mesh_dim), rank, world, dim, sizes)


@dataclass
class _Matrix:
    """One parameter of the step: its local update ``U`` and, once known, its local ``O``."""

    param: Tensor
    group: dict[str, Any]
    update: Tensor
    layout: _Layout | None = None
    ortho: Tensor | None = field(default=None, repr=False)

    def orthogonalize(self, whole: Tensor) -> Tensor:
        g = self.group
        return newton_schulz(whole, g["ns_coefficients"], g["ns_steps"], g["eps"])


def _momentum(
    groups: Iterable[dict[str, Any]], state: dict[Tensor, dict[str, Any]]
) -> list[_Matrix]:
    """Momentum (and the Nesterov look-ahead) on each rank's own elements; the matrices with a
    gradient, in group and parameter order (the same on every rank)."""
    matrices = []
    for group in groups:
        momentum = group["momentum"]
        for param in group["params"]:
            if param.grad is None:
                continue
            if torch.is_complex(param):
                raise RuntimeError("Muon does not support complex parameters")
            if param.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            if param.grad.ndim != 2:
                raise ValueError(
                    f"use_muon: got a parameter of shape {tuple(param.shape)}; allowed: 2-D "
                    "matrices (train the others with use_muon=False)"
                )
            slot = state[param]
            if "momentum_buffer" not in slot:
                slot["momentum_buffer"] = torch.zeros_like(
                    param.grad, memory_format=torch.preserve_format
                )
            grad, buf = _local(param.grad), _local(slot["momentum_buffer"])
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if group["nesterov"] else buf
            matrices.append(_Matrix(param, group, update))
    return matrices


def _exchange(
    send: list[Tensor],
    send_sizes: list[int],
    recv_sizes: list[int],
    like: Tensor,
    dtype: torch.dtype,
    group: Any,
) -> Tensor:
    """One ``all_to_all_single``: ``send`` (flattened, in destination order) out, the pieces
    for this rank (in source order) back, on ``like``'s device."""
    device = like.device
    flat = (
        torch.cat([t.reshape(-1).to(dtype) for t in send])
        if send
        else torch.empty(0, dtype=dtype, device=device)
    )
    received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
    dist.all_to_all_single(received, flat, recv_sizes, send_sizes, group=group)
    return received


def _sharded(bucket: list[_Matrix]) -> int:
    """Orthogonalize matrices sharded over one process group (owner of matrix ``i``: rank
    ``i % world``) with two all-to-alls; returns how many this rank orthogonalized."""
    layout = bucket[0].layout
    assert layout is not None
    world, rank = layout.world, layout.rank
    owned = [[m for i, m in enumerate(bucket) if i % world == r] for r in range(world)]

    def numel(m: _Matrix, r: int) -> int:
        return math.prod(m.layout.local_shape(m.param.shape, r))

    # 1. each rank's shards of U to the owners; the owners paste them together
    received = _exchange(
        [m.update for r in range(world) for m in owned[r]],
        [sum(m.update.numel() for m in owned[r]) for r in range(world)],
        [sum(numel(m, s) for m in owned[rank]) for s in range(world)],
        bucket[0].update,
        bucket[0].update.dtype,
        layout.group,
    )
    pieces: dict[int, list[Tensor]] = {id(m): [] for m in owned[rank]}
    offset = 0
    for source in range(world):
        for m in owned[rank]:
            shape = m.layout.local_shape(m.param.shape, source)
            count = math.prod(shape)
            pieces[id(m)].append(received[offset : offset + count].view(shape))
            offset += count
    results = [m.orthogonalize(torch.cat(pieces[id(m)], dim=m.layout.dim)) for m in owned[rank]]
    # 2. the owners' O, cut as the shards are, back to every rank
    send = []
    for dest in range(world):
        for m, o in zip(owned[rank], results, strict=True):
            lay = m.layout
            send.append(o.narrow(lay.dim, lay.offsets()[dest], lay.sizes[dest]))
    back = _exchange(
        send,
        [sum(numel(m, d) for m in owned[rank]) for d in range(world)],
        [sum(numel(m, rank) for m in owned[r]) for r in range(world)],
        bucket[0].update,
        torch.bfloat16,  # what newton_schulz returns
        layout.group,
    )
    offset = 0
    for r in range(world):
        for m in owned[r]:
            shape = m.layout.local_shape(m.param.shape, rank)
            count = math.prod(shape)
            m.ortho = back[offset : offset + count].view(shape)
            offset += count
    return len(owned[rank])


def _replicated(matrices: list[_Matrix]) -> int:
    """Orthogonalize replicated matrices (DDP) split over the ranks: rank ``r`` the matrices
    ``i % world == r``, then one ``all_gather``; returns how many this rank orthogonalized."""
    world, rank = dist.get_world_size(), dist.get_rank()
    owned = [[m for i, m in enumerate(matrices) if i % world == r] for r in range(world)]
    mine = [m.orthogonalize(m.update) for m in owned[rank]]
    lengths = [sum(m.update.numel() for m in owned[r]) for r in range(world)]
    device = matrices[0].update.device
    flat = torch.zeros(max(lengths), dtype=torch.bfloat16, device=device)
    if mine:
        flat[: lengths[rank]] = torch.cat([o.reshape(-1) for o in mine])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    for r in range(world):
        offset = 0
        for m in owned[r]:
            m.ortho = gathered[r][offset : offset + m.update.numel()].view(m.update.shape)
            offset += m.update.numel()
    return len(owned[rank])


def muon_step(
    groups: Sequence[dict[str, Any]],
    state: dict[Tensor, dict[str, Any]],
    *,
    split_across_ranks: bool = True,
) -> int:
    """One Muon step (see the module docstring) of every parameter with a gradient in
    ``groups`` (dicts with ``params``, ``lr``, ``weight_decay``, ``momentum``, ``nesterov``,
    ``ns_coefficients``, ``eps``, ``ns_steps``, ``adjust_lr_fn``), its ``momentum_buffer`` in
    ``state``. Sharded parameters are always gathered to owner ranks; plain ones are split across
    ranks when ``split_across_ranks`` and ``torch.distributed`` runs more than one rank.
    Collective: with either, every rank must call it with the same matrices. Returns how many
    matrices this rank orthogonalized."""
    matrices = _momentum(groups, state)
    local = [m for m in matrices if not isinstance(m.param, DTensor)]  # maybe replicated
    here: list[_Matrix] = []  # DTensors of a one-rank mesh: whole, on this rank only
    buckets: dict[tuple[Any, torch.dtype], list[_Matrix]] = {}
    for index, m in enumerate(matrices):
        if isinstance(m.param, DTensor):
            m.layout = _layout(m.param, f"params[{index}]")
            if m.layout.world == 1:
                here.append(m)
                continue
            buckets.setdefault((m.layout.group, m.update.dtype), []).append(m)
    done = 0
    for bucket in buckets.values():
        done += _sharded(bucket)
    replicated = split_across_ranks and dist.is_available() and dist.is_initialized()
    if local and replicated and dist.get_world_size() > 1:
        done += _replicated(local)
    else:
        here += local
    for m in here:
        m.ortho = m.orthogonalize(m.update)
    done += len(here)
    for m in matrices:
        lr = float(m.group["lr"])
        param = _local(m.param)
        param.mul_(1 - lr * m.group["weight_decay"])
        param.add_(m.ortho, alpha=-adjusted_lr(lr, m.group["adjust_lr_fn"], m.param.shape))
    return done
