"""The BERT recipe's CLI under DDP: ``python tests/scripts/ddp_bert.py OUT_DIR [CLI args...]``.

Lightning's DDP launcher starts this script again for rank 1 with the same arguments; every
rank runs the recipe and writes what it observed to ``OUT_DIR/rank<r>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

import torch
from lightning.pytorch.loggers import WandbLogger
from torch.distributed.tensor import DTensor

from recipes.bert_finetune import run


def main() -> None:
    out = Path(sys.argv[1])
    cli = run(sys.argv[2:])
    trainer = cli.trainer
    parameters = [  # whole tensors, also under FSDP2 (gathered from the shards)
        (p.full_tensor() if isinstance(p, DTensor) else p).detach().double()
        for p in cli.model.parameters()
    ]
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "test": {key: float(value) for key, value in cli.test_results.items()},
        "test_indices": list(trainer.test_dataloaders.sampler),
        "parameter_sum": float(sum(p.sum() for p in parameters)),
        "parameters": torch.cat([p.flatten() for p in parameters]).tolist(),
        "strategy": type(trainer.strategy).__name__,
        # rank zero holds the wandb run; other ranks get Lightning's no-op stand-in
        "logger_is_wandb_run": any(
            isinstance(logger, WandbLogger)
            and type(logger.experiment).__module__.startswith("wandb")
            for logger in trainer.loggers
        ),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
