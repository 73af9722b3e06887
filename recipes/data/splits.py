"""Seeded, stratified train/val/test splits and an epoch-seeded shuffling sampler.

Both depend only on their seed (and the epoch), never on global random state, so a split is the
same on every machine and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import RandomSampler

from optim_callbacks.validation import check_in_range

__all__ = ["EpochSeededSampler", "stratified_split"]


def stratified_split(
    labels: Sequence[int],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Indices of the train, val and test examples.

    Each class is shuffled with ``random.Random(seed)`` and cut separately, taking
    ``round(n_c * val_fraction)`` examples for val and ``round(n_c * test_fraction)`` for test
    (``n_c``: the class's size), so every split keeps the class proportions. Indices come back
    sorted.
    """
    check_in_range("val_fraction", val_fraction, 0.0, 1.0, low_inclusive=False)
    check_in_range("test_fraction", test_fraction, 0.0, 1.0, low_inclusive=False)
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction: got {val_fraction + test_fraction!r}; allowed: a sum < 1"
        )
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[label].append(index)
    rng = random.Random(seed)
    train: list[int] = []
    val: list[int] = []
    test: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        val += members[:n_val]
        test += members[n_val : n_val + n_test]
        train += members[n_val + n_test :]
    for name, split in (("train", train), ("val", val), ("test", test)):
        if not split:
            raise ValueError(
                f"dataset: {len(labels)} examples leave the {name} split empty "
                f"(val_fraction={val_fraction}, test_fraction={test_fraction}); allowed: more examples "
                "or larger fractions"
            )
    return sorted(train), sorted(val), sorted(test)


class EpochSeededSampler(RandomSampler):
    """A random permutation that is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` at the start of every training epoch, so epoch ``e`` of a
    resumed run is shuffled exactly as in an uninterrupted one; :meth:`resume_within_epoch`
    makes a run resumed in the middle of an epoch continue that epoch's order where it stopped.
    Under DDP Lightning swaps any ``RandomSampler`` for a ``DistributedSampler``, which is
    epoch-seeded the same way (but restarts a resumed epoch from its beginning).
    """

    def __init__(self, data_source: Sequence, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples already drawn)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_within_epoch(self, epoch: int, samples_done: int) -> None:
        """Leave out the first ``samples_done`` indices of epoch ``epoch``'s order, once: the
        next pass over that epoch yields the rest; any other epoch is whole. ``len()`` stays the
        epoch's full length, which is how Lightning counts a resumed epoch's batches."""
        self._resume_at = (epoch, samples_done)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        resume, self._resume_at = self._resume_at, None
        if resume is not None and resume[0] == self.epoch:
            order = order[resume[1] :]
        yield from order
