"""Two gloo processes train with AdamToSGD (SWATS); each rank writes what it saw as JSON.

Run by tests/lib/test_optimizer_switch.py as ``python tests/scripts/ddp_switch.py OUT_DIR``; Lightning
re-launches this script for rank 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from lightning.pytorch.callbacks import Callback

from optim_callbacks import AdamToSGD
from tests.lib.tiny import TinyRegressor, tiny_trainer


def flat_params(module) -> list[float]:
    return [float(v) for p in module.parameters() for v in p.detach().flatten()]


class Observer(Callback):
    """The optimizer class of every step and the parameters right after the switch."""

    def __init__(self, switch: AdamToSGD) -> None:
        self.switch = switch
        self.classes: list[str] = []
        self.params_at_switch: list[float] | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.classes.append(type(optimizer).__name__)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.switch.switched and self.params_at_switch is None:
            self.params_at_switch = flat_params(pl_module)


def main(out: Path) -> None:
    switch = AdamToSGD(epsilon=1e-2, min_steps=5)
    observer = Observer(switch)
    torch.manual_seed(0)
    module = TinyRegressor(optimizer="adamw", warmup=4)  # 128 samples per rank: 8 steps per epoch
    trainer = tiny_trainer(
        out, max_epochs=5, devices=2, strategy="ddp", callbacks=[switch, observer]
    )
    trainer.fit(module)
    report = {
        "switched": switch.switched,
        "switch_step": switch.switch_step,
        "final_step": trainer.global_step,
        "estimated_lrs": switch.estimated_lrs,
        "sgd_base_lrs": switch.sgd_base_lrs,
        "statistics": switch.statistics.state_dict() if switch.statistics else None,
        "classes": observer.classes,
        "params_at_switch": observer.params_at_switch,
        "final_params": flat_params(module),
        "losses": module.losses,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
