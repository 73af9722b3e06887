"""Train or fine-tune a ResNet for image classification.

    python -m recipes.resnet_finetune --optimizer nesterov
    python -m recipes.resnet_finetune --config configs/resnet_finetune.yaml
    python -m recipes.resnet_finetune --model.checkpoint microsoft/resnet-18
    python -m recipes.resnet_finetune --help

No Python package ships pretrained ResNet weights, so the default run trains a small ResNet
from initialisation on the 28 x 28 grey Fashion-MNIST images (Debian's
``dataset-fashion-mnist``) for 6 epochs. The preset is the CNN practice: SGD with Nesterov
momentum 0.9, learning rate 0.1 per 256 images scaled linearly to the global batch (Goyal et al.
2017: batch 128 on one device trains at 0.05), cosine to zero, weight decay 5e-4 on convolution
and linear weights only (none on biases and BatchNorm), horizontal flips, global-norm clipping
at 1.0 (the recipes' shared default), logged to W&B (offline without credentials).

With ``--model.checkpoint`` (a hub id, or a folder written by ``save_pretrained``) the recipe
fine-tunes that model instead: a new head for the data's classes, images resized and
channel-matched to what the checkpoint expects, its normalization. The story, top to bottom:

1. data: :class:`recipes.vision_data.ImageClassificationData` reads and splits the images and
   transforms each batch for the model (:mod:`recipes.vision_transforms`);
2. model: :class:`ResNetClassifier` builds the network (:mod:`recipes.vision_models`) and trains
   it with :class:`recipes.classification.ClassificationModule` (loss, metrics, registry
   optimizer and schedule), at the learning rate scaled to the global batch;
3. callbacks and trainer: :mod:`recipes.cli` (clipping, AMP epsilon, moment statistics, LR
   monitor, checkpoints), then fit and test.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Literal

from optim_callbacks import (
    OPTIMIZERS,
    build_optimizer,
    build_scheduler,
    global_batch_size,
    lightning_scheduler_config,
    scale_lr,
)
from optim_callbacks.validation import check_at_least, check_choice
from recipes.classification import ClassificationModule
from recipes.cli import RecipeCLI, main
from recipes.errors import UsageError
from recipes.vision_data import ImageClassificationData
from recipes.vision_models import build_image_classifier, expected_input

__all__ = ["TRAINER_DEFAULTS", "ResNetClassifier", "run"]

TRAINER_DEFAULTS = {"max_epochs": 6}
LR_SCALING = ("linear", "sqrt", "none")


class ResNetClassifier(ClassificationModule):
    """A ``ResNetForImageClassification``: the small from-scratch ResNet, or a checkpoint's.

    Args:
        checkpoint: a Hugging Face hub id or a ``save_pretrained`` folder to fine-tune;
            ``None`` trains the small ResNet from initialisation.
        config: ``ResNetConfig`` fields that change the small ResNet (e.g.
            ``{"depths": [3, 3, 3]}``).
        num_classes: number of classes (linked from the data).
        class_names: class names in label order (linked from the data; stored as ``id2label``).
        batch_size: images per batch and device (linked from ``--data.batch_size``).
        optimizer: see :class:`~recipes.classification.ClassificationModule` for these.
        scheduler: schedule name.
        lr: peak learning rate for a global batch of ``base_batch_size`` images; the run uses
            ``scale_lr(lr, global batch, base_batch_size, lr_scaling)``, the global batch being
            batch size x devices x nodes x gradient accumulation.
        base_batch_size: the batch size ``lr`` is given for.
        lr_scaling: ``linear`` (Goyal et al. 2017), ``sqrt`` or ``none``.
        weight_decay: L2 weight decay on weights (none on biases and BatchNorm).
        warmup: warmup steps (int) or fraction (float).
        layer_decay: layer-wise LR decay; ``None`` for the same LR in every layer.
        optimizer_options: more torch optimizer options.
        scheduler_options: more schedule options.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        batch_size: int = 128,
        optimizer: str = "nesterov",
        scheduler: str = "cosine",
        lr: float | None = 0.1,
        base_batch_size: int = 256,
        lr_scaling: Literal["linear", "sqrt", "none"] = "linear",
        weight_decay: float | None = 5e-4,
        warmup: int | float = 0,
        layer_decay: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
    ) -> None:
        check_at_least("batch_size", batch_size, 1)
        check_at_least("base_batch_size", base_batch_size, 1)
        check_choice("lr_scaling", lr_scaling, LR_SCALING)
        network = build_image_classifier(
            "resnet", num_classes, checkpoint, labels=class_names, config=config
        )
        super().__init__(
            network,
            num_classes,
            optimizer=optimizer,
            scheduler=scheduler,
            lr=lr,
            weight_decay=weight_decay,
            warmup=warmup,
            layer_decay=layer_decay,
            optimizer_options=optimizer_options,
            scheduler_options=scheduler_options,
            class_names=class_names,
        )
        self.image_input = expected_input(network, checkpoint)  # read by the data module

    def scaled_lr(self) -> float:
        """The peak learning rate for this run's global batch."""
        hp = self.hparams
        trainer = self.trainer
        global_batch = global_batch_size(
            hp.batch_size,
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
        )
        base_lr = hp.lr if hp.lr is not None else OPTIMIZERS.get(hp.optimizer).defaults["lr"]
        return scale_lr(base_lr, global_batch, hp.base_batch_size, hp.lr_scaling)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        try:
            optimizer = build_optimizer(
                hp.optimizer,
                self,
                lr=self.scaled_lr(),
                weight_decay=hp.weight_decay,
                layer_decay=hp.layer_decay,
                **(hp.optimizer_options or {}),
            )
            scheduler = build_scheduler(
                hp.scheduler,
                optimizer,
                total_steps=int(self.trainer.estimated_stepping_batches),
                warmup=hp.warmup,
                steps_per_epoch=self._steps_per_epoch(),
                **(hp.scheduler_options or {}),
            )
        except ValueError as error:  # e.g. more warmup steps than the run has: a usage error
            raise UsageError(str(error)) from None
        return {"optimizer": optimizer, "lr_scheduler": lightning_scheduler_config(scheduler)}


def run(args: Sequence[str] | None = None) -> RecipeCLI:
    """Run the recipe with ``args`` (default: the command line); returns the finished CLI."""
    return main(
        ResNetClassifier,
        ImageClassificationData,
        name="resnet_finetune",
        data_to_model=("batch_size",),
        trainer_defaults=TRAINER_DEFAULTS,
        description=__doc__.split("\n\n")[0],
        args=args,
    )


if __name__ == "__main__":
    run()
    sys.exit(0)
