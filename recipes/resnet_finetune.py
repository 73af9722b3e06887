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

1. data: :class:`recipes.data.images.ImageClassificationData` reads and splits the images and
   transforms each batch for the model (:mod:`recipes.data.transforms`);
2. model: :class:`ResNetClassifier` builds the network (:mod:`recipes.models.vision`) and trains
   it with :class:`recipes.core.classification.ClassificationModule` (loss, metrics, registry
   optimizer and schedule), at the learning rate scaled to the global batch;
3. callbacks and trainer: :mod:`recipes.core.cli` (clipping, AMP epsilon, moment statistics, LR
   monitor, checkpoints), then fit and test.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

from optim_callbacks import global_batch_size, scale_lr
from optim_callbacks.validation import check_at_least, check_choice
from recipes.core.classification import ClassificationModule
from recipes.core.cli import Recipe
from recipes.core.optimization import OptimizerSettings
from recipes.data.images import ImageClassificationData
from recipes.models.vision import build_image_classifier, expected_input

__all__ = ["PRESET", "RECIPE", "TRAINER_DEFAULTS", "ResNetClassifier", "run"]

TRAINER_DEFAULTS = {"max_epochs": 6}
# The CNN practice: SGD with Nesterov momentum 0.9, cosine to zero without warmup, weight decay
# 5e-4 on convolution and linear weights; lr 0.1 is for a global batch of 256 (scaled, see
# ResNetClassifier.peak_lr).
PRESET = OptimizerSettings("nesterov", "cosine", lr=0.1, weight_decay=5e-4, warmup=0)
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
        base_batch_size: the global batch size ``optimization.lr`` is given for; the run
            trains at ``scale_lr(lr, global batch, base_batch_size, lr_scaling)``, the global
            batch being batch size x devices x nodes x gradient accumulation.
        lr_scaling: ``linear`` (Goyal et al. 2017), ``sqrt`` or ``none``.
        optimization: optimizer, schedule and options (default :data:`PRESET`; the CLI's
            ``--optimizer --scheduler --lr --weight_decay --warmup`` set its fields).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        batch_size: int = 128,
        base_batch_size: int = 256,
        lr_scaling: Literal["linear", "sqrt", "none"] = "linear",
        optimization: OptimizerSettings = PRESET,
    ) -> None:
        check_at_least("batch_size", batch_size, 1)
        check_at_least("base_batch_size", base_batch_size, 1)
        check_choice("lr_scaling", lr_scaling, LR_SCALING)
        network = build_image_classifier(
            "resnet", num_classes, checkpoint, labels=class_names, config=config
        )
        super().__init__(network, num_classes, optimization, class_names)
        self.image_input = expected_input(network, checkpoint)  # read by the data module

    def peak_lr(self) -> float:
        """The settings' learning rate scaled from ``base_batch_size`` to this run's global batch."""
        hp = self.hparams
        trainer = self.trainer
        global_batch = global_batch_size(
            hp.batch_size,
            devices=trainer.num_devices,
            num_nodes=trainer.num_nodes,
            accumulate_grad_batches=trainer.accumulate_grad_batches,
        )
        return scale_lr(
            self.optimization.default_lr(), global_batch, hp.base_batch_size, hp.lr_scaling
        )


RECIPE = Recipe(
    ResNetClassifier,
    ImageClassificationData,
    name="resnet_finetune",
    description=__doc__.split("\n\n")[0],
    data_to_model=("batch_size",),
    trainer_defaults=TRAINER_DEFAULTS,
)

run = RECIPE.run  # run(args=None): parse (default: the command line), fit, test; the finished CLI

if __name__ == "__main__":
    run()
    sys.exit(0)
