"""A tiny Lightning module and data for callback tests: real Trainer runs in seconds.

Not collected by pytest (no ``test_`` prefix); import it as ``from tests.lib.tiny import ...`` or,
from scripts run as subprocesses, after putting the repository root on ``sys.path``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from optim_callbacks import (
    build_optimizer,
    build_scheduler,
    lightning_scheduler_config,
    shard_data_parallel,
)


def regression_data(n: int = 256, features: int = 16, seed: int = 0) -> TensorDataset:
    """A noisy linear-regression problem with a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=generator)
    w = torch.randn(features, 1, generator=generator)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


class TinyRegressor(L.LightningModule):
    """Two-layer MLP with a LayerNorm, trained with a registry optimizer and schedule."""

    def __init__(
        self,
        optimizer: str = "adam",
        lr: float | None = 1e-2,
        scheduler: str | None = "cosine",
        warmup: int | float = 0,
        features: int = 16,
        hidden: int = 32,
        batch_size: int = 16,
        samples: int = 256,
        optimizer_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.LayerNorm(hidden), nn.Tanh(), nn.Linear(hidden, 1)
        )
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x).float(), y.float())
        self.losses.append(loss.detach().item())
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self):
        data = regression_data(self.hparams.samples, self.hparams.features)
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=False)

    def configure_model(self) -> None:
        """Under FSDP2: each Linear of ``net``, then the root, sharded."""
        shard_data_parallel(self, [m for m in self.net if isinstance(m, nn.Linear)])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = build_optimizer(hp.optimizer, self, lr=hp.lr, **(hp.optimizer_options or {}))
        if hp.scheduler is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches
        scheduler = build_scheduler(hp.scheduler, optimizer, total_steps=total, warmup=hp.warmup)
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler_config(scheduler)}


def tiny_trainer(tmp_path, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer writing under ``tmp_path``."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def fp16_mixed(init_scale: float = 2.0**16) -> MixedPrecision:
    """Real ``16-mixed`` (autocast to float16 + GradScaler) on CPU. The string
    ``precision="16-mixed"`` would not do: on CPU Lightning 2.6 replaces it with ``bf16-mixed``.
    A small ``init_scale`` keeps the scaler from skipping the first steps of a short run."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


class RecordingLogger(Logger):
    """A Lightning logger that records every ``log_metrics`` call, on every rank (no rank-zero
    filter): ``rows`` holds ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))
