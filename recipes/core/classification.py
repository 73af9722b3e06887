"""The classification LightningModule every recipe shares.

A recipe builds the network (any module whose output is logits or has ``.logits``, e.g. a
Hugging Face ``*ForSequenceClassification`` / ``*ForImageClassification`` model) and hands it
over with its :class:`~recipes.core.optimization.OptimizerSettings`; this module does the rest:
cross-entropy loss, accuracy and macro F1 from torchmetrics (synchronized across DDP ranks), and
``configure_optimizers`` from the ``optim_callbacks`` registries with the total number of steps
taken from ``trainer.estimated_stepping_batches``. A recipe that trains at another peak LR than
the settings' (the ResNet recipe scales it to the global batch) overrides :meth:`peak_lr`.

Under FSDP2 (``--trainer.strategy fsdp2``) :meth:`configure_model` shards each block of
:meth:`sharded_blocks` (each BERT or ViT encoder layer, each ResNet stage), then the root.

Batches are dicts: ``labels`` plus the network's keyword inputs (``input_ids``,
``attention_mask``, ``pixel_values``, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from optim_callbacks.callbacks import ScheduleFreeModes
from optim_callbacks.strategies import shard_data_parallel
from optim_callbacks.validation import check_at_least
from recipes.core.errors import UsageError
from recipes.core.optimization import OptimizerSettings
from recipes.core.seeding import derived_seed

__all__ = ["ClassificationModule"]

STAGES = ("train", "val", "test")


# Names of the ModuleList that holds a Hugging Face model's repeated blocks.
BLOCK_LISTS = ("layer", "layers", "stages")


class ClassificationModule(L.LightningModule):
    """Trains ``network`` on labelled batches with a registry optimizer and schedule.

    Args:
        network: the model; its output is logits or has a ``.logits`` attribute.
        num_classes: number of classes (at least 2).
        optimization: optimizer, schedule and their options.
        class_names: names of the classes, in label order (for reports).
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimization: OptimizerSettings | None = None,
        class_names: list[str] | None = None,
    ) -> None:
        super().__init__()
        check_at_least("num_classes", num_classes, 2)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"class_names: got {len(class_names)} names; allowed: num_classes ({num_classes}) names"
            )
        self.optimization = optimization if optimization is not None else OptimizerSettings()
        self.save_hyperparameters(ignore=["network", "optimization"])
        # As plain values (added to the saved ones): checkpoints then load with
        # torch.load(weights_only=True), and loggers show the fields.
        self.save_hyperparameters({"optimization": dataclasses.asdict(self.optimization)})
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
        self.test_examples = SumMetric()  # what the last test really evaluated, on all ranks

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
            if stage == "test":
                self.test_examples.update(batch_size)
            self.log(
                f"{stage}_loss", mean_loss, on_step=False, on_epoch=True, batch_size=batch_size
            )
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout masks depend on (seed, rank, epoch, batch) only, not on what ran before, so a
        # run resumed from a checkpoint draws exactly the masks the uninterrupted run drew.
        torch.manual_seed(derived_seed(self.global_rank, self.current_epoch, batch_idx))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def on_test_epoch_start(self) -> None:
        self.test_examples.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def tested_examples(self) -> int:
        """How many examples the last test evaluated, summed over ranks (all ranks call it)."""
        return int(self.test_examples.compute())

    def _steps_per_epoch(self) -> int | None:
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            return None
        return max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))

    def sharded_blocks(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each all-gathered just before it runs): the
        repeated blocks of a Hugging Face model, the first ``nn.ModuleList`` named ``layer``,
        ``layers`` or ``stages`` in its ``base_model`` (BERT's and ViT's encoder layers, ResNet's
        stages); none for other networks (then only the root is sharded). Override for
        another family."""
        base = getattr(self.network, "base_model", self.network)
        for name, module in base.named_modules():
            if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in BLOCK_LISTS:
                return list(module)
        return []

    def configure_model(self) -> None:
        """FSDP2 (a strategy with a ``data_parallel`` device mesh): ``fully_shard`` each of
        :meth:`sharded_blocks`, then the whole module. Nothing under other strategies, and
        nothing the second time (Lightning calls this hook for every stage)."""
        shard_data_parallel(self, self.sharded_blocks())

    def peak_lr(self) -> float | None:
        """The peak learning rate of this run (``None``: the optimizer entry's default)."""
        return self.optimization.lr

    def configure_callbacks(self) -> list[Callback]:
        """A schedule-free optimizer brings the callback that switches its train/eval modes."""
        return [ScheduleFreeModes()] if self.optimization.schedule_free else []

    def configure_optimizers(self) -> dict[str, Any]:
        try:
            return self.optimization.configure(
                self,
                total_steps=int(self.trainer.estimated_stepping_batches),  # devices, accumulation
                steps_per_epoch=self._steps_per_epoch(),
                lr=self.peak_lr(),
            )
        except ValueError as error:  # e.g. more warmup steps than the run has: a usage error
            raise UsageError(str(error)) from None
