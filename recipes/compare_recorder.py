"""Where :class:`~recipes.sweep.recorder.RunRecorder` lived until version 0.1.

The ``config.yaml`` a sweep run saved names ``recipes.compare_recorder.RunRecorder`` among its
Trainer callbacks; this module keeps that class path loading.
"""

from recipes.sweep.recorder import RunRecorder

__all__ = ["RunRecorder"]
