"""Train or fine-tune a Vision Transformer (ViT) for image classification.

    python -m recipes.vit_finetune --optimizer adamw
    python -m recipes.vit_finetune --config configs/vit_finetune.yaml
    python -m recipes.vit_finetune --model.checkpoint google/vit-base-patch16-224 --model.layer_decay 0.75
    python -m recipes.vit_finetune --help

No Python package ships pretrained ViT weights, so the default run trains a small ViT from
initialisation: 7 x 7 patches of the 28 x 28 grey Fashion-MNIST images (Debian's
``dataset-fashion-mnist``), hidden size 128, 6 layers, 4 heads, 6 epochs. The preset is the
transformer practice: AdamW (lr 2e-3, weight decay 0.05, none on biases, LayerNorm, the [CLS]
token and the position embeddings), 10% linear warmup then cosine to zero, global-norm clipping
at 1.0, horizontal flips, logged to W&B (offline without credentials).

With ``--model.checkpoint`` (a hub id, or a folder written by ``save_pretrained``) the recipe
fine-tunes that model instead: a new head for the data's classes, images resized and
channel-matched to what the checkpoint expects, its normalization; ``--model.layer_decay``
gives encoder layer ``i`` of ``L`` the learning rate ``lr * layer_decay ** (L + 1 - i)``. The
story, top to bottom:

1. data: :class:`recipes.vision_data.ImageClassificationData` reads and splits the images and
   transforms each batch for the model (:mod:`recipes.vision_transforms`);
2. model: :class:`ViTClassifier` builds the network (:mod:`recipes.vision_models`) and trains it
   with :class:`recipes.classification.ClassificationModule` (loss, metrics, registry optimizer
   and schedule);
3. callbacks and trainer: :mod:`recipes.cli` (clipping, AMP epsilon, moment statistics, LR
   monitor, checkpoints), then fit and test.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from recipes.classification import ClassificationModule
from recipes.cli import RecipeCLI, main
from recipes.vision_data import ImageClassificationData
from recipes.vision_models import build_image_classifier, expected_input

__all__ = ["TRAINER_DEFAULTS", "ViTClassifier", "run"]

TRAINER_DEFAULTS = {"max_epochs": 6}


class ViTClassifier(ClassificationModule):
    """A ``ViTForImageClassification``: the small from-scratch ViT, or a checkpoint's.

    Args:
        checkpoint: a Hugging Face hub id or a ``save_pretrained`` folder to fine-tune;
            ``None`` trains the small ViT from initialisation.
        config: ``ViTConfig`` fields that change the small ViT (e.g. ``{"hidden_size": 192}``).
        num_classes: number of classes (linked from the data).
        class_names: class names in label order (linked from the data; stored as ``id2label``).
        optimizer: see :class:`~recipes.classification.ClassificationModule` for these.
        scheduler: schedule name.
        lr: peak learning rate.
        weight_decay: decoupled weight decay (none on biases, norms and 1-D parameters).
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
        optimizer: str = "adamw",
        scheduler: str = "cosine",
        lr: float | None = 2e-3,
        weight_decay: float | None = 0.05,
        warmup: int | float = 0.1,
        layer_decay: float | None = None,
        optimizer_options: dict[str, Any] | None = None,
        scheduler_options: dict[str, Any] | None = None,
    ) -> None:
        network = build_image_classifier(
            "vit", num_classes, checkpoint, labels=class_names, config=config
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

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (timm's convention,
        which ``optim_callbacks.param_groups`` reads): the [CLS] token and position embeddings."""
        return {
            "network.vit.embeddings.cls_token",
            "network.vit.embeddings.position_embeddings",
        }


def run(args: Sequence[str] | None = None) -> RecipeCLI:
    """Run the recipe with ``args`` (default: the command line); returns the finished CLI."""
    return main(
        ViTClassifier,
        ImageClassificationData,
        name="vit_finetune",
        trainer_defaults=TRAINER_DEFAULTS,
        description=__doc__.split("\n\n")[0],
        args=args,
    )


if __name__ == "__main__":
    run()
    sys.exit(0)
