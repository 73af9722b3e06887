"""MomentStatistics under FSDP2 against DDP, for tests/lib/test_moment_stats.py:
``python tests/scripts/fsdp_moments.py OUT``.

Two gloo processes. For AdamW, AdaBelief and SGD with momentum, the same tiny MLP trains under
DDP and under FSDP2 (the model of ``fsdp_vs_ddp.py``: uneven shards, a LayerNorm spread over both
ranks) with ``MomentStatistics(every_n_steps=2)`` and a real ``CSVLogger`` (the test reads its
files); the FSDP2 AdamW run also logs to a real offline W&B run, with histograms. Each rank
writes ``OUT/rank<r>.json``: per run, the CSV folder and the collectives the callback issued on
each step (counted with ``CommDebugMode`` around its two hooks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.distributed.tensor.debug import CommDebugMode

from optim_callbacks import MomentStatistics
from tests.lib.tiny import tiny_trainer
from tests.scripts.fsdp_vs_ddp import Sharded, strategy

OPTIMIZERS = {
    "adamw": {},
    "adabelief": {"impl": "foreach"},
    "momentum": {},
}


class CountedMoments(MomentStatistics):
    """The real callback; each step's collectives are counted around its two hooks."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collectives: list[int] = []
        self._count = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with CommDebugMode() as comm:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._count = comm.get_total_counts()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with CommDebugMode() as comm:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.collectives.append(self._count + comm.get_total_counts())


def run(optimizer: str, kind: str, out: Path) -> dict:
    torch.manual_seed(0)
    module = Sharded(
        optimizer=optimizer,
        lr=1e-2,
        scheduler="cosine",
        samples=128,
        batch_size=8,
        optimizer_options=OPTIMIZERS[optimizer] or None,
    )
    folder = out / optimizer / kind
    loggers = [CSVLogger(folder, name="csv")]
    with_wandb = optimizer == "adamw" and kind == "fsdp2"
    if with_wandb:
        loggers.append(WandbLogger(project="fsdp-moments", save_dir=str(folder), offline=True))
    moments = CountedMoments(every_n_steps=2, histograms=with_wandb)
    trainer = tiny_trainer(
        folder,
        devices=2,
        strategy=strategy(kind),
        max_steps=6,
        callbacks=[moments],
        logger=loggers,
        log_every_n_steps=1,
    )
    trainer.fit(module)
    if with_wandb and trainer.is_global_zero:
        import wandb

        wandb.finish()
    return {
        "csv": str(Path(loggers[0].log_dir) / "metrics.csv"),
        "collectives": moments.collectives,
        "wandb_dir": str(folder / "wandb") if with_wandb else None,
    }


def main(out: Path) -> None:
    results = {
        optimizer: {kind: run(optimizer, kind, out) for kind in ("ddp", "fsdp2")}
        for optimizer in OPTIMIZERS
    }
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
