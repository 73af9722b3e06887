"""Where in its epoch the training order was, so a run resumed mid-epoch continues exactly.

Lightning restores the step, the epoch and the batch index from a checkpoint, but it restarts a
plain DataLoader from the first batch of the epoch (and warns that it "is not resumable"). The
recipes' DataModules mix in :class:`ResumableTrainOrder`: its state (saved in every checkpoint
with the DataModule's) is the epoch and the number of training batches done in it, and on resume
the epoch-seeded sampler leaves those batches out, so the resumed run draws exactly the batches
the uninterrupted run drew from there on. Augmentation and dropout seeds depend only on the run's
seed, the rank and the batch counters (:mod:`recipes.core.seeding`), so they follow.

Under DDP each rank's share of the order is resumed the same way: the sampler is a
``DistributedSampler`` (which Lightning keeps), and every rank has done the same number of
batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from recipes.core.seeding import run_seed
from recipes.data.splits import EpochSeededSampler

__all__ = ["ResumableTrainOrder"]


class ResumableTrainOrder:
    """Mixin for a ``LightningDataModule`` with ``hparams.batch_size`` and a ``trainer``."""

    _resume_position: tuple[int, int] | None = None  # (epoch, training batches done in it)

    def train_sampler(self, data: Sequence[Any]) -> EpochSeededSampler:
        """The run-seeded training order, continuing a checkpoint's epoch where it stopped."""
        trainer = getattr(self, "trainer", None)
        sampler = EpochSeededSampler(
            data,
            seed=run_seed(),
            num_replicas=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
        )
        if self._resume_position is not None:
            epoch, batches_done = self._resume_position
            sampler.resume_within_epoch(epoch, batches_done * self.hparams.batch_size)
            self._resume_position = None
        return sampler

    def train_order_state(self) -> dict[str, int]:
        """The epoch and the training batches done in it, as a checkpoint sees them (it is
        written after a batch, or after the epoch's validation)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        loop = trainer.fit_loop.epoch_loop  # batch_idx: the index of the batch just trained
        return {"epoch": trainer.current_epoch, "train_batches_done": loop.batch_idx + 1}

    def load_train_order_state(self, state: dict[str, Any]) -> None:
        if "train_batches_done" in state:
            self._resume_position = (int(state["epoch"]), int(state["train_batches_done"]))
