"""FSDP2 data parallelism as a Lightning strategy the callbacks fully understand.

``FSDP2Strategy(data_parallel_size=N)`` is Lightning's ``ModelParallelStrategy`` with only a
data-parallel dimension (``tensor_parallel_size=1``): the module's ``configure_model`` calls
``torch.distributed.fsdp.fully_shard`` over ``self.device_mesh["data_parallel"]``. One thing is
added. Lightning loads a sharded checkpoint's optimizer state right after ``on_fit_start`` and
restores the callbacks only afterwards, so a callback that replaces the optimizer (the Adam→SGD
switch, resumed after its switch) would see its state too late. Before the load, this strategy
hands every callback with a ``restore_before_optimizer_state(trainer, module, state)`` method its
saved state.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from optim_callbacks._compat import saved_callback_state

__all__ = ["FSDP2Strategy", "shard_data_parallel"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over ``data_parallel_size`` processes (all of them: devices × nodes).

    Args:
        data_parallel_size: the number of processes the parameters are sharded over.
        **kwargs: the other ``ModelParallelStrategy`` options (``save_distributed_checkpoint``,
            ``process_group_backend``, ``timeout``).
    """

    def __init__(self, data_parallel_size: int, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)

    def load_checkpoint(
        self, checkpoint_path: str | os.PathLike, weights_only: bool | None = None
    ) -> dict[str, Any]:
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            for callback in trainer.callbacks:
                restore = getattr(callback, "restore_before_optimizer_state", None)
                if restore is None:
                    continue
                state = saved_callback_state(checkpoint_path, callback.state_key)
                if state is not None:
                    restore(trainer, module, state)
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def shard_data_parallel(module: pl.LightningModule, blocks: Iterable[nn.Module]) -> None:
    """FSDP2's usual wrapping, for a module's ``configure_model``: ``fully_shard`` each of
    ``blocks`` (each all-gathered just before it runs), then the whole module, over
    ``module.device_mesh["data_parallel"]``. Nothing where there is no device mesh (any other
    strategy), and nothing the second time (Lightning calls the hook for every stage)::

        def configure_model(self):
            shard_data_parallel(self, [m for m in self.net if isinstance(m, nn.Linear)])
    """
    mesh = module.device_mesh
    if mesh is None or isinstance(module, FSDPModule):
        return
    data_parallel = mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=data_parallel)
    fully_shard(module, mesh=data_parallel)
