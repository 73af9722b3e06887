"""Seeded, stratified train/val/test splits, an epoch-seeded shuffling sampler, and the class
names a data module gives the model.

Both depend only on their seed (and the epoch), never on global random state, so a split is the
same on every machine and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator, Sequence

from torch.utils.data import DistributedSampler

from optim_callbacks.validation import check_in_range

__all__ = ["EpochSeededSampler", "NamedClasses", "stratified_order", "stratified_split"]


def stratified_split(
    labels: Sequence[int],
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[list[int], list[int], list[int]]:
    """Indices of the train, val and test examples.

    Each class is shuffled with ``random.Random(seed)`` and cut separately, taking
    ``round(n_c * val_fraction)`` examples for val and ``round(n_c * test_fraction)`` for test
    (``n_c``: the class's size), so every split keeps the class proportions. Training indices
    come back sorted (the sampler shuffles them); validation and test indices come with the
    classes interleaved evenly, so any prefix of them (``limit_val_batches``) is a fair sample.
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
    val: list[list[int]] = []
    test: list[list[int]] = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        n_test = round(len(members) * test_fraction)
        val.append(members[:n_val])
        test.append(members[n_val : n_val + n_test])
        train += members[n_val + n_test :]
    val_order, test_order = _interleave(val), _interleave(test)
    for name, split in (("train", train), ("val", val_order), ("test", test_order)):
        if not split:
            raise ValueError(
                f"dataset: {len(labels)} examples leave the {name} split empty "
                f"(val_fraction={val_fraction}, test_fraction={test_fraction}); allowed: more examples "
                "or larger fractions"
            )
    return sorted(train), val_order, test_order


def _interleave(groups: Sequence[Sequence[int]]) -> list[int]:
    """The members of all groups, each group spread evenly over the result: member ``k`` of a
    group of ``n`` sits at position ``(k + 0.5) / n`` (ties in group order)."""
    keyed = [
        ((k + 0.5) / len(group), g, index)
        for g, group in enumerate(groups)
        for k, index in enumerate(group)
    ]
    return [index for *_, index in sorted(keyed)]


def stratified_order(labels: Sequence[int], seed: int = 0) -> list[int]:
    """Indices of ``labels`` shuffled within each class (``random.Random(seed)``) and the
    classes interleaved evenly, so that every prefix (what ``limit_val_batches`` /
    ``limit_test_batches`` evaluate) keeps the class proportions to within one example."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_class[int(label)].append(index)
    rng = random.Random(seed)
    groups = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        groups.append(members)
    return _interleave(groups)


class EpochSeededSampler(DistributedSampler):
    """A random permutation that is a function of ``(seed, epoch)`` only, cut into this rank's
    share: ``DistributedSampler``'s order (``randperm`` seeded with ``seed + epoch``, padded to a
    multiple of ``num_replicas``, every ``num_replicas``-th index from ``rank``), which for one
    process is the whole permutation.

    Lightning calls ``set_epoch`` at the start of every training epoch, so epoch ``e`` of a
    resumed run is shuffled exactly as in an uninterrupted one. Being a ``DistributedSampler``,
    it is kept as it is under DDP and FSDP (Lightning replaces other samplers), so
    :meth:`resume_within_epoch` makes a run resumed in the middle of an epoch continue that
    epoch's order where it stopped on every rank.
    """

    def __init__(
        self, data_source: Sequence, seed: int = 0, *, num_replicas: int = 1, rank: int = 0
    ) -> None:
        super().__init__(data_source, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples already drawn)

    def resume_within_epoch(self, epoch: int, samples_done: int) -> None:
        """Leave out the first ``samples_done`` indices of this rank's order of epoch ``epoch``,
        once: the next pass over that epoch yields the rest; any other epoch is whole. ``len()``
        stays the epoch's full length, which is how Lightning counts a resumed epoch's batches."""
        self._resume_at = (epoch, samples_done)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        resume, self._resume_at = self._resume_at, None
        if resume is not None and resume[0] == self.epoch:
            order = order[resume[1] :]
        yield from order


class NamedClasses:
    """``num_classes`` and ``class_names`` (label order), which the recipes' CLI links from the
    data module to the model, read from the data module's ``classes``."""

    classes: Sequence[str]  # the data module's own (a property of the text and image modules)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)
