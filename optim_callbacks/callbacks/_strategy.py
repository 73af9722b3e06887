"""Which Lightning strategies the callbacks support: one place, one message."""

from __future__ import annotations

from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

__all__ = ["SUPPORTED_STRATEGIES", "check_supported_strategy", "is_fsdp2"]

SUPPORTED_STRATEGIES = (
    "single device, DDP, and FSDP2 data parallelism (ModelParallelStrategy with fully_shard, "
    "tensor_parallel_size=1)"
)


def is_fsdp2(strategy: Strategy) -> bool:
    """Whether ``strategy`` runs FSDP2 (``fully_shard``): Lightning's ``ModelParallelStrategy``."""
    return isinstance(strategy, ModelParallelStrategy)


def check_supported_strategy(callback: str, strategy: Strategy) -> None:
    """Raise ``ValueError`` naming what is supported unless ``callback`` supports ``strategy``
    (FSDP1's flat parameters and DeepSpeed's partitioned state are not)."""
    if isinstance(strategy, DeepSpeedStrategy) or not isinstance(
        strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)
    ):
        raise ValueError(
            f"strategy: {callback} got {type(strategy).__name__}; allowed: {SUPPORTED_STRATEGIES}"
        )
