"""Train or fine-tune a Vision Transformer (ViT) for image classification.

    python -m recipes.vit_finetune --optimizer adamw
    python -m recipes.vit_finetune --config configs/vit_finetune.yaml
    python -m recipes.vit_finetune --model.checkpoint google/vit-base-patch16-224 --model.optimization.layer_decay 0.75
    python -m recipes.vit_finetune --help

No Python package ships pretrained ViT weights, so the default run trains a small ViT from
initialisation: 7 x 7 patches of the 28 x 28 grey Fashion-MNIST images (Debian's
``dataset-fashion-mnist``), hidden size 128, 6 layers, 4 heads, 6 epochs. The preset is the
transformer practice: AdamW (lr 2e-3, weight decay 0.05, none on biases, LayerNorm, the [CLS]
token and the position embeddings), 10% linear warmup then cosine to zero, global-norm clipping
at 1.0, horizontal flips, logged to W&B (offline without credentials).

With ``--model.checkpoint`` (a hub id, or a folder written by ``save_pretrained``) the recipe
fine-tunes that model instead: a new head for the data's classes, images resized and
channel-matched to what the checkpoint expects, its normalization; ``--model.optimization.layer_decay``
gives encoder layer ``i`` of ``L`` the learning rate ``lr * layer_decay ** (L + 1 - i)``. The
story, top to bottom:

1. data: :class:`recipes.data.images.ImageClassificationData` reads and splits the images and
   transforms each batch for the model (:mod:`recipes.data.transforms`);
2. model: :class:`ViTClassifier` builds the network (:mod:`recipes.models.vision`) and trains it
   with :class:`recipes.core.classification.ClassificationModule` (loss, metrics, registry optimizer
   and schedule);
3. callbacks and trainer: :mod:`recipes.core.cli` (clipping, AMP epsilon, moment statistics, LR
   monitor, checkpoints), then fit and test.
"""

from __future__ import annotations

import sys
from typing import Any

from recipes.core.classification import ClassificationModule
from recipes.core.cli import Recipe
from recipes.core.optimization import OptimizerSettings
from recipes.data.images import ImageClassificationData
from recipes.models.vision import build_image_classifier, expected_input

__all__ = ["PRESET", "RECIPE", "TRAINER_DEFAULTS", "ViTClassifier", "run"]

TRAINER_DEFAULTS = {"max_epochs": 6}
# The transformer practice: AdamW, 10% linear warmup then cosine to zero, weight decay 0.05
# (none on biases, norms, the [CLS] token and the position embeddings), peak LR 2e-3 for the
# small ViT trained from initialisation.
PRESET = OptimizerSettings("adamw", "cosine", lr=2e-3, weight_decay=0.05, warmup=0.1)


class ViTClassifier(ClassificationModule):
    """A ``ViTForImageClassification``: the small from-scratch ViT, or a checkpoint's.

    Args:
        checkpoint: a Hugging Face hub id or a ``save_pretrained`` folder to fine-tune;
            ``None`` trains the small ViT from initialisation.
        config: ``ViTConfig`` fields that change the small ViT (e.g. ``{"hidden_size": 192}``).
        num_classes: number of classes (linked from the data).
        class_names: class names in label order (linked from the data; stored as ``id2label``).
        optimization: optimizer, schedule and options (default :data:`PRESET`; the CLI's
            ``--optimizer --scheduler --lr --weight_decay --warmup`` set its fields).
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        config: dict[str, Any] | None = None,
        num_classes: int = 10,
        class_names: list[str] | None = None,
        optimization: OptimizerSettings = PRESET,
    ) -> None:
        network = build_image_classifier(
            "vit", num_classes, checkpoint, labels=class_names, config=config
        )
        super().__init__(network, num_classes, optimization, class_names)
        self.image_input = expected_input(network, checkpoint)  # read by the data module

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (timm's convention,
        which ``optim_callbacks.param_groups`` reads): the [CLS] token and position embeddings."""
        return {
            "network.vit.embeddings.cls_token",
            "network.vit.embeddings.position_embeddings",
        }


RECIPE = Recipe(
    ViTClassifier,
    ImageClassificationData,
    name="vit_finetune",
    description=__doc__.split("\n\n")[0],
    trainer_defaults=TRAINER_DEFAULTS,
)

run = RECIPE.run  # run(args=None): parse (default: the command line), fit, test; the finished CLI

if __name__ == "__main__":
    run()
    sys.exit(0)
