"""The optimizer comparison sweep behind :mod:`recipes.compare` and :mod:`recipes.report`.

- :mod:`~recipes.sweep.plan`: the sweep's options, checked, and its trials;
- :mod:`~recipes.sweep.lr_presets`: each optimizer's learning rate and the LRs its search tries;
- :mod:`~recipes.sweep.storage`: the Optuna storage URL (SQLite by default, PostgreSQL across
  machines), masked, opened with heartbeats;
- :mod:`~recipes.sweep.study`: the study, the sweep's one source of truth: settings, queued
  trials, the newest attempt of each run, the chosen LRs;
- :mod:`~recipes.sweep.worker`: workers that claim trials and run each in its own process,
  taking over the trials of dead workers;
- :mod:`~recipes.sweep.pruning`: the Lightning pruning callback and per-optimizer pruners;
- :mod:`~recipes.sweep.child`: one run's process: a recipe run with the recorder;
- :mod:`~recipes.sweep.processes`: runs die with their worker;
- :mod:`~recipes.sweep.recorder`: ``RunRecorder``, what one run did, measured in the run;
- :mod:`~recipes.sweep.files`: JSON and text written atomically;
- :mod:`~recipes.sweep.commands`: how the commands report an error (message, exit status);
- :mod:`~recipes.sweep.summary`, :mod:`~recipes.sweep.markdown`, :mod:`~recipes.sweep.plots`:
  the report's numbers, text and figures.
"""
