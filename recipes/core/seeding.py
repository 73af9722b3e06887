"""The run's seed, and the seeds derived from it for one purpose each.

``seed_everything`` (``--seed_everything``, default 42) puts the run's seed in the environment
variable ``PL_GLOBAL_SEED``, which Lightning also hands to DDP worker processes; this module is
the one place that reads it. A derived seed depends only on the run's seed and the keys given
(rank, epoch, batch, ...), never on what ran before, so a resumed run draws exactly what the
uninterrupted run drew. Derivation: ``numpy.random.SeedSequence([run seed, *keys])``, a
documented hash that is the same on every machine and Python version.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["derived_seed", "run_seed"]


def run_seed() -> int:
    """The seed ``seed_everything`` set for this run (0 when none was set)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derived_seed(*keys: int) -> int:
    """A 32-bit seed that is a function of the run's seed and ``keys`` only."""
    entropy = [run_seed(), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
