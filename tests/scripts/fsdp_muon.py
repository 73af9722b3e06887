"""Muon under FSDP2 and DDP, for tests/lib/test_muon.py: ``python tests/scripts/fsdp_muon.py OUT``.

Two gloo processes (Lightning launches the second) train an MLP whose three hidden matrices all go
to Muon: 32 x 16 (tall, even shards), 5 x 32 (rows 3 + 2: uneven) and 1 x 5 (rows 1 + 0: rank 1
holds an empty shard), with LayerNorm and biases on the AdamW part. Runs:

- ``fsdp2``: ``fully_shard`` on each Linear and the root, 8 steps, a distributed checkpoint at
  steps 4 and 8;
- ``fsdp2_resumed``: from the step-4 checkpoint to step 8 (the data loader starts the
  epoch again: the test replays what it saw);
- ``ddp``: the same under DDP (plain tensors: the orthogonalization split across the ranks).

Each rank records the full weights at the start, the full gradients and every parameter's learning
rate before each step, how many matrices it orthogonalized at each step, the momentum buffers at
step 4 (or, resumed, as loaded) and at the end, and the final weights, into ``OUT/rank<r>.json``;
the test replays the gradients through single-process ``torch.optim.Muon`` / ``AdamW``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.tensor import DTensor

from optim_callbacks import FSDP2Strategy
from tests.lib.tiny import TinyRegressor, tiny_trainer

STEPS = 8  # 128 samples, 2 ranks, batch 8
OPTIONS = {"adamw_lr": 1e-2, "adamw_weight_decay": 0.01}


def full(tensor: torch.Tensor) -> list:
    """The whole tensor as nested lists (a collective for a DTensor: every rank calls it)."""
    whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
    return whole.detach().tolist()


class MuonNet(TinyRegressor):
    """Three hidden matrices of awkward shapes; FSDP2 shards each Linear and the root."""

    def __init__(self) -> None:
        super().__init__(
            optimizer="muon", lr=0.02, samples=128, batch_size=8, optimizer_options=OPTIONS
        )
        self.net = nn.Sequential(
            nn.Linear(16, 32),
            nn.LayerNorm(32),
            nn.Tanh(),
            nn.Linear(32, 5),
            nn.Tanh(),
            nn.Linear(5, 1),
        )


class Record(Callback):
    """What the test replays and compares (every rank calls the collectives alike)."""

    def __init__(self) -> None:
        self.data: dict = {"grads": [], "lrs": [], "orthogonalized": [], "groups": {}}

    def _momentum(self, trainer, pl_module) -> dict:
        optimizer = trainer.optimizers[0]
        return {
            name: full(optimizer.state[p]["momentum_buffer"])
            for name, p in pl_module.named_parameters()
            if "momentum_buffer" in optimizer.state.get(p, {})
        }

    def on_train_start(self, trainer, pl_module):
        self.data["start"] = {n: full(p) for n, p in pl_module.named_parameters()}
        self.data["momentum_at_start"] = self._momentum(trainer, pl_module)
        optimizer = trainer.optimizers[0]
        owner = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.data["groups"] = {
            name: {
                k: v
                for k, v in owner[id(p)].items()
                if k in ("use_muon", "weight_decay", "momentum", "nesterov", "betas", "eps")
            }
            for name, p in pl_module.named_parameters()
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.data["grads"].append({n: full(p.grad) for n, p in pl_module.named_parameters()})
        owner = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self.data["lrs"].append({n: owner[id(p)] for n, p in pl_module.named_parameters()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.data["orthogonalized"].append(getattr(trainer.optimizers[0], "orthogonalized", None))
        if trainer.global_step == 4:
            self.data["momentum_at_4"] = self._momentum(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.data["end"] = {n: full(p) for n, p in pl_module.named_parameters()}
        self.data["momentum_at_end"] = self._momentum(trainer, pl_module)
        self.data["global_step"] = trainer.global_step
        self.data["state_types"] = sorted(
            {
                type(s["momentum_buffer"]).__name__
                for s in trainer.optimizers[0].state.values()
                if "momentum_buffer" in s
            }
        )


def run(kind: str, out: Path, ckpt_path: str | None = None, tag: str = "") -> dict:
    torch.manual_seed(0)
    module = MuonNet()
    record = Record()
    strategy = (
        DDPStrategy(process_group_backend="gloo")
        if kind == "ddp"
        else FSDP2Strategy(data_parallel_size=2)
    )
    checkpoints = ModelCheckpoint(
        dirpath=out / f"{kind}{tag}" / "ckpt", every_n_train_steps=4, save_top_k=-1
    )
    trainer = tiny_trainer(
        out / f"{kind}{tag}",
        devices=2,
        strategy=strategy,
        callbacks=[record, checkpoints],
        enable_checkpointing=True,
        max_steps=STEPS,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return record.data


def main(out: Path) -> None:
    results = {"fsdp2": run("fsdp2", out), "ddp": run("ddp", out)}
    middle = out / "fsdp2" / "ckpt" / "epoch=0-step=4.ckpt"
    results["fsdp2_resumed"] = run("fsdp2", out, ckpt_path=str(middle), tag="-resumed")
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
