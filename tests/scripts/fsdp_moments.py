"""MomentStatistics under FSDP2 against DDP, for tests/lib/test_moment_stats.py:
``python tests/scripts/fsdp_moments.py OUT``.

Two gloo processes. For AdamW, AdaBelief and SGD with momentum, the same tiny MLP trains under
DDP and under FSDP2 (the model of ``fsdp_vs_ddp.py``: uneven shards, a LayerNorm spread over both
ranks; a 80x64 first layer, larger than the 1024 elements the callback once sampled) with
``MomentStatistics(every_n_steps=2)`` at default settings and a real ``CSVLogger`` (the test
reads its files); the FSDP2 AdamW run also logs to a real offline W&B run, with histograms.
Each rank writes ``OUT/rank<r>.json``: per run, the CSV folder, the collectives the callback
issued on each step (counted with ``CommDebugMode`` around its two hooks) and, for the adaptive
optimizers, the exact percentiles of sqrt(v_hat) and of the step size at each logging step,
computed here with ``torch.quantile`` over the full tensors (``DTensor.full_tensor``).
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
from optim_callbacks.callbacks.moment_stats import moment_key
from tests.lib.tiny import tiny_trainer
from tests.scripts.fsdp_vs_ddp import Sharded, strategy

OPTIMIZERS = {
    "adamw": {},
    "adabelief": {"impl": "foreach"},
    "momentum": {},
}
SECOND_MOMENT = {"adamw": "exp_avg_sq", "adabelief": "exp_avg_var"}
PERCENTILES = (5, 50, 95)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective under FSDP2), in float64."""
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).double()


def exact_percentiles(pl_module, optimizer, second: str, hyper: dict) -> dict[str, float]:
    """Per layer and global: torch.quantile of sqrt(v_hat) and of lr / (sqrt(v_hat) + eps) over
    every element, with the lr, eps and betas of before the step (``hyper``)."""
    roots: dict[str | None, list[torch.Tensor]] = {None: []}
    steps: dict[str | None, list[torch.Tensor]] = {None: []}
    for name, p in pl_module.named_parameters():
        state = optimizer.state[p]
        lr, eps, (_, beta2) = hyper[id(p)]
        t = float(full(state["step"]))
        v_hat = full(state[second]).flatten() / (1 - beta2**t)
        layer = name.rpartition(".")[0]
        for table, value in ((roots, v_hat.sqrt()), (steps, lr / (v_hat.sqrt() + eps))):
            table.setdefault(layer, []).append(value)
            table[None].append(value)
    q = torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64)
    out = {}
    for label, table in (("sqrt_second_moment", roots), ("step_size", steps)):
        for layer, values in table.items():
            for p, value in zip(PERCENTILES, torch.quantile(torch.cat(values), q), strict=True):
                out[moment_key(f"{label}_p{p:02d}", layer)] = float(value)
    return out


class CountedMoments(MomentStatistics):
    """The real callback; each step's collectives are counted around its two hooks."""

    def __init__(self, second: str | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.collectives: list[int] = []
        self._count = 0
        self.second = second
        self.exact: dict[int, dict[str, float]] = {}  # logging step -> exact percentiles
        self._hyper: dict[int, tuple] = {}
        self._step: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        with CommDebugMode() as comm:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self._count = comm.get_total_counts()
        step = trainer.global_step  # one optimizer step per batch
        self._step = step if (step + 1) % self.every_n_steps == 0 else None
        self._hyper = {
            id(p): (g["lr"], g.get("eps"), g.get("betas"))
            for g in optimizer.param_groups
            for p in g["params"]
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with CommDebugMode() as comm:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.collectives.append(self._count + comm.get_total_counts())
        if self._step is not None and self.second is not None:
            self.exact[self._step] = exact_percentiles(
                pl_module, trainer.optimizers[0], self.second, self._hyper
            )


def run(optimizer: str, kind: str, out: Path) -> dict:
    torch.manual_seed(0)
    module = Sharded(
        optimizer=optimizer,
        lr=1e-2,
        scheduler="cosine",
        samples=128,
        batch_size=8,
        features=64,
        hidden=80,
        optimizer_options=OPTIMIZERS[optimizer] or None,
    )
    folder = out / optimizer / kind
    loggers = [CSVLogger(folder, name="csv")]
    with_wandb = optimizer == "adamw" and kind == "fsdp2"
    if with_wandb:
        loggers.append(WandbLogger(project="fsdp-moments", save_dir=str(folder), offline=True))
    moments = CountedMoments(SECOND_MOMENT.get(optimizer), every_n_steps=2, histograms=with_wandb)
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
        "exact": moments.exact,
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
