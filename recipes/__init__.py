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
