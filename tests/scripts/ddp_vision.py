"""The ResNet recipe's CLI under DDP: ``python tests/scripts/ddp_vision.py OUT_DIR [CLI args...]``.

Lightning's DDP launcher starts this script again for rank 1 with the same arguments; every
rank runs the recipe and writes what it observed to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from lightning.pytorch.callbacks import Callback

from recipes.resnet_finetune import run


class TrainIndexRecorder(Callback):
    """Remembers which training images this rank's sampler drew in each epoch (the test adds
    it with ``--trainer.callbacks+ tests.scripts.ddp_vision.TrainIndexRecorder``)."""

    def __init__(self) -> None:
        self.indices: list[int] = []
        self.sampler = ""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        self.sampler = type(sampler).__name__
        subset = trainer.datamodule.train_set
        self.indices += [subset.indices[i] for i in sampler]


def main() -> None:
    out = Path(sys.argv[1])
    cli = run(sys.argv[2:])
    trainer = cli.trainer
    recorder = next(cb for cb in trainer.callbacks if type(cb).__name__ == "TrainIndexRecorder")
    parameters = [p.detach().double() for p in cli.model.parameters()]
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "initial_lr": trainer.optimizers[0].param_groups[0]["initial_lr"],
        "parameter_sum": float(sum(p.sum() for p in parameters)),
        "test": {key: float(value) for key, value in cli.test_results.items()},
        "train_indices": recorder.indices,
        "sampler": recorder.sampler,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
