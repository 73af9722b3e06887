"""DDP job for tests/lib/test_clipping.py: two gloo processes, GradientClipping + AmpEpsilon.

Run as ``python tests/scripts/ddp_clipping.py OUT_DIR``. Precision ``16-true`` with AdamW on the
foreach path (float16 state, so AmpEpsilon acts); rank 0's loss is NaN at global step 2, which the
gradient all-reduce hands to both ranks. SpikeSkip (placed last, so the observer still sees the
step) must skip global step 5, where only rank 0's loss is scaled x100. Each rank writes what it observed to
``OUT_DIR/rank<r>.json``; the test compares the two files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch import Callback

from optim_callbacks import AmpEpsilon, GradientClipping, SpikeSkip
from tests.lib.tiny import TinyRegressor, tiny_trainer


class RankZeroNaN(TinyRegressor):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 0 and self.trainer.global_step == 2:
            loss = loss * float("nan")
        if self.global_rank == 0 and self.trainer.global_step == 5:
            loss = loss * 100  # a spike on one rank only
        return loss


class Observer(Callback):
    """Placed after GradientClipping: what it left for the optimizer at each step."""

    def __init__(self) -> None:
        self.clipped_norms: list[float] = []
        self.skipped: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.skipped.append(not grads)
        if grads:
            flat = torch.cat([g.float().flatten() for g in grads])
            self.clipped_norms.append(flat.norm().item())


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    clipping = GradientClipping(mode="auto", percentile=50)
    observer = Observer()
    spike_skip = SpikeSkip(window=8, warmup=4, max_skip_fraction=0.5)
    module = RankZeroNaN(
        optimizer="adamw",
        lr=1e-2,
        scheduler=None,
        samples=192,
        optimizer_options={"impl": "foreach"},
    )
    trainer = tiny_trainer(
        out_dir,
        devices=2,
        strategy="ddp",
        precision="16-true",
        callbacks=[AmpEpsilon(), clipping, observer, spike_skip],
    )
    trainer.fit(module)
    observed = {
        "norms": list(clipping.history),
        "clipped_norms": observer.clipped_norms,
        "skipped": observer.skipped,
        "clipped": [
            n < h - 1e-6 * h for n, h in zip(observer.clipped_norms, clipping.history, strict=True)
        ],
        "nonfinite_steps": clipping.nonfinite_steps,
        "eps": [group["eps"] for group in trainer.optimizers[0].param_groups],
        "parameters": [p.float().sum().item() for p in module.parameters()],
        "spike_events": [[e["step"], e["rank"], e["spiked"]] for e in spike_skip.events],
        "spike_judged": spike_skip.judged_steps,
    }
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(observed))


if __name__ == "__main__":
    main(sys.argv[1])
