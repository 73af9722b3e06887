"""The conformance matrix's distributed cells: ``python tests/scripts/conformance_dist.py OUT``.

Two gloo processes (Lightning launches the second). Every registry entry, the user-registered
one included, trains the matrix's model (``tests.conformance.references``: 81 hidden rows, so
FSDP2's shards are uneven and a rank holds no rows of the output layer) on the matrix's data
under DDP and under FSDP2, 8 samples per rank per step, so each global batch is the matrix's
batch of 16. Rank ``r`` writes ``OUT/rank<r>.json``: ``{entry: {strategy: {"weights": full
weights after fit (evaluated weights for schedule-free), "steps": steps}}}``, or ``{"error":
the one-line message}`` where the run failed, so one entry's failure names its cell and does
not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, DistributedSampler

from optim_callbacks import SCHEDULE_FREE, FSDP2Strategy, ScheduleFreeModes
from tests.conformance import references as ref
from tests.lib.tiny import TinyRegressor, tiny_trainer


class Sharded(TinyRegressor):
    """The matrix's model; under FSDP2 each Linear and the root are sharded. Rank ``r`` reads
    samples ``r, r + 2, ...`` in order (Lightning's own distributed sampler would shuffle), so
    step ``t``'s global batch is the matrix's batch ``t``."""

    def train_dataloader(self):
        data = ref.regression_data(self.hparams.samples, self.hparams.features)
        order = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.hparams.batch_size, sampler=order)


def run(name: str, kind: str, out: Path) -> dict:
    module = ref.model(name, cls=Sharded, batch_size=ref.BATCH // 2)
    strategy = (
        DDPStrategy(process_group_backend="gloo")
        if kind == "ddp"
        else FSDP2Strategy(data_parallel_size=2)
    )
    callbacks = [ScheduleFreeModes()] if name in SCHEDULE_FREE else []
    trainer = tiny_trainer(
        out / name / kind,
        devices=2,
        strategy=strategy,
        callbacks=callbacks,
        max_steps=ref.STEPS,
        use_distributed_sampler=False,
    )
    trainer.fit(module)
    return {"weights": ref.weights(module).tolist(), "steps": trainer.global_step}


def main(out: Path) -> None:
    results: dict[str, dict] = {}
    # CONFORMANCE_ENTRIES=lamb,adafactor runs only those (for checking one entry by hand)
    chosen = os.environ.get("CONFORMANCE_ENTRIES")
    names = chosen.split(",") if chosen else ref.entry_names()
    for name in names:
        results[name] = {}
        for kind in ("ddp", "fsdp2"):
            try:
                results[name][kind] = run(name, kind, out)
            except Exception as error:  # recorded per cell; the test names it
                message = f"{type(error).__name__}: {error}".splitlines()[0]
                results[name][kind] = {"error": message, "trace": traceback.format_exc()[-2000:]}
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    with ref.user_entry_registered():
        main(Path(sys.argv[1]))
