"""Fine-tuning recipes on Lightning: one thin file per recipe on shared pieces.

- :mod:`recipes.classification`: the LightningModule every recipe trains with;
- :mod:`recipes.cli`: the LightningCLI with registry flags and callback switches;
- :mod:`recipes.splits`: seeded stratified splits and an epoch-seeded sampler;
- :mod:`recipes.loggers`: loggers by name, W&B offline unless credentials exist;
- :mod:`recipes.text_data`, :mod:`recipes.text_datasets`: text data (BBC News, CSV, JSONL).
"""

from recipes.classification import ClassificationModule
from recipes.cli import STANDARD_CALLBACKS, CallbackOption, RecipeCLI, main
from recipes.errors import UsageError
from recipes.splits import EpochSeededSampler, stratified_split

__all__ = [
    "STANDARD_CALLBACKS",
    "CallbackOption",
    "ClassificationModule",
    "EpochSeededSampler",
    "RecipeCLI",
    "UsageError",
    "main",
    "stratified_split",
]
