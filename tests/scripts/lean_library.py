"""The library with torch and Lightning only: ``python tests/scripts/lean_library.py OUT.json``.

Run where only torch, Lightning and what they depend on can be imported, besides this package
(``tests/test_lean_library.py`` runs it in a fresh venv holding the built wheel and, on a path
file, torch's and Lightning's installed dependencies; a fresh environment with ``pip install
torch lightning`` and this package is another). It imports every ``optim_callbacks`` module and
trains a tiny model with each public callback in real Lightning fits, logging to Lightning's CSV
logger, and writes what it saw to ``OUT.json``: where ``optim_callbacks`` was imported from, and
which of the extras' packages could have been imported.
"""

from __future__ import annotations

import importlib.util
import sys

# The recipes sit beside the library (in a checkout and in the wheel): the library must not
# need them.
sys.modules["recipes"] = None  # type: ignore[assignment]
# What the extras bring (recipes, plots, sweep): none of it may be needed.
EXTRAS_PACKAGES = (
    "transformers", "wandb", "jsonargparse", "matplotlib", "tensorboard", "markdown", "optuna",
)  # fmt: skip

import csv  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import optim_callbacks as oc  # noqa: E402


class Tiny(L.LightningModule):
    """A two-layer MLP on a fixed regression problem, with a registry optimizer."""

    def __init__(self, optimizer: str, lr: float) -> None:
        super().__init__()
        self.optimizer_name, self.lr = optimizer, lr
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(96, 8, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def configure_optimizers(self):
        # foreach: the compiled updates (impl='auto') would spend ~10 s compiling on a CPU
        optimizer = oc.build_optimizer(self.optimizer_name, self, lr=self.lr, impl="foreach")
        name = "constant" if self.optimizer_name in oc.SCHEDULE_FREE else "cosine"
        total = self.trainer.estimated_stepping_batches
        scheduler = oc.build_scheduler(name, optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": oc.lightning_scheduler_config(scheduler)}


def fit(root: Path, optimizer: str, lr: float, callbacks: list) -> dict:
    model = Tiny(optimizer, lr)
    logger = CSVLogger(root, name=optimizer)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=logger, callbacks=callbacks, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(root),
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        keys = sorted(next(csv.reader(handle)))
    return {
        "steps": trainer.global_step,
        "optimizer": type(trainer.optimizers[0]).__name__,
        "logged": keys,
        "warnings": [str(w.message) for w in caught],
        "finite": all(torch.isfinite(p).all().item() for p in model.parameters()),
    }


def main(out: Path) -> None:
    torch.manual_seed(0)
    modules = [m.name for m in pkgutil.walk_packages(oc.__path__, "optim_callbacks.")]
    for module in modules:
        importlib.import_module(module)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        watched = [oc.GradientClipping(), oc.AmpEpsilon(), oc.MomentStatistics(every_n_steps=2)]
        fits = {
            "adamw_to_sgd": fit(root, "adamw", 1e-2, [*watched, oc.AdamToSGD(at_step=6, lr=0.02)]),
            "lion_to_nesterov": fit(
                root, "lion", 1e-3, [oc.OptimizerSwitch("nesterov", at_fraction=0.5, lr=0.01)]
            ),
            "schedule_free_adamw": fit(
                root, "schedule_free_adamw", 1e-2, [oc.ScheduleFreeModes(), oc.GradientClipping()]
            ),
        }
    importable = [name for name in EXTRAS_PACKAGES if importlib.util.find_spec(name) is not None]
    seen = {"library": oc.__file__, "modules": modules, "fits": fits}
    out.write_text(json.dumps({**seen, "extras_importable": importable}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
