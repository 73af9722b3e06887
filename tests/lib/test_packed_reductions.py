"""Per-tensor reductions of sharded optimizer steps (LAMB's trust ratio, Adafactor's column
means and RMS terms) packed into one all-reduce per step, whatever the number of tensors.

A real gloo process group of one rank in this process: ``fully_shard`` over its one-rank mesh
makes every parameter a ``DTensor`` placed ``Shard(0)``, so the sharded code paths and their
collectives run for real (the two-rank comparison with uneven shards is in
``tests/lib/test_sharded.py``). Collectives are counted with torch's profiler (``c10d`` all-reduce
events); ``CommDebugMode`` is a dispatch mode, under which ``torch.compile`` runs nothing
compiled, so it would not see the compiled path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.profiler import ProfilerActivity, profile

from optim_callbacks import build_optimizer
from optim_callbacks.sharded import all_reduce_packed_, is_sharded

pytestmark = pytest.mark.filterwarnings(r"error:.*compiling the update failed")

# All-reduces per step for all tensors: LAMB's norms need one; Adafactor's update RMS depends on
# the column factors, so a sharded matrix needs a second (see optim_callbacks.algorithms.adafactor).
COLLECTIVES_PER_STEP = {"lamb": 1, "adafactor": 2}


@pytest.fixture(scope="module")
def mesh():
    """A one-rank gloo world and its data-parallel mesh (torn down after the module)."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)
    )


def _sharded(model: nn.Sequential, mesh) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear | nn.LayerNorm):
            fully_shard(layer, mesh=mesh)
    return model


def _all_reduces(prof) -> int:
    return sum(e.count for e in prof.key_averages() if e.key == "c10d::allreduce_")


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[int]:
    """``steps`` steps on fixed data; the all-reduces each optimizer step issued."""
    generator = torch.Generator().manual_seed(1)
    counts = []
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 1, generator=generator)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            optimizer.step()
        counts.append(_all_reduces(prof))
    return counts


def _full(model: nn.Module) -> torch.Tensor:
    return torch.cat(
        [
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten()
            for p in model.parameters()
        ]
    )


@pytest.mark.parametrize("impl", ["auto", "foreach", "for-loop"])
@pytest.mark.parametrize("name", ["lamb", "adafactor"])
def test_one_packed_all_reduce_per_step_for_all_tensors(mesh, name, impl):
    """Eight sharded tensors in two parameter groups: one packed all-reduce per step for LAMB
    (two for Adafactor), not one per tensor; the result is the unsharded for-loop step's (the
    reference stays uncompiled: the compiled graphs of whole tensors are shared by the whole
    test process, under torch's recompile limit)."""
    plain = _model()
    sharded = _sharded(copy.deepcopy(plain), mesh)
    assert all(is_sharded(p) for p in sharded.parameters())
    optimizer = build_optimizer(name, sharded, lr=1e-2, weight_decay=0.1, impl=impl)
    reference = build_optimizer(name, plain, lr=1e-2, weight_decay=0.1, impl="for-loop")
    assert len(optimizer.param_groups) == 2 and len(list(sharded.parameters())) == 8
    assert _train(sharded, optimizer, 3) == [COLLECTIVES_PER_STEP[name]] * 3
    assert _train(plain, reference, 3) == [0] * 3  # whole tensors: no collective
    assert torch.allclose(_full(sharded), _full(plain), rtol=1e-6, atol=1e-6)
    assert bool(optimizer.defaults.get("fused")) is (impl == "auto")
    assert getattr(optimizer, "compile_failure", None) is None


def test_sharded_adafactor_state_is_placed_for_distributed_checkpoints(mesh):
    """Row factors and 1-D variances are the rank's rows (``Shard(0)`` like the parameter); a
    matrix's column factors are whole on every rank (``Replicate``); state dicts load back."""
    model = _sharded(_model(), mesh)
    optimizer = build_optimizer("adafactor", model, lr=1e-2, impl="for-loop")
    _train(model, optimizer, 1)
    first = model[0].weight
    state = optimizer.state[first]
    assert state["row_var"].placements == (Shard(0),) and state["row_var"].shape == (5, 1)
    assert state["col_var"].placements == (Replicate(),) and state["col_var"].shape == (1, 6)
    assert optimizer.state[model[0].bias]["variance"].placements == (Shard(0),)
    copy_ = build_optimizer("adafactor", model, lr=1e-2, impl="for-loop")
    copy_.load_state_dict(optimizer.state_dict())
    assert torch.equal(copy_.state[first]["col_var"].to_local(), state["col_var"].to_local())


def test_all_reduce_packed_sums_every_tensor_in_place_with_one_collective(mesh):
    """Tensors of several shapes and dtypes, views included, come back with their shapes and
    dtypes; without a group nothing is sent."""
    group = mesh.get_group()
    base = torch.arange(6.0).reshape(2, 3)
    tensors = [base[:, 1], torch.ones(2, 2, dtype=torch.float64), torch.tensor([2.5])]
    before = [t.clone() for t in tensors]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        all_reduce_packed_(tensors, group)
    assert _all_reduces(prof) == 1
    for t, expected in zip(tensors, before, strict=True):  # one rank: the sum is the value
        assert t.dtype == expected.dtype and torch.equal(t, expected)
    assert torch.equal(base[:, 1], torch.tensor([1.0, 4.0]))  # written through the view
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        all_reduce_packed_(tensors, None)
        all_reduce_packed_([], group)
    assert _all_reduces(prof) == 0
