"""Per-step cost of ``GradientClipping`` under FSDP2 (two gloo processes), against no clipping,
in one run.

Run: ``python bench/sharded_clipping.py [--cycles C] [--width W] [--depth D] [--threads T]``

One fit of an MLP (``depth`` Linear layers of ``width`` x ``width``, a LayerNorm after each,
every Linear and the root ``fully_shard``-ed over 2 CPU processes, Adam) runs blocks of 20
optimizer steps, each block in one configuration: no clipping, ``norm`` (max_norm 1.0) and
``agc``. Blocks follow the order off, norm, agc, agc, norm, off in each cycle, so a drifting
machine load hits every configuration alike. Step time is the wall time between consecutive
``on_train_batch_start`` calls on rank zero (forward, backward with FSDP2's reduce-scatter, the
callback, the optimizer step). Reported per configuration: the median over cycles of its mean
ms/step and of its ratio to the "off" blocks of the same cycle, and the collectives the callback
issued per step (``torch.distributed.tensor.debug.CommDebugMode``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils.data import DataLoader, TensorDataset

from optim_callbacks import FSDP2Strategy, GradientClipping, build_optimizer, shard_data_parallel

BLOCK = 20
CYCLE = ("off", "norm", "agc", "agc", "norm", "off")


class ShardedMLP(L.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.LayerNorm(width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def configure_model(self) -> None:
        shard_data_parallel(self, [m for m in self.net if isinstance(m, nn.Linear)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)  # through __call__: FSDP2's root hooks

    def configure_optimizers(self):
        return build_optimizer("adam", self, lr=1e-4)


class BlockedClipping(Callback):
    """Runs the configuration of the current block: no clipping or one GradientClipping."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.clippers = {
            "norm": GradientClipping(max_norm=1.0),
            "agc": GradientClipping(mode="agc", clip_factor=0.01),
        }
        self.step_started: float | None = None
        self.times: list[tuple[str, float]] = []
        self.collectives: dict[str, int] = {}

    def config(self, step: int) -> str:
        return self.order[min(step // BLOCK, len(self.order) - 1)]

    def setup(self, trainer, pl_module, stage):
        for clipper in self.clippers.values():
            clipper.setup(trainer, pl_module, stage)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.step_started is not None:
            self.times.append((self.config(trainer.global_step - 1), now - self.step_started))
        self.step_started = now

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        config = self.config(trainer.global_step)
        if config == "off":
            return
        with CommDebugMode() as comm:
            self.clippers[config].on_before_optimizer_step(trainer, pl_module, optimizer)
        self.collectives[config] = comm.get_total_counts()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    order = ["off"] + list(CYCLE) * args.cycles  # the first block warms up
    steps = BLOCK * len(order) + 1  # a step's time ends when the next starts: one step more
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(steps * 64, args.width, generator=generator), torch.randn(steps * 64, 1)
    )
    blocked = BlockedClipping(order)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=FSDP2Strategy(data_parallel_size=2),
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[blocked],
        default_root_dir=tempfile.mkdtemp(),
    )
    torch.manual_seed(0)
    trainer.fit(ShardedMLP(args.width, args.depth), DataLoader(data, batch_size=32))
    if not trainer.is_global_zero:
        return
    per_cycle: dict[str, list[float]] = {c: [] for c in ("off", "norm", "agc")}
    ratios: dict[str, list[float]] = {"norm": [], "agc": []}
    times = blocked.times[BLOCK:]  # without the warm-up block
    cycle_len = BLOCK * len(CYCLE)
    for start in range(0, len(times) - cycle_len + 1, cycle_len):
        cycle = times[start : start + cycle_len]
        means = {
            c: statistics.mean(t for config, t in cycle if config == c) * 1e3 for c in per_cycle
        }
        for c, value in means.items():
            per_cycle[c].append(value)
        for c in ratios:
            ratios[c].append(means[c] / means["off"])
    params = sum(p.numel() for p in trainer.lightning_module.parameters())
    print(
        f"FSDP2, 2 gloo processes, {params / 1e6:.1f}M parameters ({args.depth} x Linear"
        f"({args.width}, {args.width}) + LayerNorm), batch 32 per rank, {args.threads} thread(s)"
    )
    print(f"{'clipping':<10} {'ms/step':>8} {'vs off':>7} {'collectives/step':>17}")
    for c in ("off", "norm", "agc"):
        ratio = "1.00x" if c == "off" else f"{statistics.median(ratios[c]):.2f}x"
        print(
            f"{c:<10} {statistics.median(per_cycle[c]):>8.1f} {ratio:>7} "
            f"{blocked.collectives.get(c, 0):>17}"
        )


if __name__ == "__main__":
    main()
