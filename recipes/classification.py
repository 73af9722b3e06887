"""The classification LightningModule every recipe shares.

A recipe builds the network (any module whose output is logits or has ``.logits``, e.g. a
Hugging Face ``*ForSequenceClassification`` / ``*ForImageClassification`` model) and hands it
over with the optimizer settings; this module does the rest: cross-entropy loss, accuracy and
macro F1 from torchmetrics (synchronized across DDP ranks), and ``configure_optimizers`` from the
``optim_callbacks`` registries with the total number of steps taken from
``trainer.estimated_stepping_batches``.

Batches are dicts: ``labels`` plus the network's keyword inputs (``input_ids``,
``attention_mask``, ``pixel_values``, ...).
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from optim_callbacks import (
    OPTIMIZERS,
    SCHEDULES,
    build_optimizer,
    build_scheduler,
    lightning_scheduler_config,
)
from optim_callbacks.validation import (
    check_at_least,
    check_in_range,
    check_non_negative,
    check_positive,
    check_unknown_options,
)
from recipes.errors import UsageError

__all__ = ["ClassificationModule", "check_optimizer_settings"]

STAGES = ("train", "val", "test")


def _check_warmup(warmup: Any) -> None:
    if isinstance(warmup, float):
        check_in_range("warmup", warmup, 0.0, 1.0)
    else:
        check_at_least("warmup", warmup, 0)


def check_optimizer_settings(
    optimizer: str,
    scheduler: str,
    lr: float | None,
    weight_decay: float | None,
    warmup: int | float,
    layer_decay: float | None,
    optimizer_options: dict[str, Any],
    scheduler_options: dict[str, Any],
) -> None:
    """Everything about the optimizer and schedule that can be checked before training starts
    (one ``ValueError`` naming the parameter, the value, what is allowed, the closest name)."""
    spec = OPTIMIZERS.get(optimizer)
    schedule = SCHEDULES.get(scheduler)
    if lr is not None:
        check_positive("lr", lr)
    if weight_decay is not None:
        check_non_negative("weight_decay", weight_decay)
    _check_warmup(warmup)
    if layer_decay is not None:
        check_in_range(
            "layer_decay", layer_decay, 0.0, 1.0, low_inclusive=False, high_inclusive=True
        )
    check_unknown_options(
        f"{spec.name} optimizer_options",
        optimizer_options,
        [k for k in spec.options() if k not in ("lr", "weight_decay")],
    )
    epoch_keys = [f"{k}_epochs" for k in schedule.epoch_options]
    check_unknown_options(
        f"{schedule.name} scheduler_options", scheduler_options, [*schedule.defaults, *epoch_keys]
    )


class ClassificationModule(L.LightningModule):
    """Trains ``network`` on labelled batches with a registry optimizer and schedule.

    Args:
        network: the model; its output is logits or has a ``.logits`` attribute.
        num_classes: number of classes (at least 2).
        optimizer: a name from ``optim_callbacks.OPTIMIZERS`` (``python -m optim_callbacks list``).
        scheduler: a name from ``optim_callbacks.SCHEDULES``; ``constant`` for none.
        lr: peak learning rate (``None``: the optimizer entry's default).
        weight_decay: decoupled or L2 decay as the optimizer defines it (``None``: the entry's
            default); never applied to biases and normalization weights.
        warmup: linear warmup, in steps (an int) or as a fraction of all steps (a float).
        layer_decay: layer-wise LR decay factor (ELECTRA/BEiT): layer ``i`` of ``L`` gets
            ``lr * layer_decay ** (L + 1 - i)``; ``None`` for the same LR everywhere.
        optimizer_options: more keyword arguments of the torch optimizer (``betas``, ``eps``, ...).
        scheduler_options: options of the schedule (``min_lr_ratio``, ``step_size_epochs``, ...).
        class_names: names of the classes, in label order (for reports).
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimizer: str = "adamw",
        scheduler: str = "cosine",
        lr: float | None = None,
        weight_decay: float | None = None,
        warmup: int | float = 0.06,
        layer_decay: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_at_least("num_classes", num_classes, 2)
        check_optimizer_settings(
            optimizer,
            scheduler,
            lr,
            weight_decay,
            warmup,
            layer_decay,
            optimizer_options or {},
            scheduler_options or {},
        )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names: got {len(class_names)} names; allowed: num_classes ({num_classes}) names"
            )
        self.save_hyperparameters(ignore=["network"])
        self.network = network.train()  # from_pretrained returns eval mode: dropout would stay off
        for stage in STAGES:  # attributes, so Lightning moves and syncs them with the module
            metrics = MetricCollection(
                {
                    "acc": MulticlassAccuracy(num_classes, average="micro"),
                    "f1": MulticlassF1Score(num_classes, average="macro"),
                },
                prefix=f"{stage}_",
            )
            setattr(self, f"{stage}_metrics", metrics)
        self.val_mean_loss = MeanMetric()
        self.test_mean_loss = MeanMetric()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        output = self.network(**inputs)
        return output.logits if hasattr(output, "logits") else output

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch).float()
        labels = batch["labels"]
        loss = nn.functional.cross_entropy(logits, labels)
        batch_size = labels.shape[0]
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, labels)
        self.log_dict(
            metrics, on_step=False, on_epoch=True, batch_size=batch_size, prog_bar=stage == "val"
        )
        if stage == "train":
            self.log(
                "train_loss",
                loss.detach(),
                on_step=True,
                on_epoch=False,
                prog_bar=True,
                batch_size=batch_size,
            )
        else:  # the exact mean over examples, synchronized across ranks
            mean_loss = getattr(self, f"{stage}_mean_loss")
            mean_loss.update(loss.detach(), weight=batch_size)
            self.log(
                f"{stage}_loss", mean_loss, on_step=False, on_epoch=True, batch_size=batch_size
            )
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout masks depend on (seed, rank, epoch, batch) only, not on what ran before, so a
        # run resumed from a checkpoint draws exactly the masks the uninterrupted run drew.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(
            hash((seed, self.global_rank, self.current_epoch, batch_idx)) & (2**63 - 1)
        )

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _steps_per_epoch(self) -> int | None:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total_steps = int(self.trainer.estimated_stepping_batches)  # devices and accumulation count
        try:
            optimizer = build_optimizer(
                hp.optimizer,
                self,
                lr=hp.lr,
                weight_decay=hp.weight_decay,
                layer_decay=hp.layer_decay,
                **(hp.optimizer_options or {}),
            )
            scheduler = build_scheduler(
                hp.scheduler,
                optimizer,
                total_steps=total_steps,
                warmup=hp.warmup,
                steps_per_epoch=self._steps_per_epoch(),
                **(hp.scheduler_options or {}),
            )
        except ValueError as error:  # e.g. more warmup steps than the run has: a usage error
            raise UsageError(str(error)) from None
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler_config(scheduler)}
