"""What every recipe shares: the CLI, the classification module, the optimizer settings,
loggers and seeding."""

from recipes.core.classification import ClassificationModule
from recipes.core.cli import STANDARD_CALLBACKS, CallbackOption, Recipe, RecipeCLI
from recipes.core.errors import UsageError
from recipes.core.optimization import OptimizerSettings

__all__ = [
    "STANDARD_CALLBACKS",
    "CallbackOption",
    "ClassificationModule",
    "OptimizerSettings",
    "Recipe",
    "RecipeCLI",
    "UsageError",
]
