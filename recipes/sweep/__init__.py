"""The optimizer comparison sweep behind :mod:`recipes.compare` and :mod:`recipes.report`.

- :mod:`~recipes.sweep.plan`: the sweep's options, checked, and its runs;
- :mod:`~recipes.sweep.lr_presets`: each optimizer's learning rate and the LR grid search;
- :mod:`~recipes.sweep.runner`: each run in its own process, reused once finished;
- :mod:`~recipes.sweep.child`: that process: a recipe run with the recorder;
- :mod:`~recipes.sweep.recorder`: ``RunRecorder``, what one run did, measured in the run;
- :mod:`~recipes.sweep.files`: JSON and text written atomically;
- :mod:`~recipes.sweep.summary`, :mod:`~recipes.sweep.markdown`, :mod:`~recipes.sweep.plots`:
  the report's numbers, text and figures.
"""
